"""Batch mean and variance over every rank's examples, with one grouped allreduce.

Each rank reduces its own examples to three per-channel numbers: the count `n`, the sum `n * m`
and the shifted sum of squares `M2 + n * m**2`, where `m` and `M2 = sum((x - m)**2)` are the
rank's own mean and squared deviations, computed in two passes as `tf.nn.moments` does. One
grouped sum-allreduce of those three gives the global count, sum and sum of squares, so uneven
per-rank batches give the statistics of the combined batch exactly.

Why not sum `x**2` directly: `E[x**2] - E[x]**2` cancels catastrophically when the mean is large
against the spread (float32 keeps 7 digits; a channel with mean 300 and standard deviation 1 has
none left). Here the rank-local pass removes the local mean first, and the cross-rank combination,
`sum(M2_r + n_r * m_r**2) - N * mean**2`, runs in float64 on per-channel vectors: its rounding
error scales with how far the ranks' means lie from each other, not with the mean itself. The
payload is a few per-channel vectors, so float64 costs nothing measurable.

The gradient of a sum-allreduce is the sum-allreduce of the upstream gradients (every rank's loss
depends on every rank's statistics). Horovod registers exactly that gradient, but names its
collective after the gradient tensors, whose names carry Keras layer names, which can differ
between ranks. Here both collectives are named by the order of the calls in the traced step,
which is the same on every rank.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import horovod.tensorflow as hvd
import tensorflow as tf

__all__ = ["global_moments", "differentiable_sum_over_ranks"]

_NAME = "hvdclip_batch_statistics"
# Traced graph -> how many statistics collectives it holds so far. Every rank traces the same
# model in the same order, so the k-th collective of a step has the same name everywhere, even
# when Keras numbered the layers differently on different ranks.
_calls_per_graph: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _collective_name() -> str:
    if tf.executing_eagerly():
        # Eager collectives run one at a time, so one name never has two calls in flight.
        return _NAME
    graph = tf.compat.v1.get_default_graph()
    count = _calls_per_graph.get(graph, 0)
    _calls_per_graph[graph] = count + 1
    return f"{_NAME}_{count}"


def differentiable_sum_over_ranks(tensors: Sequence[tf.Tensor], name: str) -> list[tf.Tensor]:
    """Sums each tensor over ranks in one grouped allreduce; its gradient is the same collective.

    Every rank must call it with tensors of the same shapes and dtypes, under the same `name`.
    """
    tensors = [tf.convert_to_tensor(t) for t in tensors]

    @tf.custom_gradient
    def summed(*inputs):
        outputs = hvd.grouped_allreduce(list(inputs), op=hvd.Sum, name=name, ignore_name_scope=True)

        def grad(*upstream):
            upstream = [tf.zeros_like(x) if g is None else g for x, g in zip(inputs, upstream)]
            return hvd.grouped_allreduce(upstream, op=hvd.Sum, name=f"{name}_grad", ignore_name_scope=True)

        return outputs, grad

    return list(summed(*tensors))


def _local_statistics(x: tf.Tensor, axes: Sequence[int], weights: tf.Tensor | None):
    """This rank's count, mean and sum of squared deviations from that mean, per channel."""
    if weights is None:
        shape = tf.shape(x)
        count = tf.cast(tf.reduce_prod(tf.gather(shape, list(axes))), x.dtype)
        total = tf.reduce_sum(x, axis=axes)
        mean = tf.math.divide_no_nan(total, count)  # An empty local batch contributes zeros.
        squares = tf.reduce_sum(tf.math.squared_difference(x, tf.stop_gradient(_expand(mean, x, axes))), axis=axes)
        count = tf.broadcast_to(count, tf.shape(mean))
    else:
        weights = tf.cast(weights, x.dtype)
        count = tf.reduce_sum(weights, axis=axes)
        mean = tf.math.divide_no_nan(tf.reduce_sum(weights * x, axis=axes), count)
        deviation = x - tf.stop_gradient(_expand(mean, x, axes))
        squares = tf.reduce_sum(weights * tf.square(deviation), axis=axes)
    return count, mean, squares


def _expand(per_channel: tf.Tensor, x: tf.Tensor, axes: Sequence[int]) -> tf.Tensor:
    """A per-channel vector reshaped to broadcast against `x` (reduced axes of size 1)."""
    shape = [1 if axis in axes else -1 for axis in range(len(x.shape))]
    return tf.reshape(per_channel, shape)


def global_moments(
    x: tf.Tensor, axes: Sequence[int], weights: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and (biased) variance of `x` over `axes` and over every rank's examples.

    Call it on every rank, in the same order relative to other statistics collectives. Ranks may
    hold different numbers of examples (even none). Differentiable: the backward pass sums the
    upstream gradients over ranks, as one process on the combined batch would.

    Args:
        x: a float tensor; float16 is computed in float32.
        axes: the axes to reduce (all but the channel axis for batch normalisation), non-negative.
        weights: optional 0/1 weights broadcastable to `x` (a mask): only weighted examples count.

    Returns:
        `(mean, variance)`, each of the shape of `x` without `axes`, in `x`'s dtype (float32 for
        float16 input).

    Example:
        >>> mean, variance = global_moments(features, axes=[0, 1, 2])  # NHWC -> per channel
    """
    axes = sorted(int(axis) for axis in axes)
    dtype = x.dtype
    if dtype in (tf.float16, tf.bfloat16):
        x = tf.cast(x, tf.float32)
    if weights is not None:
        weights = tf.broadcast_to(tf.cast(weights, x.dtype), tf.shape(x))
    count, mean, squares = _local_statistics(x, axes, weights)
    count, mean, squares = (tf.cast(t, tf.float64) for t in (count, mean, squares))
    total_count, total, total_squares = differentiable_sum_over_ranks(
        [count, count * mean, squares + count * tf.square(mean)], name=_collective_name()
    )
    global_mean = tf.math.divide_no_nan(total, total_count)
    deviations = tf.maximum(total_squares - global_mean * total, 0.0)
    variance = tf.math.divide_no_nan(deviations, total_count)
    out = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype
    return tf.cast(global_mean, out), tf.cast(variance, out)
