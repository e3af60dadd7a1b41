"""Door 1: `DistributedGradientTape`, for a training loop you write yourself.

Horovod's idiom, with the clip stage after the reduction:

    clipper = hvdclip.Clipper(optimizer, hvdclip.clip_by_global_norm(1.0))   # once
    clipper.broadcast_initial_state(model)                                    # once, before the loop

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = hvdclip.DistributedGradientTape(tape, clipper)
        grads = tape.gradient(loss, model.trainable_variables)   # averaged over ranks, then clipped
        tape.apply_gradients(zip(grads, model.trainable_variables))  # skips NaN/Inf steps everywhere
        return loss
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from hvdclip.core.step import Clipped, Clipper
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.errors import HvdClipError

__all__ = ["DistributedGradientTape"]


class DistributedGradientTape:
    """Wraps a `tf.GradientTape` so that `gradient` returns the rank-averaged, then clipped, gradient.

    Args:
        tape: the `tf.GradientTape` that recorded this rank's loss.
        clipper: the `hvdclip.Clipper` made once outside the step; it holds the optimizer, the
            clip transform and its state, and the reduction options.

    Use it inside a compiled step, like `hvd.DistributedGradientTape`. Then finish the step with
    `apply_gradients`, which applies the gradient with the clipper's optimizer, stores the clip
    state, and skips the step on every rank if the reduced gradient had a NaN or Inf. The metrics
    of the step (`grad_norm`, `clipped_grad_norm`, `clip_active`, then `skipped`) are in
    `metrics` once `gradient` (and then `apply_gradients`) has run.

    Mixed precision: with a `LossScaleOptimizer` in the clipper, differentiate
    `clipper.scale_loss(loss)`; `gradient` unscales after the reduction and before the clip.
    """

    def __init__(self, tape: tf.GradientTape, clipper: Clipper) -> None:
        if not isinstance(tape, tf.GradientTape):
            raise TypeError(f"`tape` must be a tf.GradientTape. Received: tape={tape!r}")
        if not isinstance(clipper, Clipper):
            raise TypeError(
                "`clipper` must be an hvdclip.Clipper made once outside the step, e.g. "
                f"hvdclip.Clipper(optimizer, hvdclip.clip_by_global_norm(1.0)). Received: clipper={clipper!r}"
            )
        self._tape = tape
        self.clipper = clipper
        self._clipped: Clipped | None = None
        self.metrics: dict[str, tf.Tensor] = {}

    def gradient(self, target: Any, sources: Sequence) -> list:
        """This rank's gradient of `target`, averaged over ranks, unscaled, then clipped.

        `sources` are the variables to differentiate, usually `model.trainable_variables`
        (Keras 3 variables are fine). `None` stays `None` for a source the target does not reach.
        """
        sources = list(sources)
        if not self.clipper.built:
            raise HvdClipError(
                "The clipper's state does not exist yet, so ranks would start from different weights: call "
                "`clipper.broadcast_initial_state(model)` once on every rank before the first step."
            )
        local = self._tape.gradient(target, as_tf_variables(sources))
        clipper = self.clipper
        self._clipped = clipper.clip(clipper.unscale(clipper.reduce(local, sources)), sources)
        self.metrics = dict(self._clipped.metrics)
        return list(self._clipped.grads)

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> tf.Tensor:
        """Applies the gradient from `gradient` (or your changed copy of it) with the clipper's optimizer.

        Skips the step on every rank if the reduced gradient had a NaN or Inf; returns `skipped`.
        """
        if self._clipped is None:
            raise HvdClipError("`apply_gradients` needs the gradient of this step: call `tape.gradient(...)` first.")
        pairs = list(grads_and_vars)
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        skipped = self.clipper.apply(self._clipped, variables, grads)
        self.metrics["skipped"] = skipped
        return skipped
