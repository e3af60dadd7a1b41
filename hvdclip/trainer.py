"""`HvdClipTrainer`: Horovod data-parallel training that clips the globally reduced gradient.

One step, compiled once with `tf.function`, in the order the math happens:

    loss under a tape -> Horovod allreduce (average) -> clip stage -> optimizer.apply_gradients

Rank 0's model, optimizer and clip state reach every rank by one broadcast before step 1; the
step itself never broadcasts. Because clipping follows the allreduce, every rank clips the same
gradient the same way, so ranks stay bit-identical without re-broadcasting weights.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import horovod.tensorflow as hvd
import keras
import tensorflow as tf

from hvdclip import consistency, horovod_bridge, runtime
from hvdclip.checkpoint import read as read_checkpoint
from hvdclip.data import InputPlan, check_batch
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip.errors import CheckpointError, NonFiniteGradientError
from hvdclip.evaluation import Evaluator, check_metrics
from hvdclip.fit_state import FitState
from hvdclip.fitting import fit as run_fit
from hvdclip.gradients import dedupe, global_norm, scale, sum_of_squares
from hvdclip.rank_zero import on_rank_zero, writable_directory
from hvdclip.transforms.base import GradientTransform, check_transform, identity
from hvdclip.transforms.report import update_and_report
from hvdclip.validation import check_bool, check_callable, check_int, check_path

__all__ = ["HvdClipTrainer", "History"]


@dataclass
class History:
    """What `fit` returns: per-epoch means of each step metric, like Keras' `History.history`."""

    history: dict[str, list[float]] = field(default_factory=dict)
    epochs: list[int] = field(default_factory=list)


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


class HvdClipTrainer:
    """Trains a Keras 3 model with Horovod, clipping the reduced gradient identically on every rank.

    Args:
        model: a `keras.Model` (Keras 3, TensorFlow backend).
        optimizer: a Keras 3 optimizer. Give clipping to `clip=`, not to the optimizer's
            `clipnorm`/`clipvalue`/`global_clipnorm`, which would run before hvdclip can see it.
        loss_fn: `loss_fn(y_true, y_pred) -> scalar` (a per-example vector is averaged).
        clip: a `GradientTransform` such as `hvdclip.clip_by_global_norm(1.0)`, run on the
            reduced gradient; `None` applies the gradient unclipped.
        skip_nonfinite: skip the optimizer step on every rank when the reduced gradient has a
            NaN or Inf (the decision follows the allreduce, so it is the same everywhere).
        max_consecutive_skips: with `skip_nonfinite`, raise `NonFiniteGradientError` once this
            many steps in a row were skipped; `None` never raises.
        sparse_as_dense: allreduce embedding gradients as dense tensors instead of allgathering
            their rows.
        compression: `"fp16"` halves allreduce traffic (gradients are cast back after); `None`.
        check_consistency_every: every this many steps, allgather one checksum of the weights and
            raise `RankMismatchError` if ranks have drifted apart; `None` never checks.
        accumulation_steps: sum the local gradients of this many consecutive `train_step` calls
            (micro-batches), then allreduce, clip and apply once. The calls in between report only
            `loss`.

    Mixed precision: with `keras.mixed_precision.set_global_policy("mixed_float16")` and a
    `keras.optimizers.LossScaleOptimizer`, the step scales the loss, allreduces, *unscales*, then
    clips, and applies with the inner optimizer. An overflowing step is skipped on every rank and
    the loss scale halved, whatever `skip_nonfinite` says.

    Example:
        >>> hvdclip.init()
        >>> trainer = HvdClipTrainer(model, keras.optimizers.Adam(1e-3),
        ...                          keras.losses.MeanSquaredError(),
        ...                          clip=hvdclip.clip_by_global_norm(1.0))
        >>> history = trainer.fit(dataset, epochs=3)
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss_fn: Callable[[Any, Any], Any],
        clip: GradientTransform | None = None,
        *,
        skip_nonfinite: bool = True,
        max_consecutive_skips: int | None = None,
        sparse_as_dense: bool = False,
        compression: str | None = None,
        accumulation_steps: int = 1,
        check_consistency_every: int | None = None,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
        if model.built and not model.trainable_variables:
            raise ValueError(f"`model` has no trainable variables (is it frozen?). Received: model={model.name!r}")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"`optimizer` must be a Keras 3 optimizer such as keras.optimizers.Adam(). Received: optimizer={optimizer!r}"
            )
        self._loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # The optimizer that applies the (unscaled, clipped) gradient.
        self._applier = optimizer.inner_optimizer if self._loss_scaling else optimizer
        for keyword in ("clipnorm", "clipvalue", "global_clipnorm"):
            value = getattr(optimizer, keyword, None) or getattr(self._applier, keyword, None)
            if value is not None:
                raise ValueError(
                    f"`optimizer` clips by itself ({keyword}={value!r}), which would clip "
                    "the gradient a second time; pass clipping as `clip=` instead, e.g. "
                    "clip=hvdclip.clip_by_global_norm(1.0)."
                )
        check_callable("loss_fn", loss_fn)
        check_transform("clip", clip, optional=True)
        self._skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        if max_consecutive_skips is not None:
            check_int("max_consecutive_skips", max_consecutive_skips, ge=1)
        self._max_consecutive_skips = max_consecutive_skips
        self._sparse_as_dense = check_bool("sparse_as_dense", sparse_as_dense)
        self._compression = horovod_bridge.compression_for(compression)
        self._accumulation_steps = check_int("accumulation_steps", accumulation_steps, ge=1)
        if check_consistency_every is not None:
            check_int("check_consistency_every", check_consistency_every, ge=1)
        self._check_every = check_consistency_every
        self._calls = 0
        runtime.require_initialized("HvdClipTrainer")

        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.clip = clip if clip is not None else identity()
        self._clipping = clip is not None

        self._built = False
        self._started = False
        self._broadcast_count = 0
        self._clip_state: Any = ()
        self._accumulators: list[tf.Variable] = []
        self._micro_step = 0  # Calls since the last optimizer step, with accumulation_steps > 1.
        self._compiled_step = tf.function(self._step, reduce_retracing=True)
        self._compiled_accumulate = tf.function(self._accumulate, reduce_retracing=True)
        self._compiled_accumulated_step = tf.function(self._accumulated_step, reduce_retracing=True)
        # fit's versions of the same three: each also counts the step and adds its metrics to the
        # epoch's sums, so fit runs no eager op per step. train_step's do not: `global_step` counts fit's steps.
        self._recorded = tuple(self._recording(step) for step in (self._step, self._accumulate, self._accumulated_step))
        self._compiled_checksum = tf.function(
            lambda: consistency.weights_checksum(horovod_bridge.as_tf_variables(self.model.variables))
        )
        # Counters live in variables so that a compiled step can update them without a host sync.
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_skipped_steps")
        self._consecutive_skips = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_consecutive_skips")
        self._fit_state = FitState()  # fit's step/epoch counters and shuffle RNG, broadcast and checkpointed.

    # ------------------------------------------------------------------ start-up

    @property
    def broadcast_count(self) -> int:
        """How many times state was broadcast from rank 0 (1 after start-up, never more)."""
        return self._broadcast_count

    @property
    def clip_state(self) -> Any:
        """The clip transform's state, as the nest of `tf.Variable`s the trainer owns."""
        return self._clip_state

    def _named_state_variables(self) -> list[tuple[str, tf.Variable]]:
        """Everything that must be identical on every rank, named, as Horovod-ready `tf.Variable`s."""
        named = [(f"model/{v.path}", tv) for v, tv in zip(self.model.variables, horovod_bridge.as_tf_variables(self.model.variables))]
        named += [
            (f"optimizer/{v.path}", tv)
            for v, tv in zip(self.optimizer.variables, horovod_bridge.as_tf_variables(self.optimizer.variables))
        ]
        named += [(f"clip_state[{i}]", v) for i, v in enumerate(tf.nest.flatten(self._clip_state))]
        named += [(f"counters/{v.name}", v) for v in [self.skipped_steps, self._consecutive_skips, *self._fit_state.variables]]
        return named

    def _state_variables(self) -> list[tf.Variable]:
        return [variable for _, variable in self._named_state_variables()]

    def _build(self, x: Any = None) -> None:
        """Creates every variable (model weights, optimizer slots, clip state); no communication.

        `x` is a sample batch, needed only for a subclassed model that creates its weights on
        first call. Idempotent.
        """
        if self._built:
            return
        if not self.model.built or not self.model.trainable_variables:
            if x is None:
                raise ValueError(
                    f"`model` {self.model.name!r} is not built yet; call it on a batch or `model.build(shape)` first."
                )
            self.model(x, training=False)
        if not self.model.trainable_variables:
            raise ValueError(f"`model` has no trainable variables. Received: model={self.model.name!r}")
        # Slots must exist before the broadcast, or rank 0's optimizer state could never reach the others.
        self.optimizer.build(self.model.trainable_variables)
        self._clip_state = tf.nest.map_structure(
            lambda t: tf.Variable(t, trainable=False), self.clip.init(self.model.trainable_variables)
        )
        if self._accumulation_steps > 1:
            # Dense sums of local gradients; they start at zero on every rank, so need no broadcast.
            self._accumulators = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="hvdclip_accumulator")
                for v in horovod_bridge.as_tf_variables(self.model.trainable_variables)
            ]
        self._built = True

    def _start(self, x: Any) -> None:
        """Builds every variable, then broadcasts rank 0's state exactly once."""
        if self._started:
            return
        self._build(x)
        with default_watchdog().section("the start-up structure check and broadcast"):
            # A structure mismatch would make the broadcast hang or silently mis-assign: check first.
            consistency.check_same_structure(self._named_state_variables())
            horovod_bridge.broadcast_from_root(self._state_variables())
        self._broadcast_count += 1
        self._started = True

    # ------------------------------------------------------------------ the step

    def _loss(self, x: Any, y: Any) -> tf.Tensor:
        y_pred = self.model(x, training=True)
        loss = tf.reduce_mean(self.loss_fn(y, y_pred))
        if self.model.losses:
            loss = loss + tf.add_n([tf.cast(extra, loss.dtype) for extra in self.model.losses])
        return loss

    def _scaled(self, loss: tf.Tensor) -> tf.Tensor:
        """The loss the tape differentiates: scaled up under mixed precision to avoid underflow."""
        return self.optimizer.scale_loss(loss) if self._loss_scaling else loss

    def _unscaled(self, grads: list) -> list:
        if not self._loss_scaling:
            return grads
        inverse = 1.0 / self.optimizer.dynamic_scale
        return [scale(g, inverse) for g in grads]

    def _step(self, x: Any, y: Any) -> dict[str, tf.Tensor]:
        """One optimizer step: gradient -> allreduce -> unscale -> clip -> apply."""
        loss, local = self._local_gradients(x, y)
        grads = self._allreduce(local)
        return self._clip_and_apply(loss, self._unscaled(grads))

    def _allreduce(self, grads: list) -> list:
        # DistributedGradientTape's reduction, with collectives named by position (see allreduce_gradients).
        return horovod_bridge.allreduce_gradients(
            grads, compression=self._compression, sparse_as_dense=self._sparse_as_dense
        )

    def _local_gradients(self, x: Any, y: Any) -> tuple[tf.Tensor, list]:
        with tf.GradientTape() as tape:
            loss = self._loss(x, y)
            scaled_loss = self._scaled(loss)
        return loss, tape.gradient(scaled_loss, horovod_bridge.as_tf_variables(self.model.trainable_variables))

    def _accumulate(self, x: Any, y: Any) -> dict[str, tf.Tensor]:
        """A micro-batch before the last of an accumulation window: local work only, no allreduce."""
        loss, grads = self._local_gradients(x, y)
        for accumulator, grad in zip(self._accumulators, grads):
            if grad is not None:
                accumulator.assign_add(tf.convert_to_tensor(grad))
        return {"loss": loss}

    def _accumulated_step(self, x: Any, y: Any) -> dict[str, tf.Tensor]:
        """The window's last micro-batch: mean of the k local gradients -> allreduce -> unscale -> clip -> apply."""
        loss, grads = self._local_gradients(x, y)
        k = float(self._accumulation_steps)
        means = [
            None if grad is None else (accumulator + tf.convert_to_tensor(grad)) / tf.cast(k, accumulator.dtype)
            for accumulator, grad in zip(self._accumulators, grads)
        ]
        reduced = self._allreduce(means)
        for accumulator in self._accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        return self._clip_and_apply(loss, self._unscaled(reduced))

    def _clip_and_apply(self, loss: tf.Tensor, grads: list) -> dict[str, tf.Tensor]:
        """Clips the reduced (unscaled) gradient and applies it, or skips the step on NaN/Inf.

        Everything here follows the allreduce, so every rank takes the same branch.
        """
        variables = self.model.trainable_variables
        # Horovod allgathers sparse rows, so an embedding row touched on two ranks arrives twice.
        # Merge repeats once here: Keras 3 optimizers apply element-wise ops (Adam squares the
        # gradient) to IndexedSlices values without merging, which would square the parts, not the sum.
        grads = [dedupe(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        squares = sum_of_squares(grads)
        grad_norm = tf.sqrt(squares)
        finite = tf.math.is_finite(squares)

        if self._clipping:
            clipped, new_clip_state, report = update_and_report(self.clip, list(grads), self._clip_state, variables)
            if report is not None:  # The transform's own account: no extra pass over the gradients.
                clipped_norm = grad_norm if report.norm is None else report.norm
                clip_active = report.active
            else:
                clipped_norm = global_norm(clipped)
                # "Changed any element", not "norm went down": two norms of equal tensors computed
                # in differently fused graphs can differ in the last bit.
                clip_active = tf.reduce_any([_changed(a, b) for a, b in zip(grads, clipped) if a is not None])
            # NaN != NaN would count a non-finite gradient as clipped: nothing was (see `skipped`).
            clip_active = tf.logical_and(finite, clip_active)
        else:
            clipped, new_clip_state, clipped_norm, clip_active = grads, self._clip_state, grad_norm, tf.constant(False)

        def apply() -> tf.Tensor:
            self._applier.apply_gradients(zip(clipped, variables))
            tf.nest.map_structure(lambda var, value: var.assign(value), self._clip_state, new_clip_state)
            self._consecutive_skips.assign(0)
            if self._loss_scaling:
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
            self._consecutive_skips.assign_add(1)
            if self._loss_scaling:
                self.optimizer.step_counter.assign(0)
                self.optimizer.dynamic_scale.assign(self.optimizer.dynamic_scale * 0.5)
            return tf.constant(True)

        guarded = self._skip_nonfinite or self._loss_scaling
        skipped = tf.cond(finite, apply, skip) if guarded else apply()
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "clipped_grad_norm": clipped_norm,
            "clip_active": clip_active,
            "skipped": skipped,
        }

    def _grow_loss_scale(self) -> None:
        """Keras' dynamic loss scaling: double the scale after `dynamic_growth_steps` finite steps."""
        lso = self.optimizer
        grow = tf.equal(lso.step_counter, lso.dynamic_growth_steps - 1)
        lso.step_counter.assign(tf.where(grow, tf.zeros_like(lso.step_counter), lso.step_counter + 1))
        lso.dynamic_scale.assign(tf.where(grow, lso.dynamic_scale * 2.0, lso.dynamic_scale))

    def _recording(self, step: Callable) -> Callable:
        """`step` then `FitState.record_step` (count it, sum its metrics), compiled as one function."""

        def recorded(x: Any, y: Any) -> dict[str, tf.Tensor]:
            metrics = step(x, y)
            self._fit_state.record_step(metrics)
            return metrics

        return tf.function(recorded, reduce_retracing=True)

    def _run_step(self, x: Any, y: Any, *, record: bool = False) -> dict[str, tf.Tensor]:
        """One step (or micro-batch); with `record` (from fit), the compiled step also does fit's bookkeeping."""
        self._start(x)
        compiled = (self._compiled_step, self._compiled_accumulate, self._compiled_accumulated_step)
        step, accumulate, accumulated_step = self._recorded if record else compiled
        # A lost peer ends the rank instead of hanging it; the first step also traces and compiles.
        with default_watchdog().section(f"step {self._calls + 1}", compiling=self._calls == 0):
            if self._accumulation_steps == 1:
                metrics = step(x, y)
            else:
                self._micro_step += 1
                if self._micro_step < self._accumulation_steps:
                    return accumulate(x, y)
                self._micro_step = 0
                metrics = accumulated_step(x, y)
        if self._max_consecutive_skips is not None and self._skip_nonfinite:
            consecutive = int(self._consecutive_skips.numpy())
            if consecutive >= self._max_consecutive_skips:
                # Every rank reads the same counter after the same allreduce, so all raise together.
                raise NonFiniteGradientError(
                    f"The reduced gradient was NaN/Inf on {consecutive} consecutive steps "
                    f"(max_consecutive_skips={self._max_consecutive_skips}). Lower the learning rate, "
                    "check the input data for NaN/Inf, or clip harder."
                )
        self._calls += 1
        if self._check_every is not None and self._calls % self._check_every == 0:
            consistency.check_same_weights(self._compiled_checksum(), self._calls)
        return metrics

    def train_step(self, x: Any, y: Any) -> dict[str, float | bool]:
        """Runs one step on this rank's batch `(x, y)` and returns its metrics as Python values.

        `loss` is this rank's loss; `grad_norm` (before clipping) and `clipped_grad_norm` are
        norms of the reduced gradient, identical on every rank; `clip_active` says the clip stage
        clipped (False on a non-finite gradient); `skipped` says the step was skipped for a
        non-finite gradient.
        """
        check_batch(x, y)
        metrics = self._run_step(x, y)
        return {name: (bool(value) if value.dtype == tf.bool else float(value)) for name, value in metrics.items()}

    # ------------------------------------------------------------------ fit

    def _agreed_steps(self, dataset: tf.data.Dataset, steps_per_epoch: int | None) -> int:
        """Steps per epoch that every rank can run, so no rank waits in an allreduce forever."""
        cardinality = int(dataset.cardinality())
        known = cardinality >= 0
        if steps_per_epoch is None and not known:
            raise ValueError(
                "`dataset` has unknown or infinite length, so ranks cannot agree on when an epoch ends. "
                "Pass `steps_per_epoch`, or declare the length with "
                f"dataset.apply(tf.data.experimental.assert_cardinality(n)). Received: cardinality={cardinality}"
            )
        if not known:
            return steps_per_epoch
        local = cardinality if steps_per_epoch is None else min(cardinality, steps_per_epoch)
        agreed = int(hvd.allreduce(tf.constant(local, tf.int64), op=hvd.Min, name="hvdclip_steps_per_epoch"))
        return agreed

    def fit(
        self,
        dataset: tf.data.Dataset,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        *,
        batch_size: int | None = None,
        shuffle_buffer: int | None = None,
        shard: bool = True,
        validation_data: tf.data.Dataset | None = None,
        validation_metrics: list[keras.metrics.Metric] | None = None,
        callbacks: list[Any] | None = None,
        verbose: int = 1,
    ) -> History:
        """Trains for `epochs` epochs; call it on every rank with the same arguments.

        Each epoch, every rank takes its shard of `dataset`, shuffles it, batches it, and runs the
        same number of steps: the shortest shard's, capped by `steps_per_epoch`.

        Args:
            dataset: a `tf.data.Dataset` of `(x, y)` batches, or of single examples with
                `batch_size`. Every rank must build it in the same order for sharding to split it.
            epochs: epochs to train (>= 1). After `restore`, the epochs the checkpoint had done
                count too, so the same call finishes the interrupted run.
            steps_per_epoch: cap on steps per epoch; required if the dataset's length is unknown.
            batch_size: batch single examples into batches of this many per rank (the global
                batch is `batch_size * size`), dropping each rank's last, smaller batch.
            shuffle_buffer: shuffle each rank's shard every epoch with a buffer of this many
                elements; the seeds come from an RNG that is broadcast and checkpointed (and
                `tf.data` mixes in TensorFlow's global seed, so set that the same way on resume).
            shard: split `dataset` (and `validation_data`) over ranks, each keeping every
                `size`-th element from its rank on. False when each rank already reads its own part.
            validation_data: evaluated after each epoch, sharded the same way: `val_loss` and each
                `validation_metrics` entry, exact over all ranks' examples however they split.
            validation_metrics: Keras metrics such as `keras.metrics.SparseCategoricalAccuracy()`,
                reported as `val_<name>`.
            callbacks: `hvdclip.Callback` objects, run on every rank (`hvdclip.EarlyStopping`,
                `hvdclip.TensorBoard`, `hvdclip.CheckpointSaver`, or your own).
            verbose: 0 silent, 1 a progress bar, 2 one line per epoch; rank 0 only.

        Returns:
            A `History` whose `.history` maps each metric to its per-epoch values, averaged over the
            epoch's steps and over ranks (`clip_active` is the fraction of steps that clipped).
        """
        history = History()
        run_fit(
            self,
            dataset,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            shard=shard,
            validation_data=validation_data,
            validation_metrics=validation_metrics,
            callbacks=callbacks,
            verbose=verbose,
            history=history,
        )
        return history

    def evaluate(
        self,
        dataset: tf.data.Dataset,
        *,
        metrics: list[keras.metrics.Metric] | None = None,
        batch_size: int | None = None,
        shard: bool = True,
    ) -> dict[str, float]:
        """The model's loss and `metrics` on `dataset`, over all ranks; call it on every rank.

        Each rank evaluates its shard (all of `dataset` with `shard=False`); sums and counts are
        allreduced, so the result is the exact mean over every rank's examples, identical on every
        rank, even when the shards differ in length.

        Example:
            >>> trainer.evaluate(test, metrics=[keras.metrics.SparseCategoricalAccuracy()])
            {'loss': 0.061, 'sparse_categorical_accuracy': 0.983}
        """
        runtime.require_initialized("HvdClipTrainer.evaluate")
        plan = InputPlan.checked(
            "dataset", dataset, rank=hvd.rank(), size=hvd.size(), shard=shard, batch_size=batch_size, drop_remainder=False
        )
        evaluate = Evaluator(self, check_metrics("metrics", metrics))
        self._start_on(plan)
        return evaluate(plan.for_epoch())

    def _start_on(self, plan: InputPlan) -> None:
        """Starts (builds, then the one broadcast) with a sample batch from `plan` if not started yet."""
        if not self._started:
            self._start(plan.sample_batch())

    @property
    def global_step(self) -> tf.Variable:
        """Steps `fit` has run over this trainer's life (skipped steps included); checkpointed."""
        return self._fit_state.global_step

    # ------------------------------------------------------------------ checkpoints and export

    def restore(self, path: str, *, missing_ok: bool = False) -> int:
        """Restores a checkpoint written by `hvdclip.CheckpointSaver`; call it on every rank before `fit`.

        Rank 0 reads the checkpoint (the latest one in directory `path`, or the checkpoint prefix
        `path`); the start-up broadcast then gives every rank its state, so other ranks need no
        access to the files. The next `fit` continues where the checkpoint was taken, mid-epoch
        included, and gives the same weights as a run that was never interrupted.

        Args:
            path: a checkpoint directory, or a prefix such as `"ckpts/ckpt-120"`.
            missing_ok: if there is no checkpoint, return 0 instead of raising: for a job script
                that resumes when it can.

        Returns:
            The global step the checkpoint was taken at (0 if none was found and `missing_ok`).

        Raises:
            CheckpointError: on every rank, if the checkpoint is missing, unreadable or does not
                fit this trainer (naming the first variable that differs), or training has
                already started.
        """
        check_path("path", path, "a checkpoint directory or prefix")
        check_bool("missing_ok", missing_ok)
        runtime.require_initialized("HvdClipTrainer.restore")
        if self._started:
            raise CheckpointError(
                "restore() must come before the first training step: the start-up broadcast has already "
                "sent this trainer's state to every rank. Create the trainer, restore, then fit."
            )
        self._build()
        named = self._named_state_variables()

        def read() -> int | None:
            if read_checkpoint(named, path, missing_ok=missing_ok) is None:
                return None
            return int(self._fit_state.global_step.numpy())

        # Only rank 0 holds the restored values until the start-up broadcast sends them to the others.
        step = on_rank_zero(read, name="restore")
        if step is None:
            return 0
        self._fit_state.resume_pending = True
        return step

    def save(self, path: str) -> None:
        """Writes the model as a Keras `.keras` file, on rank 0 only; call it on every rank.

        If rank 0 cannot write `path`, every rank raises `OutputDirectoryError`.
        """
        path = check_path("path", path, "a file name ending in '.keras'")
        if not path.endswith(".keras"):
            raise ValueError(f"`path` must be a file name ending in '.keras'. Received: path={path!r}")

        def write() -> None:
            writable_directory(os.path.dirname(path) or ".", "path")
            self.model.save(path)

        on_rank_zero(write, name="save_model")
