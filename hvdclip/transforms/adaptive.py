"""Adaptive clipping: thresholds that follow the weights (AGC) or the history of gradient norms
(AutoClip, ZClip).

All three run on the reduced gradient, so the weights, the norms and therefore the thresholds
are the same on every rank. AutoClip and ZClip keep their statistics as fixed-size tensors in
their state, which the trainer stores in `tf.Variable`s (broadcast at start-up, checkpointable).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

from hvdclip.gradients import dedupe, scale_to_norm, squared_norms, total
from hvdclip.transforms.base import GradientTransform, TransformResult, empty_state
from hvdclip.transforms.report import scale_with_report
from hvdclip.validation import check_int, check_number, check_patterns

__all__ = ["adaptive_grad_clip", "autoclip", "zclip", "AutoClipState", "ZClipState"]


# ---------------------------------------------------------------------------------------- AGC


def _unit_axes(shape: Sequence[int]) -> list[int]:
    """The axes summed over to get one norm per unit, as in the NFNets reference code.

    Scalars and vectors (also after squeezing size-1 axes, e.g. a [16, 1] kernel) are one unit;
    2-D kernels [in, out] and 3-D multi-head kernels have one unit per entry of the other axes
    (norm over axis 0); kernels of rank >= 4 (HWIO, DHWIO convolutions) one unit per output
    channel (norm over all axes but the last). Every case sums over axis 0, which is what lets a
    sparse gradient, whose rows are slices of axis 0, be handled exactly.
    """
    rank = len(shape)
    if sum(1 for size in shape if size != 1) <= 1:
        return list(range(rank))
    if rank in (2, 3):
        return [0]
    return list(range(rank - 1))


def _unit_norms(values: tf.Tensor, axes: list[int]) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(tf.cast(values, tf.float32)), axis=axes, keepdims=True))


def _variable_path(variable) -> str:
    # Keras 3 variables have `.path` ("sequential/dense_1/kernel"); plain tf.Variables only `.name`.
    return getattr(variable, "path", None) or variable.name


def adaptive_grad_clip(clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ()) -> GradientTransform:
    """Adaptive Gradient Clipping (AGC): bounds each unit's gradient norm relative to its weights.

    From Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization" (ICML 2021, the NFNets paper). For every unit (one output neuron's incoming
    weights), the gradient `g` is multiplied by `clipping * max(|w|, eps) / |g|` when `|g|`
    exceeds `clipping * max(|w|, eps)`. Units follow the paper's reference code: scalars and vectors are
    one unit; 2-D kernels `[in, out]` (and 3-D ones) have one unit per output (norm over axis 0);
    convolution kernels `HWIO` one per output channel. The paper clips every layer but the final
    classifier, so pass that layer's name in `exclude`.

    Sparse gradients (`tf.IndexedSlices`, from `Embedding` layers) are clipped as the dense
    gradient they stand for: repeated rows are summed first, and the units are the table's as a
    2-D kernel `[vocab, dim]`, one per embedding dimension, with the weight norm taken over the
    whole table. So `sparse_as_dense=True` and the sparse path clip identically. Gradients that
    are `None` stay `None`.

    Args:
        clipping: the largest allowed ratio of gradient norm to weight norm per unit. 0.01 is
            the paper's value at batch size 4096; it found that larger batches need smaller values.
        eps: weight norms below `eps` count as `eps`, so zero-initialised weights (biases) can
            still move.
        exclude: regular expressions; a variable whose Keras `path` (e.g.
            `"sequential/logits/kernel"`) matches one of them (`re.search`) is not clipped.

    Example:
        >>> clip = hvdclip.adaptive_grad_clip(0.01, exclude=("logits/",))   # spare the classifier
        >>> trainer = HvdClipTrainer(model, optimizer, loss_fn, clip=clip)
    """
    clipping = check_number("clipping", clipping, gt=0)
    eps = check_number("eps", eps, gt=0)
    patterns = [re.compile(pattern) for pattern in check_patterns("exclude", exclude)]

    def unit_factors(grad, variable):
        """The gradient (merged if sparse), its factor per unit and its squared norm per unit."""
        if grad is None:
            return None, None, tf.constant(0.0)
        if any(pattern.search(_variable_path(variable)) for pattern in patterns):
            return grad, tf.constant(1.0), squared_norms([grad])[0]
        axes = _unit_axes(variable.shape)
        if isinstance(grad, tf.IndexedSlices):
            grad = dedupe(grad)
        values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
        max_norms = clipping * tf.maximum(_unit_norms(tf.convert_to_tensor(variable), axes), eps)
        norms = _unit_norms(values, axes)
        return grad, scale_to_norm(norms, max_norms), tf.square(norms)

    def update(grads, state, variables):
        if len(variables) != len(grads):
            raise ValueError(
                "adaptive_grad_clip compares each gradient with its variable, so `update` needs the "
                f"variables aligned with the gradients. Received: {len(grads)} gradients, {len(variables)} variables"
            )
        merged, factors, squares = [], [], []
        for grad, variable in zip(grads, variables):
            grad, factor, squared = unit_factors(grad, variable)
            merged.append(grad)
            factors.append(factor)
            squares.append(squared)
        clipped, report = scale_with_report(merged, factors, squares)
        return TransformResult(clipped, state, report)

    return GradientTransform(empty_state, update)


# ----------------------------------------------------------------------------------- AutoClip


class AutoClipState(NamedTuple):
    """`norms`: ring buffer of the last `history` global norms (float32); `count`: norms seen (int64)."""

    norms: tf.Tensor
    count: tf.Tensor


def _percentile(buffer: tf.Tensor, filled: tf.Tensor, percentile: float) -> tf.Tensor:
    """`np.percentile(buffer[:filled], percentile)` with NumPy's default linear interpolation.

    The first `filled` (>= 1) entries are the data; the rest are ignored.
    """
    in_use = tf.range(tf.size(buffer, out_type=filled.dtype), dtype=filled.dtype) < filled
    ordered = tf.sort(tf.where(in_use, buffer, tf.fill(tf.shape(buffer), float("inf"))))
    # NumPy's virtual index (n - 1) * q, in float64 as NumPy computes it.
    position = tf.cast(filled - 1, tf.float64) * (percentile / 100.0)
    lower = tf.floor(position)
    weight = tf.cast(position - lower, buffer.dtype)
    lower = tf.cast(lower, filled.dtype)
    below = tf.gather(ordered, lower)
    above = tf.gather(ordered, tf.minimum(lower + 1, filled - 1))
    difference = above - below
    # NumPy's lerp: from whichever end is nearer, so that weights 0 and 1 give the end points exactly.
    return tf.where(weight >= 0.5, above - difference * (1 - weight), below + difference * weight)


def autoclip(percentile: float = 10, history: int = 1000) -> GradientTransform:
    """AutoClip: clips the global norm to a percentile of the norms seen so far.

    From Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks" (MLSP 2020). Each step appends the reduced gradient's global
    norm to the history, then clips the gradient (as `clip_by_global_norm`) to the
    `percentile`-th percentile of the history, current norm included, with NumPy's linear
    interpolation, as the paper's code does. The paper keeps every norm; here the history is
    the last `history` norms (a ring buffer in the state), so the threshold can follow a
    long run. The paper found `percentile=10` best for its source-separation models.

    Args:
        percentile: in (0, 100]. Lower clips harder; 100 never clips.
        history: how many recent norms the percentile is taken over (>= 1).

    Example:
        >>> trainer = HvdClipTrainer(model, optimizer, loss_fn, clip=hvdclip.autoclip(10, history=1000))
    """
    percentile = check_number("percentile", percentile, gt=0, le=100)
    history = check_int("history", history, ge=1)

    def init(variables):
        del variables
        return AutoClipState(norms=tf.zeros([history], tf.float32), count=tf.constant(0, tf.int64))

    def update(grads, state, variables):
        del variables
        squares = squared_norms(grads)
        norm = tf.sqrt(total(squares))
        slot = tf.math.floormod(tf.convert_to_tensor(state.count), history)
        norms = tf.tensor_scatter_nd_update(tf.convert_to_tensor(state.norms), [[slot]], [norm])
        count = state.count + 1
        threshold = _percentile(norms, tf.minimum(count, history), percentile)
        clipped, report = scale_with_report(grads, scale_to_norm(norm, threshold), squares)
        return TransformResult(clipped, AutoClipState(norms, count), report)

    return GradientTransform(init, update)


# -------------------------------------------------------------------------------------- ZClip

# The reference implementation's `eps` in the z-score's denominator, std + eps.
_ZCLIP_EPS = 1e-6


class ZClipState(NamedTuple):
    """`mean`, `var`: EMA statistics of the global norm (float32; 0 until warm-up ends);
    `warmup_norms`: the first `warmup_steps` norms; `count`: steps seen (int64)."""

    mean: tf.Tensor
    var: tf.Tensor
    warmup_norms: tf.Tensor
    count: tf.Tensor


def zclip(alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25) -> GradientTransform:
    """ZClip: clips spikes of the global norm, detected by z-score against EMA statistics.

    From Kumar, Owen, Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training" (2025), following the authors' reference implementation
    (github.com/bluorion-com/ZClip, `zclip/zclip.py`, mode "zscore" with its default
    "adaptive_scaling"):

    * The first `warmup_steps` norms are collected without clipping; the last of them sets the
      mean and the (population) variance of the collected norms.
    * Afterwards, with `std = sqrt(var)` and `z = (norm - mean) / (std + 1e-6)`, a norm with
      `z > z_threshold` is a spike and the gradient is scaled to the global norm
      `mean + z_threshold * std / (z / z_threshold)`: the larger the spike, the closer to the
      mean it is pulled (the paper's reciprocal adjustment).
    * The EMA then takes the norm *after* clipping (a spike feeds its clipped value, so one
      spike cannot drag the statistics up): `mean = alpha * mean + (1 - alpha) * norm`, then
      `var = alpha * var + (1 - alpha) * (norm - mean)**2` with the updated mean.

    The reference's optional hard cap (`max_grad_norm`) is not part of this transform; chain
    `clip_by_global_norm` after it for that. Defaults are the paper's.

    Args:
        alpha: EMA smoothing factor in (0, 1); higher remembers longer.
        z_threshold: z-score above which a norm counts as a spike (> 0).
        warmup_steps: steps collected before the statistics exist and clipping starts (>= 1).

    Example:
        >>> trainer = HvdClipTrainer(model, optimizer, loss_fn, clip=hvdclip.zclip(alpha=0.97, z_threshold=2.5))
    """
    alpha = check_number("alpha", alpha, gt=0, lt=1)
    z_threshold = check_number("z_threshold", z_threshold, gt=0)
    warmup_steps = check_int("warmup_steps", warmup_steps, ge=1)

    def init(variables):
        del variables
        zero = tf.constant(0.0, tf.float32)
        return ZClipState(zero, zero, tf.zeros([warmup_steps], tf.float32), tf.constant(0, tf.int64))

    def update(grads, state, variables):
        del variables
        squares = squared_norms(grads)
        norm = tf.sqrt(total(squares))
        count = tf.convert_to_tensor(state.count)
        mean, var = tf.convert_to_tensor(state.mean), tf.convert_to_tensor(state.var)

        # Warm-up: record the norm; the last warm-up step initialises the statistics.
        warming_up = count < warmup_steps
        slot = tf.minimum(count, warmup_steps - 1)
        recorded = tf.tensor_scatter_nd_update(tf.convert_to_tensor(state.warmup_norms), [[slot]], [norm])
        warmup_norms = tf.where(warming_up, recorded, state.warmup_norms)
        first_mean = tf.reduce_mean(warmup_norms)
        first_var = tf.reduce_mean(tf.square(warmup_norms - first_mean))
        warmup_ends = tf.equal(count, warmup_steps - 1)

        # After warm-up: z-score, reciprocal threshold on a spike, EMA of the clipped norm.
        std = tf.sqrt(var)
        z = (norm - mean) / (std + _ZCLIP_EPS)
        spike = tf.logical_and(tf.logical_not(warming_up), z > z_threshold)
        threshold = mean + (z_threshold * std) / (z / z_threshold)
        clipped_norm = tf.where(spike, threshold, norm)
        ema_mean = alpha * mean + (1 - alpha) * clipped_norm
        ema_var = alpha * var + (1 - alpha) * tf.square(clipped_norm - ema_mean)

        new_mean = tf.where(warming_up, tf.where(warmup_ends, first_mean, mean), ema_mean)
        new_var = tf.where(warming_up, tf.where(warmup_ends, first_var, var), ema_var)
        clipped, report = scale_with_report(grads, tf.where(spike, scale_to_norm(norm, threshold), 1.0), squares)
        return TransformResult(clipped, ZClipState(new_mean, new_var, warmup_norms, count + 1), report)

    return GradientTransform(init, update)
