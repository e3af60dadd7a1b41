"""`zero_nonfinite`: a wrapper that replaces a NaN/Inf gradient with zeros and keeps it away from a
transform's state."""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

from hvdclip.gradients import map_values, sum_of_squares
from hvdclip.transforms.base import GradientTransform, TransformResult, apply_transform, check_transform
from hvdclip.transforms.report import ClipReport
from hvdclip.validation import check_int

__all__ = ["zero_nonfinite", "ZeroNonFiniteState"]


class ZeroNonFiniteState(NamedTuple):
    """`inner`: the wrapped transform's state; `skipped`: non-finite steps held back (zeroed) in total;
    `consecutive`: non-finite steps in a row, up to the current one (int64 counters)."""

    inner: Any
    skipped: tf.Tensor
    consecutive: tf.Tensor


def zero_nonfinite(inner: GradientTransform, max_consecutive_skips: int | None = None) -> GradientTransform:
    """Runs `inner` only on finite gradients; a NaN/Inf gradient becomes zeros and leaves its state untouched.

    In the spirit of optax's `apply_if_finite`. When the incoming gradient has a NaN or Inf
    anywhere (or its squared global norm overflows float32, the trainer's test too), the
    wrapper returns zeros in place of every gradient (`None` stays `None`), keeps `inner`'s
    state as it was (so, e.g., AutoClip's history and ZClip's statistics are not poisoned) and
    counts the step in its own state. A finite gradient resets the consecutive count.

    Zeros rather than the gradient as received, so that if nothing downstream skips the step,
    the optimizer does not write NaN into the weights. The wrapper does not skip the step: a zero
    gradient still moves momentum optimizers (Adam decays its moments). For a true skip keep the
    trainer's default `skip_nonfinite=True`: it skips the whole optimizer step on a non-finite
    reduced gradient and then discards the clip state of that step too, this wrapper's counters
    included. The wrapper is for `HvdClipTrainer(..., skip_nonfinite=False)` and for use outside
    the trainer.

    After `max_consecutive_skips` non-finite steps in a row, the wrapper stops holding them
    back, as optax does: the next non-finite gradient goes through `inner`, state update and
    all, so a run that has diverged fails visibly instead of silently training on zeros.
    `None` holds back every non-finite gradient.

    Example:
        >>> clip = hvdclip.zero_nonfinite(hvdclip.autoclip(10), max_consecutive_skips=5)
        >>> trainer = HvdClipTrainer(model, optimizer, loss_fn, clip=clip, skip_nonfinite=False)
    """
    check_transform("inner", inner)
    if max_consecutive_skips is not None:
        max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, ge=1)

    def init(variables):
        zero = tf.constant(0, tf.int64)
        return ZeroNonFiniteState(inner.init(variables), zero, zero)

    def update(grads, state, variables):
        squares = sum_of_squares(grads)
        finite = tf.math.is_finite(squares)
        consecutive = tf.where(finite, tf.constant(0, tf.int64), state.consecutive + 1)
        run_inner = finite
        if max_consecutive_skips is not None:
            run_inner = tf.logical_or(finite, consecutive > max_consecutive_skips)

        # `inner` runs either way (a pure function of its inputs); its results are kept or dropped.
        inner_grads, inner_state, inner_report = apply_transform(inner, grads, state.inner, variables)
        kept_state = tf.nest.map_structure(
            lambda new, old: tf.where(run_inner, new, tf.convert_to_tensor(old)), inner_state, state.inner
        )
        out = [map_values(lambda values: tf.where(run_inner, values, tf.zeros_like(values)), g) for g in inner_grads]
        skipped = state.skipped + tf.cast(tf.logical_not(run_inner), tf.int64)
        new_state = ZeroNonFiniteState(kept_state, skipped, consecutive)
        if inner_report is None:  # Nothing to report from: the caller measures the output.
            return TransformResult(out, new_state)
        inner_norm = tf.sqrt(squares) if inner_report.norm is None else inner_report.norm
        held_back = tf.logical_not(run_inner)  # The gradient became zeros: that is a change.
        report = ClipReport(tf.where(run_inner, inner_norm, 0.0), inner_report.active | held_back)
        return TransformResult(out, new_state, report)

    return GradientTransform(init, update)
