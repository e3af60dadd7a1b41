"""Door 1: `DistributedGradientTape`, for a training loop you write yourself.

Horovod's idiom, with the clip stage after the reduction:

    clipper = hvdclip.Clipper(optimizer, hvdclip.clip_by_global_norm(1.0))   # once
    clipper.broadcast_initial_state(model)                                    # once, before the loop

    @tf.function
    def train_step(x, y, has_next):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = hvdclip.DistributedGradientTape(tape, clipper, has_data=has_next)
        grads = tape.gradient(loss, model.trainable_variables)   # averaged over ranks, then clipped
        report = tape.apply_gradients(zip(grads, model.trainable_variables))  # skips NaN/Inf steps everywhere
        return loss, report

    for (x, y), has_next in hvdclip.Lockstep(dataset, clipper):  # every rank's loop ends at the same step
        loss, report = train_step(x, y, has_next)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from hvdclip.core.step import Clipper, Prepared
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.errors import HvdClipError

__all__ = ["DistributedGradientTape"]


class DistributedGradientTape:
    """Wraps a `tf.GradientTape` so that `gradient` returns the rank-averaged, then clipped, gradient.

    Args:
        tape: the `tf.GradientTape` that recorded this rank's loss.
        clipper: the `hvdclip.Clipper` made once outside the step; it holds the optimizer, the
            clip transform and its state, the reduction and the accumulation.
        has_data: optional bool scalar tensor: this rank has a batch for the next step (what
            `hvdclip.Lockstep` yields). The ranks' answers ride in the gradient allreduce, and
            the report's `all_have_data` says whether every rank has one.

    Use it inside a compiled step, like `hvd.DistributedGradientTape`. Then finish the step with
    `apply_gradients`, which applies the gradient with the clipper's optimizer, stores the clip
    state, skips the step on every rank if the reduced gradient had a NaN or Inf, and returns the
    step's report (`grad_norm`, `clipped_grad_norm`, `clip_active`, `skipped`, `synced`,
    `all_have_data`: scalars, the same on every rank).

    Mixed precision: with a `LossScaleOptimizer` in the clipper, differentiate
    `clipper.scale_loss(loss)`; `gradient` unscales after the reduction and before the clip.
    With `accumulation_steps=k` in the clipper, `gradient` returns zeros on the first k - 1 calls
    of a window (this rank's gradient went into its sums) and `apply_gradients` applies nothing.
    """

    def __init__(self, tape: tf.GradientTape, clipper: Clipper, *, has_data: Any = None) -> None:
        if not isinstance(tape, tf.GradientTape):
            raise TypeError(f"`tape` must be a tf.GradientTape. Received: tape={tape!r}")
        if not isinstance(clipper, Clipper):
            raise TypeError(
                "`clipper` must be an hvdclip.Clipper made once outside the step, e.g. "
                f"hvdclip.Clipper(optimizer, hvdclip.clip_by_global_norm(1.0)). Received: clipper={clipper!r}"
            )
        if has_data is not None and not (isinstance(has_data, (tf.Tensor, tf.Variable)) and has_data.dtype == tf.bool):
            raise TypeError(
                "`has_data` must be a bool scalar tensor (pass it into the compiled step as a tensor, as "
                f"hvdclip.Lockstep yields it), or None. Received: has_data={has_data!r}"
            )
        self._tape = tape
        self.clipper = clipper
        self._has_data = has_data
        self._prepared: Prepared | None = None

    def gradient(self, target: Any, sources: Sequence) -> list:
        """This rank's gradient of `target`, averaged over ranks, unscaled, then clipped.

        `sources` are the variables to differentiate, usually `model.trainable_variables`
        (Keras 3 variables are fine). `None` stays `None` for a source the target does not reach.
        """
        sources = list(sources)
        self.clipper.require_built()
        local = self._tape.gradient(target, as_tf_variables(sources))
        self._prepared = self.clipper.prepare(local, sources, has_data=self._has_data)
        return list(self._prepared.grads)

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> dict[str, tf.Tensor]:
        """Applies the gradient from `gradient` (or your changed copy of it) with the clipper's optimizer.

        Skips the step on every rank if the reduced gradient had a NaN or Inf; returns the report.
        """
        if self._prepared is None:
            raise HvdClipError("`apply_gradients` needs the gradient of this step: call `tape.gradient(...)` first.")
        pairs = list(grads_and_vars)
        return self.clipper.finish(self._prepared, [v for _, v in pairs], [g for g, _ in pairs])
