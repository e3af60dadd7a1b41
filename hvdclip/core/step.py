"""The one step every door runs, in the order the math happens, and the start-up broadcast.

    local gradient (the caller's tape)
      [accumulation: k - 1 micro-steps add it to this rank's sums and communicate nothing]
      -> reduce: average over ranks (Horovod's DistributedGradientTape reduction, positional names),
         with the step's flags (the has-data vote) riding in the same allreduce
      -> unscale (mixed precision: divide by the loss scale)
      -> merge repeated sparse rows
      -> clip: the clip transform, on the reduced gradient, identical on every rank
      -> guard: skip the step on every rank if the reduced gradient has a NaN/Inf
      -> apply: the optimizer's update, then the clip state's

Everything after `reduce` works on numbers that are the same on every rank, so every rank clips
the same way and takes the same branch: ranks stay bit-identical with one broadcast at start-up
(`Clipper.broadcast_initial_state`) and none per step. The reduction runs under the watchdog's
marker, so a rank whose peer is lost ends within `HVDCLIP_STEP_TIMEOUT` in every door.

`Clipper` owns what the step needs between steps: the optimizer, the clip transform and its state,
the skip counters and the accumulation state, all in variables (broadcast, checkpointed). It is
made once, outside any compiled function. Each door calls `step` (or its two halves, `prepare`
and `finish`, when the caller applies the gradient itself): `hvdclip.DistributedGradientTape`
(your own loop), `hvdclip.keras.DistributedOptimizer` (Keras `fit`) and `HvdClipTrainer`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

from hvdclip.core.accumulation import Accumulation
from hvdclip.distributed import collectives, consistency
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.distributed.reduction import Reduction
from hvdclip.distributed.runtime import require_initialized
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip import foreign
from hvdclip.errors import CheckpointError, HvdClipError
from hvdclip.gradients import dedupe, global_norm, scale, sum_of_squares
from hvdclip.transforms.base import GradientTransform, apply_transform, check_transform, identity
from hvdclip.validation import check_bool, check_int

__all__ = ["Clipper", "Prepared", "REPORT", "reduce_and_clip"]

_CLIP_KEYWORDS = ("clipnorm", "clipvalue", "global_clipnorm")

# What a step reports (scalars, the same on every rank): the reduced gradient's norm before and
# after the clip stage, whether the clip changed it, whether the step was skipped for NaN/Inf,
# whether this call reduced at all (False on an accumulation micro-step, whose norms are NaN), and
# whether every rank has data for the next step (the vote; True when the step was not asked).
REPORT = ("grad_norm", "clipped_grad_norm", "clip_active", "skipped", "synced", "all_have_data")


class Prepared(NamedTuple):
    """The first half of a step (`Clipper.prepare`): the clipped gradient and what `finish` needs.

    Attributes:
        grads: the clipped gradient list (`None` where the variable got no gradient; zeros on an
            accumulation micro-step, where there is nothing to apply).
        clip_state: the clip transform's new state, stored only if the step is applied.
        finite: the reduced gradient had no NaN/Inf (a bool scalar, the same on every rank).
        synced: this call reduced (False on a micro-step).
        all_have_data: every rank voted that it has data for the next step.
        metrics: `grad_norm` (before clipping), `clipped_grad_norm` and `clip_active`.
    """

    grads: list
    clip_state: Any
    finite: tf.Tensor
    synced: tf.Tensor
    all_have_data: tf.Tensor
    metrics: dict[str, tf.Tensor]


def _changed(before: Any, after: Any) -> tf.Tensor:
    """Whether a transform changed one gradient (a scalar bool tensor)."""
    if after is None or isinstance(before, tf.IndexedSlices) != isinstance(after, tf.IndexedSlices):
        return tf.constant(True)  # Dropped, or turned dense/sparse: certainly changed.
    if not isinstance(before, tf.IndexedSlices):
        return tf.reduce_any(tf.not_equal(before, after))
    same_rows = tf.reduce_all(tf.equal(tf.shape(before.values), tf.shape(after.values)))
    return tf.cond(
        same_rows,
        lambda: tf.reduce_any(tf.not_equal(before.values, after.values))
        | tf.reduce_any(tf.not_equal(before.indices, after.indices)),
        lambda: tf.constant(True),
    )


def _checked_named_variables(name: str, value: Any) -> list[tuple[str, tf.Variable]]:
    pairs = list(value) if isinstance(value, (list, tuple)) else None
    if pairs is None or not all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], tf.Variable) for p in pairs
    ):
        raise TypeError(f"`{name}` must be a list of (name, tf.Variable) pairs. Received: {name}={value!r}")
    return pairs


def reduce_and_clip(
    grads: list,
    variables: list,
    reduction: Reduction,
    transform: GradientTransform | None,
    clip_state: Any,
    *,
    flags: Sequence[tf.Tensor] = (),
    marker: Any = None,
    step: Any = 0,
    inverse_scale: Any = None,
) -> Prepared:
    """The step's stages from the local gradient to the clipped one, in order: the one place they are spelled.

    reduce (with `flags` riding the allreduce, under the watchdog's `marker`) -> unscale (multiply by
    `inverse_scale`, mixed precision) -> merge repeated sparse rows -> clip with `transform` (None:
    no clip) from `clip_state`. `Clipper.prepare` runs it, and so does the Horovod-signature tape
    of `hvdclip.tensorflow`, which applies with the user's own optimizer.
    """
    # The watchdog sees this rank waiting in the allreduce: the reduction's ops wait for the mark,
    # and the mark is cleared once they are done.
    entered = [marker.enter(step)] if marker is not None else []
    with tf.control_dependencies(entered):
        reduced, raised = reduction(grads, variables, flags)
    if marker is not None:
        marker.leave((reduced, raised), step)
    all_have_data = tf.logical_not(raised[0]) if raised else tf.constant(True)
    if inverse_scale is not None:  # Mixed precision: the clip must see the true gradient.
        reduced = [scale(g, inverse_scale) for g in reduced]
    # Horovod allgathers sparse rows, so an embedding row touched on two ranks arrives twice.
    # Keras 3 optimizers apply element-wise ops (Adam squares the gradient) to IndexedSlices
    # values without merging, which would square the parts, not the sum: merge once here.
    grads = [dedupe(g) if isinstance(g, tf.IndexedSlices) else g for g in reduced]
    squares = sum_of_squares(grads)
    grad_norm = tf.sqrt(squares)
    finite = tf.math.is_finite(squares)
    synced = tf.constant(True)
    if transform is None:
        metrics = {"grad_norm": grad_norm, "clipped_grad_norm": grad_norm, "clip_active": tf.constant(False)}
        state = tf.nest.map_structure(tf.convert_to_tensor, clip_state)
        return Prepared(grads, state, finite, synced, all_have_data, metrics)
    result = apply_transform(transform, grads, clip_state, variables)
    if result.report is not None:  # The transform's own account: no extra pass over the gradients.
        clipped_norm = grad_norm if result.report.norm is None else result.report.norm
        active = result.report.active
    else:
        clipped_norm = global_norm(result.grads)
        # "Changed any element", not "norm went down": two norms of equal tensors computed in
        # differently fused graphs can differ in the last bit.
        active = tf.reduce_any([_changed(a, b) for a, b in zip(grads, result.grads) if a is not None])
    # NaN != NaN would count a non-finite gradient as clipped: nothing was (the step is skipped).
    metrics = {"grad_norm": grad_norm, "clipped_grad_norm": clipped_norm, "clip_active": finite & active}
    # In the nest types `init` built (a transform may return a list for a tuple): both branches of
    # an accumulation step's `tf.cond` must have one structure.
    state = tf.nest.pack_sequence_as(clip_state, tf.nest.flatten(result.state))
    return Prepared(result.grads, state, finite, synced, all_have_data, metrics)


# An odd 31-bit constant (the golden ratio's): rank r's seeds are rank 0's plus r times it.
_RANK_SEED_STRIDE = 0x5E3779B1


def _fold_rank_into_seed_generators(model: keras.Model, rank: int) -> None:
    """Makes each rank's random layers draw their own numbers, from the one broadcast seed plus the rank.

    A Keras `SeedGenerator`'s state is `[seed, counter]`, and each draw advances only the counter.
    Offsetting `seed` by the rank gives each rank its own stream; the counters advance alike on
    every rank, so rank r's state is always rank 0's with the same offset, and a restore (rank 0's
    state, broadcast, then folded again) continues every rank's stream exactly.
    """
    if rank == 0:
        return
    for state in consistency.seed_generator_states(model):
        value = np.array(state.numpy(), dtype=np.int64)
        value[0] = (value[0] + rank * _RANK_SEED_STRIDE) % (2**31 - 1)  # Stays a valid int32 seed; 2**31 - 1 is prime.
        state.assign(value.astype(state.numpy().dtype))


class Clipper:
    """The core step: reduce, unscale, merge sparse rows, clip, guard, apply; and the one broadcast.

    Args:
        optimizer: a Keras 3 optimizer, or a `keras.optimizers.LossScaleOptimizer` for mixed
            precision. Give clipping to `clip`, not to the optimizer's `clipnorm`/`clipvalue`/
            `global_clipnorm` (those would clip before hvdclip sees the reduced gradient).
        clip: a `GradientTransform` such as `hvdclip.clip_by_global_norm(1.0)`; None applies the
            reduced gradient unclipped.
        reduction: how gradients are averaged over ranks, an `hvdclip.Reduction` (None: its
            defaults, one fused group).
        accumulation_steps: micro-batches per optimizer step: each of the first k - 1 calls of the
            step adds this rank's gradient to its sums without communicating, the k-th reduces the
            window's gradient and applies it (`hvdclip.core.accumulation`).
        average_accumulated: the window's gradient is the mean of its k micro-batch gradients
            (True) or their sum (False, Horovod's `average_aggregated_gradients=False`).
        skip_nonfinite: skip the optimizer step on every rank when the reduced gradient has a
            NaN or Inf. Always on with a `LossScaleOptimizer` (an overflow halves the scale).

    Example (your own loop; see `hvdclip.DistributedGradientTape`):
        >>> clipper = hvdclip.Clipper(keras.optimizers.Adam(1e-3), hvdclip.clip_by_global_norm(1.0))
        >>> clipper.broadcast_initial_state(model)   # once, before the first step
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        clip: GradientTransform | None = None,
        *,
        reduction: Reduction | None = None,
        accumulation_steps: int = 1,
        average_accumulated: bool = True,
        skip_nonfinite: bool = True,
    ) -> None:
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"`optimizer` must be a Keras 3 optimizer such as keras.optimizers.Adam(). Received: optimizer={optimizer!r}"
            )
        self.loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # The optimizer that applies the (unscaled, clipped) gradient.
        self.applier = optimizer.inner_optimizer if self.loss_scaling else optimizer
        for keyword in _CLIP_KEYWORDS:
            value = getattr(optimizer, keyword, None) or getattr(self.applier, keyword, None)
            if value is not None:
                raise ValueError(
                    f"`optimizer` clips by itself ({keyword}={value!r}), before the gradient is reduced over "
                    "ranks; pass clipping as `clip=` instead, e.g. clip=hvdclip.clip_by_global_norm(1.0)."
                )
        check_transform("clip", clip, optional=True)
        if reduction is not None and not isinstance(reduction, Reduction):
            raise TypeError(
                "`reduction` must be an hvdclip.Reduction, e.g. hvdclip.Reduction(compression='fp16'), or None. "
                f"Received: reduction={reduction!r}"
            )
        check_int("accumulation_steps", accumulation_steps, ge=1)
        check_bool("average_accumulated", average_accumulated)
        self.optimizer = optimizer
        self.clipping = clip is not None
        self.transform = clip if clip is not None else identity()
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self.reduction = reduction if reduction is not None else Reduction()
        self.accumulation = Accumulation(accumulation_steps, average_accumulated) if accumulation_steps > 1 else None
        self.clip_state: Any = ()
        # Counters live in variables so that a compiled step updates them without a host sync.
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_skipped_steps")
        self.consecutive_skips = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_consecutive_skips")
        # The last vote's answer, for a loop that decides in Python whether to go on (`Lockstep`).
        # Scratch: it is in every step's report too, and in no checkpoint.
        self.all_have_data = tf.Variable(True, trainable=False, name="hvdclip_all_have_data")
        self.marker = None  # The watchdog's marker around the reduction (made by `build`).
        self.built = False
        self.broadcast_count = 0

    # ------------------------------------------------------------------ state and start-up

    def build(self, trainable_variables: Sequence) -> None:
        """Creates the optimizer's slots, the clip state and the accumulators (no communication). Idempotent."""
        if self.built:
            return
        trainable_variables = list(trainable_variables)
        if not trainable_variables:
            raise ValueError("`trainable_variables` is empty: there is nothing to train (is the model frozen?).")
        with tf.init_scope():  # Eager even when Keras builds the optimizer lazily inside a traced step.
            if not self.optimizer.built:
                # Slots must exist before the broadcast, or rank 0's optimizer state could never reach the others.
                self.optimizer.build(trainable_variables)
            self.clip_state = tf.nest.map_structure(
                lambda t: tf.Variable(t, trainable=False), self.transform.init(trainable_variables)
            )
            if self.accumulation is not None:
                self.accumulation.build(trainable_variables)
            self.marker = default_watchdog().marker("the gradient allreduce")
        self.built = True

    def named_variables(self) -> list[tuple[str, tf.Variable]]:
        """The step's shared state, named: optimizer, clip state, counters (identical on every rank).

        What the start-up broadcast sends and a checkpoint holds once; `local_variables` is the rest.
        """
        named = [(f"optimizer/{v.path}", tv) for v, tv in zip(self.optimizer.variables, as_tf_variables(self.optimizer.variables))]
        named += [(f"clip_state[{i}]", v) for i, v in enumerate(tf.nest.flatten(self.clip_state))]
        named += [(f"counters/{v.name}", v) for v in (self.skipped_steps, self.consecutive_skips)]
        if self.accumulation is not None:
            named += self.accumulation.shared_variables
        return named

    def local_variables(self) -> list[tuple[str, tf.Variable]]:
        """The step's rank-local state: each rank's accumulation sums (empty without accumulation)."""
        return [] if self.accumulation is None else self.accumulation.local_variables

    def broadcast_initial_state(self, model: keras.Model, *, extra: Sequence[tuple[str, tf.Variable]] = ()) -> None:
        """Builds everything, checks that ranks agree on its structure, then broadcasts rank 0's state once.

        Sends the model's variables (weights and, e.g., BatchNorm statistics), the optimizer's,
        the clip state, the counters and `extra` (named variables of the caller's, such as a
        loop's counters). Then each rank folds its rank into the model's seed-generator states, so
        Dropout and other random layers draw different masks on each rank (rank 0 keeps rank 0's
        state, so a checkpoint holds the broadcast seed). Each rank's accumulation sums are its
        own and are not sent. Call it on every rank, once, before the first step.

        Raises:
            RankMismatchError: on every rank, if ranks built different models or optimizers
                (the broadcast would hang or silently mis-assign).
            CheckpointError: on every rank, if a restored state is inside an accumulation window
                but some rank holds no sums of its own for it.
        """
        require_initialized("Clipper.broadcast_initial_state")
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
        extra = _checked_named_variables("extra", extra)
        if not model.built or not model.trainable_variables:
            raise ValueError(
                f"`model` {model.name!r} is not built yet or has no trainable variables; call it on a batch or "
                "`model.build(input_shape)` first."
            )
        self.build(model.trainable_variables)
        named = [(f"model/{v.path}", tv) for v, tv in zip(model.variables, as_tf_variables(model.variables))]
        named += self.named_variables() + list(extra)
        with default_watchdog().section("the start-up structure check and broadcast"):
            # A structure mismatch would make the broadcast hang or silently mis-assign: check first.
            consistency.check_same_structure(named)
            collectives.broadcast_from_root([variable for _, variable in named])
            self._check_window_owners()
        _fold_rank_into_seed_generators(model, hvd.rank())
        self.broadcast_count += 1

    def _check_window_owners(self) -> None:
        """Inside an accumulation window (after a restore), every rank must hold its own sums."""
        acc = self.accumulation
        if acc is None or int(acc.micro_step.numpy()) == 0:  # The counter was just broadcast: one branch for all.
            return
        missing = collectives.allgather_int64([int(acc.owner.numpy()) != hvd.rank()], "window_owners")
        if missing.any():
            ranks = [rank for rank, flag in enumerate(missing.tolist()) if flag]
            raise CheckpointError(
                f"The restored state is inside a gradient-accumulation window (micro-step "
                f"{int(acc.micro_step.numpy())} of {acc.steps}), but rank(s) {ranks} did not restore their own partial "
                "sums, so the window's gradient would be wrong. Each rank's sums are its own: restore a checkpoint "
                "that holds every rank's (hvdclip.CheckpointSaver does; give Keras' BackupAndRestore one backup_dir "
                "per rank), or one taken at the end of a window."
            )

    # ------------------------------------------------------------------ the step, in order

    def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
        """The loss to differentiate: scaled up under mixed precision to avoid float16 underflow."""
        return self.optimizer.scale_loss(loss) if self.loss_scaling else loss

    def step(self, local_grads: Sequence, variables: Sequence, *, has_data: Any = None) -> dict[str, tf.Tensor]:
        """The whole step on this rank's local gradient: `prepare`, then `finish`.

        Args:
            local_grads: this rank's gradient of the (scaled) loss, aligned with `variables`.
            variables: the trainable variables (Keras 3 variables are fine).
            has_data: optional bool scalar: this rank has a batch for the next step. The ranks'
                answers ride in the gradient allreduce; `all_have_data` in the report is True
                on every rank only if every rank has one.

        Returns:
            The report: the `REPORT` scalars, the same on every rank. Call it inside a compiled
            function.
        """
        return self.finish(self.prepare(local_grads, variables, has_data=has_data), variables)

    def prepare(self, local_grads: Sequence, variables: Sequence, *, has_data: Any = None) -> Prepared:
        """Reduce, unscale, merge sparse rows, clip (or, on an accumulation micro-step, add to the sums)."""
        self.require_built()
        if foreign.in_xla_context():
            raise HvdClipError(
                "hvdclip's step is being traced inside tf.function(jit_compile=True), but its gradient reduction is a "
                "Horovod collective, which XLA cannot compile here (hvdclip.keras.xla says why). Decorate the training "
                "step with plain @tf.function; XLA can still compile a function that holds no hvdclip or Horovod call."
            )
        local_grads, variables = list(local_grads), list(variables)
        flags = [] if has_data is None else [tf.logical_not(tf.cast(has_data, tf.bool))]
        acc = self.accumulation
        if acc is None:
            return self._reduce_and_clip(local_grads, variables, flags)
        return tf.cond(
            acc.closes_window(),
            lambda: self._reduce_and_clip(acc.window_gradient(local_grads), variables, flags),
            lambda: self._micro_step(local_grads),
        )

    def finish(self, prepared: Prepared, variables: Sequence, grads: Sequence | None = None) -> dict[str, tf.Tensor]:
        """Guard, then apply: the clipped gradient (or `grads`, the caller's change of it) and the clip state.

        Skips the step on every rank if the reduced gradient had a NaN or Inf. Returns the report.
        """
        grads = prepared.grads if grads is None else list(grads)
        variables = list(variables)
        acc = self.accumulation
        if acc is None:
            return self._guard_and_apply(prepared, grads, variables)

        def window_step() -> dict[str, tf.Tensor]:
            report = self._guard_and_apply(prepared, grads, variables)
            with tf.control_dependencies(tf.nest.flatten(report)):  # After the apply read the sums.
                acc.reset()
            return report

        return tf.cond(prepared.synced, window_step, lambda: self._report(prepared, tf.constant(False)))

    def require_built(self) -> None:
        if not self.built:
            raise HvdClipError(
                "The clipper's state does not exist yet, so ranks would start from different weights: call "
                "`clipper.broadcast_initial_state(model)` once on every rank before the first step."
            )

    def _reduce_and_clip(self, grads: list, variables: list, flags: list) -> Prepared:
        return reduce_and_clip(
            grads, variables, self.reduction, self.transform if self.clipping else None, self.clip_state,
            flags=flags, marker=self.marker, step=tf.convert_to_tensor(self.applier.iterations) + 1,
            inverse_scale=1.0 / self.optimizer.dynamic_scale if self.loss_scaling else None,
        )  # fmt: skip

    def _micro_step(self, local_grads: list) -> Prepared:
        """An accumulation micro-step: this rank's gradient joins its sums; nothing to apply."""
        self.accumulation.add(local_grads, hvd.rank())  # Stateful: the compiled step runs it.
        nan = tf.constant(float("nan"), tf.float32)
        zeros = [None if g is None else tf.zeros_like(tf.convert_to_tensor(g)) for g in local_grads]
        state = tf.nest.map_structure(tf.convert_to_tensor, self.clip_state)
        prepared = Prepared(
            zeros, state, tf.constant(True), tf.constant(False), tf.constant(True),
            {"grad_norm": nan, "clipped_grad_norm": nan, "clip_active": tf.constant(False)},
        )  # fmt: skip
        return prepared

    def _guard_and_apply(self, prepared: Prepared, grads: list, variables: list) -> dict[str, tf.Tensor]:
        """Applies the step and stores the clip state, or skips it on every rank (NaN/Inf)."""

        def apply() -> tf.Tensor:
            self.applier.apply_gradients(zip(grads, variables))
            tf.nest.map_structure(lambda var, value: var.assign(value), self.clip_state, prepared.clip_state)
            self.consecutive_skips.assign(0)
            if self.loss_scaling:
                self._grow_loss_scale()
            return tf.constant(False)

        def skip() -> tf.Tensor:
            if hvd.rank() == 0:  # Logged once per job, by rank 0, without a host sync.
                tf.print(
                    "hvdclip: skipped a step because the reduced gradient had NaN/Inf; skipped so far:",
                    self.skipped_steps + 1,
                    output_stream=sys.stderr,
                )
            self.skipped_steps.assign_add(1)
            self.consecutive_skips.assign_add(1)
            if self.loss_scaling:
                self.optimizer.step_counter.assign(0)
                self.optimizer.dynamic_scale.assign(self.optimizer.dynamic_scale * 0.5)
            return tf.constant(True)

        if self.skip_nonfinite or self.loss_scaling:
            skipped = tf.cond(prepared.finite, apply, skip)
        else:
            skipped = apply()
        self.all_have_data.assign(prepared.all_have_data)  # Stateful: the compiled step runs it.
        return self._report(prepared, skipped)

    @staticmethod
    def _report(prepared: Prepared, skipped: tf.Tensor) -> dict[str, tf.Tensor]:
        return {**prepared.metrics, "skipped": skipped, "synced": prepared.synced, "all_have_data": prepared.all_have_data}

    def _grow_loss_scale(self) -> None:
        """Keras' dynamic loss scaling: double the scale after `dynamic_growth_steps` finite steps."""
        lso = self.optimizer
        grow = tf.equal(lso.step_counter, lso.dynamic_growth_steps - 1)
        lso.step_counter.assign(tf.where(grow, tf.zeros_like(lso.step_counter), lso.step_counter + 1))
        lso.dynamic_scale.assign(tf.where(grow, lso.dynamic_scale * 2.0, lso.dynamic_scale))
