"""`ClipReport`: what a transform did, from numbers it computed anyway.

The trainer logs `clipped_grad_norm` and `clip_active` every step. Measuring them on the clipped
gradient costs two more passes over every gradient (a norm and an element-wise comparison); a
transform that scales gradients already knows its factors and the input norms, which give both.
A transform's `update` returns such a report in its `TransformResult`; when the report is None,
the trainer measures the output instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from hvdclip.gradients import Gradient, applied_factor, scale

__all__ = ["ClipReport", "scale_with_report"]


class ClipReport(NamedTuple):
    """What a transform did to the gradient list.

    Attributes:
        norm: the global L2 norm of the output gradients (a float32 scalar), or None when the
            transform did not change them (then it is the input's).
        active: a bool scalar, True when the transform clipped: scaled some gradient by a factor
            that is below 1 in the gradient's own dtype, or cut some element to a threshold.
    """

    norm: tf.Tensor | None
    active: tf.Tensor


def scale_with_report(
    grads: Sequence[Gradient], factors: Any, squares: Sequence[tf.Tensor]
) -> tuple[list[Gradient], ClipReport]:
    """Scales each gradient by its factor and reports the result without another pass over it.

    Args:
        grads: the gradient list.
        factors: one float32 scalar for every gradient, or one per gradient (`None` where the
            gradient is `None`), each a scalar or a tensor that broadcasts against its values.
        squares: each gradient's squared L2 norm (`gradients.squared_norm`), or, where a factor
            is a tensor, the squared norms it applies to (the same shape as the factor).

    The output's norm and `active` use each factor as `scale` applies it, rounded to the
    gradient's dtype: a float16 gradient scaled by 0.99995 is scaled by exactly 1, so not clipped.
    A factor of 0 (a norm that overflowed to Inf) gives zeros, whose norm is 0, not Inf * 0.
    """
    if not isinstance(factors, (list, tuple)):
        factors = [factors] * len(grads)
    out, out_squares, active = [], [tf.constant(0.0)], [tf.constant(False)]
    for grad, factor, squared in zip(grads, factors, squares):
        if grad is None:
            out.append(None)
            continue
        applied = applied_factor(factor, grad)
        out.append(scale(grad, factor))
        out_squares.append(tf.reduce_sum(tf.where(applied == 0, 0.0, squared * tf.square(applied))))
        active.append(tf.reduce_any(applied < 1))
    return out, ClipReport(tf.sqrt(tf.add_n(out_squares)), tf.reduce_any(tf.stack(active)))
