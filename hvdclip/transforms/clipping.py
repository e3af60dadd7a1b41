"""Fixed-threshold clipping: by value, by each tensor's norm, and by the global norm."""

from __future__ import annotations

import tensorflow as tf

from hvdclip.gradients import dedupe, global_norm, map_values, scale_to_norm, squared_norms, total
from hvdclip.transforms.base import GradientTransform, TransformResult, empty_state
from hvdclip.transforms.report import ClipReport, scale_with_report
from hvdclip.validation import check_number

__all__ = ["clip_by_value", "clip_by_norm", "clip_by_global_norm"]


def clip_by_value(clip_value: float) -> GradientTransform:
    """Clips every element of the reduced gradient to `[-clip_value, clip_value]`.

    Repeated rows of sparse gradients are summed before clipping, so the result is the clip of
    the dense gradient.

    Example:
        >>> trainer = HvdClipTrainer(model, optimizer, loss_fn, clip=hvdclip.clip_by_value(0.5))
    """
    clip_value = check_number("clip_value", clip_value, gt=0)

    def update(grads, state, variables):
        del variables
        clipped, active = [], [tf.constant(False)]
        for grad in grads:
            if isinstance(grad, tf.IndexedSlices):
                grad = dedupe(grad)
            if grad is not None:
                values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
                active.append(tf.reduce_any(tf.abs(values) > clip_value))
            clipped.append(map_values(lambda values: tf.clip_by_value(values, -clip_value, clip_value), grad))
        # The norm is measured (clipping by value has no shortcut to it); in a chain that ends in
        # another clip, nothing reads it and TensorFlow prunes it from the step.
        return TransformResult(clipped, state, ClipReport(global_norm(clipped), tf.reduce_any(active)))

    return GradientTransform(empty_state, update)


def clip_by_norm(max_norm: float) -> GradientTransform:
    """Scales each gradient tensor on its own so that its L2 norm is at most `max_norm`.

    This changes the update's direction when only some tensors are clipped; prefer
    `clip_by_global_norm` unless you want per-layer bounds.

    Example:
        >>> trainer = HvdClipTrainer(model, optimizer, loss_fn, clip=hvdclip.clip_by_norm(1.0))
    """
    max_norm = check_number("max_norm", max_norm, gt=0)

    def update(grads, state, variables):
        del variables
        squares = squared_norms(grads)
        factors = [None if g is None else scale_to_norm(tf.sqrt(sq), max_norm) for g, sq in zip(grads, squares)]
        clipped, report = scale_with_report(grads, factors, squares)
        return TransformResult(clipped, state, report)

    return GradientTransform(empty_state, update)


def clip_by_global_norm(max_norm: float) -> GradientTransform:
    """Scales all gradients together so that their joint L2 norm is at most `max_norm`.

    The default to reach for: it keeps the update's direction. Run after the allreduce (as the
    trainer does), it is the same on every rank and equal to clipping the full-batch gradient.

    Example:
        >>> trainer = HvdClipTrainer(model, optimizer, loss_fn, clip=hvdclip.clip_by_global_norm(1.0))
    """
    max_norm = check_number("max_norm", max_norm, gt=0)

    def update(grads, state, variables):
        del variables
        squares = squared_norms(grads)
        factor = scale_to_norm(tf.sqrt(total(squares)), max_norm)
        clipped, report = scale_with_report(grads, factor, squares)
        return TransformResult(clipped, state, report)

    return GradientTransform(empty_state, update)
