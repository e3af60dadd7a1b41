"""The one step every door runs, in the order the math happens, and the start-up broadcast.

    local gradient (the caller's tape)
      -> reduce: average over ranks (Horovod's DistributedGradientTape reduction, positional names)
      -> unscale (mixed precision: divide by the loss scale)
      -> merge repeated sparse rows
      -> clip: the clip transform, on the reduced gradient, identical on every rank
      -> guard: skip the step on every rank if the reduced gradient has a NaN/Inf
      -> apply: the optimizer's update, then the clip state's

Everything after `reduce` works on numbers that are the same on every rank, so every rank clips
the same way and takes the same branch: ranks stay bit-identical with one broadcast at start-up
(`Clipper.broadcast_initial_state`) and none per step.

`Clipper` holds what the step needs between steps: the optimizer, the clip transform and its
state, and the skip counters. It is made once, outside any compiled function. The three doors use
it: `hvdclip.DistributedGradientTape` (your own loop), `hvdclip.keras.DistributedOptimizer`
(Keras `fit`) and `HvdClipTrainer`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

from hvdclip.distributed import consistency
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.distributed import collectives
from hvdclip.distributed.reduction import GradientReduction
from hvdclip.distributed.runtime import require_initialized
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip.gradients import dedupe, global_norm, scale, sum_of_squares
from hvdclip.transforms.base import GradientTransform, apply_transform, check_transform, identity
from hvdclip.validation import check_bool

__all__ = ["Clipper", "Clipped"]

_CLIP_KEYWORDS = ("clipnorm", "clipvalue", "global_clipnorm")


class Clipped(NamedTuple):
    """The reduced gradient after the clip stage, and what `Clipper.apply` needs to finish the step.

    Attributes:
        grads: the clipped gradient list (`None` where the variable got no gradient).
        clip_state: the clip transform's new state, stored only if the step is applied.
        finite: a bool scalar: the reduced gradient had no NaN/Inf (the same on every rank).
        metrics: `grad_norm` (before clipping), `clipped_grad_norm` and `clip_active`, scalars.
    """

    grads: list
    clip_state: Any
    finite: tf.Tensor
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
        skip_nonfinite: skip the optimizer step on every rank when the reduced gradient has a
            NaN or Inf. Always on with a `LossScaleOptimizer` (an overflow halves the scale).
        compression, sparse_as_dense, op, gradient_predivide_factor, groups: how gradients are
            reduced (`hvdclip.distributed.reduction.GradientReduction`, Horovod's options).

    Example (your own loop; see `hvdclip.DistributedGradientTape`):
        >>> clipper = hvdclip.Clipper(keras.optimizers.Adam(1e-3), hvdclip.clip_by_global_norm(1.0))
        >>> clipper.broadcast_initial_state(model)   # once, before the first step
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        clip: GradientTransform | None = None,
        *,
        skip_nonfinite: bool = True,
        compression: str | None = None,
        sparse_as_dense: bool = False,
        op: str = "average",
        gradient_predivide_factor: float = 1.0,
        groups: int = 1,
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
        self.optimizer = optimizer
        self.clipping = clip is not None
        self.transform = clip if clip is not None else identity()
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self.reduction = GradientReduction(
            compression=compression,
            sparse_as_dense=sparse_as_dense,
            op=op,
            gradient_predivide_factor=gradient_predivide_factor,
            groups=groups,
        )
        self.clip_state: Any = ()
        # Counters live in variables so that a compiled step updates them without a host sync.
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_skipped_steps")
        self.consecutive_skips = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_consecutive_skips")
        self.built = False
        self.broadcast_count = 0

    # ------------------------------------------------------------------ state and start-up

    def build(self, trainable_variables: Sequence) -> None:
        """Creates the optimizer's slots and the clip state (no communication). Idempotent."""
        if self.built:
            return
        trainable_variables = list(trainable_variables)
        if not trainable_variables:
            raise ValueError("`trainable_variables` is empty: there is nothing to train (is the model frozen?).")
        if not self.optimizer.built:
            # Slots must exist before the broadcast, or rank 0's optimizer state could never reach the others.
            self.optimizer.build(trainable_variables)
        self.clip_state = tf.nest.map_structure(
            lambda t: tf.Variable(t, trainable=False), self.transform.init(trainable_variables)
        )
        self.built = True

    def named_variables(self) -> list[tuple[str, tf.Variable]]:
        """The step's own state, named: optimizer, clip state and skip counters (all identical on every rank)."""
        named = [(f"optimizer/{v.path}", tv) for v, tv in zip(self.optimizer.variables, as_tf_variables(self.optimizer.variables))]
        named += [(f"clip_state[{i}]", v) for i, v in enumerate(tf.nest.flatten(self.clip_state))]
        named += [(f"counters/{v.name}", v) for v in (self.skipped_steps, self.consecutive_skips)]
        return named

    def broadcast_initial_state(self, model: keras.Model, *, extra: Sequence[tuple[str, tf.Variable]] = ()) -> None:
        """Builds everything, checks that ranks agree on its structure, then broadcasts rank 0's state once.

        Sends the model's variables (weights and, e.g., BatchNorm statistics), the optimizer's,
        the clip state, the skip counters and `extra` (named variables of the caller's, such as a
        loop's counters). Then each rank folds its rank into the model's seed-generator states, so
        Dropout and other random layers draw different masks on each rank (rank 0 keeps rank 0's
        state, so a checkpoint holds the broadcast seed). Call it on every rank, once, before the
        first step.

        Raises:
            RankMismatchError: on every rank, if ranks built different models or optimizers
                (the broadcast would hang or silently mis-assign).
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
        _fold_rank_into_seed_generators(model, hvd.rank())
        self.broadcast_count += 1

    # ------------------------------------------------------------------ the step, in order

    def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
        """The loss to differentiate: scaled up under mixed precision to avoid float16 underflow."""
        return self.optimizer.scale_loss(loss) if self.loss_scaling else loss

    def reduce(self, grads: Sequence, variables: Sequence) -> list:
        """Averages local gradients over ranks (`None` stays `None`)."""
        return self.reduction(grads, variables)

    def unscale(self, grads: Sequence) -> list:
        """Divides out the loss scale (mixed precision), so the clip sees the true gradient."""
        if not self.loss_scaling:
            return list(grads)
        inverse = 1.0 / self.optimizer.dynamic_scale
        return [scale(g, inverse) for g in grads]

    def clip(self, grads: Sequence, variables: Sequence) -> Clipped:
        """Merges repeated sparse rows, then runs the clip transform on the reduced, unscaled gradient."""
        # Horovod allgathers sparse rows, so an embedding row touched on two ranks arrives twice.
        # Keras 3 optimizers apply element-wise ops (Adam squares the gradient) to IndexedSlices
        # values without merging, which would square the parts, not the sum: merge once here.
        grads = [dedupe(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        squares = sum_of_squares(grads)
        grad_norm = tf.sqrt(squares)
        finite = tf.math.is_finite(squares)
        if not self.clipping:
            metrics = {"grad_norm": grad_norm, "clipped_grad_norm": grad_norm, "clip_active": tf.constant(False)}
            return Clipped(grads, self.clip_state, finite, metrics)
        result = apply_transform(self.transform, grads, self.clip_state, variables)
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
        return Clipped(result.grads, result.state, finite, metrics)

    def apply(self, clipped: Clipped, variables: Sequence, grads: Sequence | None = None) -> tf.Tensor:
        """Applies the clipped gradient and stores the clip state, or skips the step on NaN/Inf.

        `grads` replaces `clipped.grads` if given (a loop that changes the gradient after clipping).
        Returns `skipped`, a bool scalar, the same on every rank.
        """
        grads = clipped.grads if grads is None else list(grads)
        variables = list(variables)

        def apply() -> tf.Tensor:
            self.applier.apply_gradients(zip(grads, variables))
            tf.nest.map_structure(lambda var, value: var.assign(value), self.clip_state, clipped.clip_state)
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
            return tf.cond(clipped.finite, apply, skip)
        return apply()

    def step(self, local_grads: Sequence, variables: Sequence) -> dict[str, tf.Tensor]:
        """The whole step on this rank's local gradient: reduce, unscale, clip, guard, apply.

        Returns `grad_norm`, `clipped_grad_norm`, `clip_active` and `skipped` (scalars, the same
        on every rank). Call it inside a compiled function.
        """
        variables = list(variables)
        clipped = self.clip(self.unscale(self.reduce(local_grads, variables)), variables)
        skipped = self.apply(clipped, variables)
        return {**clipped.metrics, "skipped": skipped}

    def _grow_loss_scale(self) -> None:
        """Keras' dynamic loss scaling: double the scale after `dynamic_growth_steps` finite steps."""
        lso = self.optimizer
        grow = tf.equal(lso.step_counter, lso.dynamic_growth_steps - 1)
        lso.step_counter.assign(tf.where(grow, tf.zeros_like(lso.step_counter), lso.step_counter + 1))
        lso.dynamic_scale.assign(tf.where(grow, lso.dynamic_scale * 2.0, lso.dynamic_scale))
