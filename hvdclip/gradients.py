"""Helpers over a list of gradients as the trainer holds it: dense tensors, `tf.IndexedSlices`
(embedding lookups) and `None` (variables the loss does not reach).

An `IndexedSlices` gradient may repeat an index (Horovod allgathers sparse gradients, so a row
touched on two ranks appears twice). Its dense meaning is the *sum* of the repeated rows, so
anything non-linear in the values (a norm, an element-wise clip) first merges repeats with
`dedupe`. `dedupe` returns a `UniqueSlices`, the canonical form, which every helper here
recognises and keeps (scaling does not create repeats), so the merge (a `tf.unique` and a segment
sum) runs once per gradient per step, not once per helper. Norms are accumulated in float32
whatever the gradient dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import tensorflow as tf

__all__ = [
    "Gradient",
    "UniqueSlices",
    "dedupe",
    "map_values",
    "scale",
    "applied_factor",
    "scale_to_norm",
    "squared_norm",
    "squared_norms",
    "total",
    "global_norm",
    "sum_of_squares",
]

Gradient = Union[tf.Tensor, tf.IndexedSlices, None]


class UniqueSlices(tf.IndexedSlices):
    """An `IndexedSlices` whose indices are known to be distinct: what `dedupe` returns.

    It is an `IndexedSlices` to TensorFlow and Keras; the type only tells `dedupe` that there is
    nothing left to merge. Build one only from indices that are distinct.
    """


def dedupe(grad: tf.IndexedSlices) -> UniqueSlices:
    """Returns `grad` with repeated indices merged by summing their rows (as is, if already merged)."""
    if isinstance(grad, UniqueSlices):
        return grad
    unique, positions = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, positions, tf.size(unique))
    return UniqueSlices(values, unique, grad.dense_shape)


def map_values(fn: Callable[[tf.Tensor], tf.Tensor], grad: Gradient) -> Gradient:
    """Applies `fn` to a dense gradient or to the rows of a sparse one; `None` stays `None`.

    Only for `fn` that is linear in the values (scaling): element-wise non-linear functions
    must be given `dedupe(grad)`. The indices are kept, and so is a `UniqueSlices`' type.
    """
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        kind = UniqueSlices if isinstance(grad, UniqueSlices) else tf.IndexedSlices
        return kind(fn(grad.values), grad.indices, grad.dense_shape)
    return fn(grad)


def scale(grad: Gradient, factor: tf.Tensor | float) -> Gradient:
    """Multiplies a gradient by `factor` (a scalar, or a tensor that broadcasts against its values)."""
    return map_values(lambda values: values * tf.cast(factor, values.dtype), grad)


def applied_factor(factor: tf.Tensor | float, grad: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """`factor` as `scale(grad, factor)` applies it: rounded to the gradient's dtype, as float32."""
    dtype = (grad.values if isinstance(grad, tf.IndexedSlices) else grad).dtype
    return tf.cast(tf.cast(factor, dtype), tf.float32)


def scale_to_norm(norm: tf.Tensor, max_norm: tf.Tensor | float) -> tf.Tensor:
    """The factor that brings a vector of L2 norm `norm` down to at most `max_norm` (element-wise).

    Exactly 1.0 when `norm <= max_norm`, so an inactive clip leaves gradients bit-identical, and
    also when both are 0 (an adaptive threshold can be 0), where `max_norm / max(norm, max_norm)`
    would be 0/0.
    """
    norm = tf.cast(norm, tf.float32)
    max_norm = tf.cast(max_norm, tf.float32)
    return tf.where(norm > max_norm, max_norm / norm, tf.ones_like(norm))


def squared_norm(grad: Gradient) -> tf.Tensor:
    """Squared L2 norm of one gradient as a float32 scalar (0 for `None`)."""
    if grad is None:
        return tf.constant(0.0, tf.float32)
    values = dedupe(grad).values if isinstance(grad, tf.IndexedSlices) else grad
    # l2_loss is sum(x ** 2) / 2 in one kernel, without the squared copy that square + sum makes.
    return 2.0 * tf.nn.l2_loss(tf.cast(values, tf.float32))


def squared_norms(grads: Sequence[Gradient]) -> list[tf.Tensor]:
    """Each gradient's squared L2 norm (float32 scalars; 0 for `None`), aligned with `grads`."""
    return [squared_norm(g) for g in grads]


def total(squares: Sequence[tf.Tensor]) -> tf.Tensor:
    """The sum of squared norms (0 for none): `sum_of_squares` from `squared_norms`' result."""
    return tf.add_n(list(squares) or [tf.constant(0.0, tf.float32)])


def sum_of_squares(grads: Sequence[Gradient]) -> tf.Tensor:
    """Sum of the squared L2 norms of all gradients: one float32 scalar."""
    return total(squared_norms(grads))


def global_norm(grads: Sequence[Gradient]) -> tf.Tensor:
    """L2 norm of all gradients taken together, as one vector (float32 scalar)."""
    return tf.sqrt(sum_of_squares(grads))
