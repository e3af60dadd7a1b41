"""`HvdClipTrainer`: door 3, a facade over the core step (`hvdclip.Clipper`) with a `fit` loop.

Its step, compiled once per mode with `tf.function`, is the core's, in the order the math happens:

    loss under a tape -> reduce over ranks -> unscale -> merge sparse rows -> clip -> guard -> apply

Rank 0's model, optimizer, clip state and loop counters reach every rank by one broadcast before
step 1; the step itself never broadcasts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from hvdclip.core.step import Clipper
from hvdclip.distributed import consistency, runtime
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.distributed.collectives import all_have_data, allgather_int64, average_variables_over_ranks
from hvdclip.distributed.rank_zero import on_rank_zero, writable_directory
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip.errors import CheckpointError, NonFiniteGradientError
from hvdclip.trainer.checkpoint import read as read_checkpoint
from hvdclip.trainer.data import EpochLength, InputPlan, check_batch
from hvdclip.trainer.elastic import launched_elastically
from hvdclip.trainer.evaluation import Evaluator, check_metrics
from hvdclip.trainer.fit_state import FitState
from hvdclip.trainer.loop import fit as run_fit
from hvdclip.transforms.base import GradientTransform
from hvdclip.validation import check_bool, check_callable, check_int, check_path

__all__ = ["HvdClipTrainer", "History"]


@dataclass
class History:
    """What `fit` returns: per-epoch means of each step metric, like Keras' `History.history`."""

    history: dict[str, list[float]] = field(default_factory=dict)
    epochs: list[int] = field(default_factory=list)


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
        accumulation_steps: sum the local gradients of this many consecutive `train_step` calls
            (micro-batches), then reduce, clip and apply once. The calls in between report only
            `loss`.
        check_consistency_every: every this many steps, allgather one checksum of the weights and
            raise `RankMismatchError` if ranks have drifted apart; `None` never checks.
        metrics: Keras metrics to track while training, e.g. `[keras.metrics.SparseCategoricalAccuracy()]`;
            each epoch `fit` reports each one over all ranks' examples under its name.

    Mixed precision: with `keras.mixed_precision.set_global_policy("mixed_float16")` and a
    `keras.optimizers.LossScaleOptimizer`, the step scales the loss, reduces, *unscales*, then
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
        metrics: list[keras.metrics.Metric] | None = None,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
        if model.built and not model.trainable_variables:
            raise ValueError(f"`model` has no trainable variables (is it frozen?). Received: model={model.name!r}")
        self.clipper = Clipper(
            optimizer, clip, skip_nonfinite=skip_nonfinite, compression=compression, sparse_as_dense=sparse_as_dense
        )
        check_callable("loss_fn", loss_fn)
        if max_consecutive_skips is not None:
            check_int("max_consecutive_skips", max_consecutive_skips, ge=1)
        self._max_consecutive_skips = max_consecutive_skips
        self._accumulation_steps = check_int("accumulation_steps", accumulation_steps, ge=1)
        if check_consistency_every is not None:
            check_int("check_consistency_every", check_consistency_every, ge=1)
        self._check_every = check_consistency_every
        self.metrics = check_metrics("metrics", metrics)
        self._calls = 0
        runtime.require_initialized("HvdClipTrainer")

        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.clip = self.clipper.transform

        self._started = False
        self._accumulators: list[tf.Variable] = []
        self._micro_step = 0  # Calls since the last optimizer step, with accumulation_steps > 1.
        # One compiled function per mode; each also counts the step and adds its metrics to the
        # epoch's sums, so fit runs no eager op per step.
        self._compiled: dict[str, Any] = {}
        self.retrace()
        self._guarded: list[tuple[str, tf.Variable]] = []  # What the consistency guard compares (set by `start`).
        self._compiled_checksums = tf.function(lambda: consistency.variable_checksums([v for _, v in self._guarded]))
        self.fit_state = FitState()  # fit's step/epoch counters and shuffle RNG, broadcast and checkpointed.
        # Stands for the has-data flag among the variables the gradient reduction names; never applied.
        self._has_data_slot = tf.Variable(0.0, trainable=False, name="hvdclip_has_data_slot")
        self.elastic_state = None  # An elastic `fit`'s `hvdclip.trainer.elastic.ElasticState` (commits, resets).
        self.deferred_restore: Callable[[], int | None] | None = None  # `restore` in an elastic job: read at the first sync.

    def retrace(self) -> None:
        """Drops the compiled step functions, so the next step traces them again.

        An elastic job calls it when the world size changes: a learning-rate schedule such as
        `ScaledWarmup` holds the size as a Python number, read when the step was traced.
        """
        self._traced_steps = 0  # Optimizer steps run since the step functions were last made.
        self._compiled = {
            "step": tf.function(self._recorded(self._step), reduce_retracing=True),
            "accumulate": tf.function(self._recorded(self._accumulate), reduce_retracing=True),
            "accumulated_step": tf.function(self._recorded(self._accumulated_step), reduce_retracing=True),
        }

    # ------------------------------------------------------------------ start-up

    @property
    def broadcast_count(self) -> int:
        """How many times state was broadcast from rank 0: 1 after start-up; an elastic `fit` adds one per sync."""
        return self.clipper.broadcast_count

    @property
    def clip_state(self) -> Any:
        """The clip transform's state, as the nest of `tf.Variable`s the core step owns."""
        return self.clipper.clip_state

    @property
    def skipped_steps(self) -> tf.Variable:
        """Steps skipped for a non-finite reduced gradient, over the trainer's life (checkpointed)."""
        return self.clipper.skipped_steps

    def named_state_variables(self) -> list[tuple[str, tf.Variable]]:
        """Everything that must be identical on every rank, named: what is broadcast and checkpointed."""
        named = [(f"model/{v.path}", tv) for v, tv in zip(self.model.variables, as_tf_variables(self.model.variables))]
        return named + self.clipper.named_variables() + self._loop_variables()

    def _loop_variables(self) -> list[tuple[str, tf.Variable]]:
        return [(f"counters/{v.name}", v) for v in self.fit_state.variables]

    def _build(self, x: Any = None) -> None:
        """Creates every variable (model weights, optimizer slots, clip state); no communication.

        `x` is a sample batch, needed only for a subclassed model that creates its weights on
        first call. Idempotent.
        """
        if self.clipper.built:
            return
        if not self.model.built or not self.model.trainable_variables:
            if x is None:
                raise ValueError(
                    f"`model` {self.model.name!r} is not built yet; call it on a batch or `model.build(shape)` first."
                )
            self.model(x, training=False)
        if not self.model.trainable_variables:
            raise ValueError(f"`model` has no trainable variables. Received: model={self.model.name!r}")
        self.clipper.build(self.model.trainable_variables)
        if self._accumulation_steps > 1:
            # Dense sums of local gradients; they start at zero on every rank, so need no broadcast.
            self._accumulators = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="hvdclip_accumulator")
                for v in as_tf_variables(self.model.trainable_variables)
            ]

    def start(self, x: Any = None) -> None:
        """Builds every variable, then broadcasts rank 0's state exactly once (later calls do nothing)."""
        if self._started:
            return
        self._build(x)
        if self.deferred_restore is not None:  # `restore` in an elastic launch, started outside an elastic fit.
            read, self.deferred_restore = self.deferred_restore, None
            if on_rank_zero(read, name="restore") is not None:
                self.fit_state.resume_pending = True
        self.clipper.broadcast_initial_state(self.model, extra=self._loop_variables())
        local = {id(v) for v in as_tf_variables(consistency.rank_local_variables(self.model))}
        self._guarded = [(name, v) for name, v in self.named_state_variables() if id(v) not in local]
        self._started = True

    @property
    def started(self) -> bool:
        """Whether the start-up broadcast has run (the trainer is built and in step on every rank)."""
        return self._started

    def rebroadcast(self) -> None:
        """Sends rank 0's whole state to every rank again: an elastic job's sync after a reset.

        The start-up broadcast, with its structure check, run again for the ranks of the new world;
        each rank then folds its new rank into the seed generators. A collective: every rank calls it.
        """
        self.clipper.broadcast_initial_state(self.model, extra=self._loop_variables())

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps this trainer ran (`train_step`/`fit`); the consistency guard's clock."""
        return self._calls

    @optimizer_steps.setter
    def optimizer_steps(self, value: int) -> None:
        # An elastic reset: the committed count, or rank 0's for a joining rank, so every rank runs
        # the consistency guard's allgather at the same steps.
        self._calls = int(value)

    def between_optimizer_steps(self) -> bool:
        """False inside a gradient-accumulation window (local sums not yet applied, held by no commit)."""
        return self._micro_step == 0

    def prepare_for_reentry(self) -> None:
        """After an elastic reset: drops an unfinished accumulation window's local sums (no commit holds
        them), and gives the next step a first step's bound (a joining rank may be compiling)."""
        self._micro_step = 0
        for accumulator in self._accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        self._traced_steps = 0
        self.stop_training = False  # A stop asked for after the commit is asked again if it still holds.
        self.model.stop_training = False

    def average_local_statistics(self) -> None:
        """Replaces rank-local BatchNorm moving statistics by their mean over ranks, on every rank.

        A collective: call it on every rank. `fit` calls it before each checkpoint and validation,
        `save` and `evaluate` before they read the model, so what is exported, saved and evaluated
        reflects every rank's data, not rank 0's alone. Training does not read moving statistics, so
        averaging them changes no gradient; and because a moving average is linear, the mean of the
        ranks' moving means is the moving average of the ranks' mean batch means.
        """
        average_variables_over_ranks(consistency.local_batch_norm_statistics(self.model), "batch_norm_statistics")

    # ------------------------------------------------------------------ the step

    def compute_loss(self, y: Any, y_pred: Any, sample_weight: Any = None) -> tf.Tensor:
        """`loss_fn` on a batch (weighted by `sample_weight`, if given), plus the model's own losses.

        A Keras `Loss` applies `sample_weight` itself; for a plain function, the per-example
        losses are weighted and summed, then divided by the batch size (Keras' default reduction).
        Shared by training and evaluation.
        """
        if sample_weight is None:
            loss = tf.reduce_mean(self.loss_fn(y, y_pred))
        elif isinstance(self.loss_fn, keras.losses.Loss):
            loss = self.loss_fn(y, y_pred, sample_weight=sample_weight)
        else:
            per_example = self.loss_fn(y, y_pred)
            weights = tf.cast(tf.reshape(sample_weight, tf.shape(per_example)), per_example.dtype)
            loss = tf.reduce_sum(per_example * weights) / tf.cast(tf.size(per_example), per_example.dtype)
        if self.model.losses:
            loss = loss + tf.add_n([tf.cast(extra, loss.dtype) for extra in self.model.losses])
        return loss

    def _local_gradients(self, x: Any, y: Any, sample_weight: Any) -> tuple[tf.Tensor, list]:
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self.compute_loss(y, y_pred, sample_weight)
            scaled_loss = self.clipper.scale_loss(loss)
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
        return loss, tape.gradient(scaled_loss, as_tf_variables(self.model.trainable_variables))

    def _core_step(self, local: list, has_data: Any) -> dict[str, tf.Tensor]:
        """`Clipper.step` on the local gradient; with `has_data`, the flag rides in its allreduce.

        The flag (1.0 or 0.0) joins the gradients as one more float, so the ranks agree whether
        every one has a next batch in the step's own allreduce: no extra collective per step. The
        stages are `Clipper.step`'s, in its order.
        """
        variables = self.model.trainable_variables
        if has_data is None:
            return self.clipper.step(local, variables)
        flag = tf.cast(has_data, tf.float32)
        reduced = self.clipper.reduce(list(local) + [flag], list(variables) + [self._has_data_slot])
        self.fit_state.all_have_data.assign(reduced[-1] > 0.999)  # The mean of the flags is 1 only if all are.
        clipped = self.clipper.clip(self.clipper.unscale(reduced[:-1]), variables)
        return {**clipped.metrics, "skipped": self.clipper.apply(clipped, variables)}

    def _step(self, x: Any, y: Any, sample_weight: Any = None, has_data: Any = None) -> dict[str, tf.Tensor]:
        """One optimizer step: local gradient, then the core step."""
        loss, local = self._local_gradients(x, y, sample_weight)
        return {"loss": loss, **self._core_step(local, has_data)}

    def _accumulate(self, x: Any, y: Any, sample_weight: Any = None, has_data: Any = None) -> dict[str, tf.Tensor]:
        """A micro-batch before the last of an accumulation window: local work only (and the has-data vote)."""
        loss, grads = self._local_gradients(x, y, sample_weight)
        for accumulator, grad in zip(self._accumulators, grads):
            if grad is not None:
                accumulator.assign_add(tf.convert_to_tensor(grad))
        if has_data is not None:  # No gradient allreduce to ride in: a one-scalar allreduce of its own.
            self.fit_state.all_have_data.assign(all_have_data(has_data))
        return {"loss": loss}

    def _accumulated_step(self, x: Any, y: Any, sample_weight: Any = None, has_data: Any = None) -> dict[str, tf.Tensor]:
        """The window's last micro-batch: the mean of the k local gradients goes through the core step."""
        loss, grads = self._local_gradients(x, y, sample_weight)
        k = float(self._accumulation_steps)
        means = [
            None if grad is None else (accumulator + tf.convert_to_tensor(grad)) / tf.cast(k, accumulator.dtype)
            for accumulator, grad in zip(self._accumulators, grads)
        ]
        for accumulator in self._accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        return {"loss": loss, **self._core_step(means, has_data)}

    def _recorded(self, step: Callable) -> Callable:
        """`step`, then `FitState.record_step` (count it, sum its metrics), to compile as one function."""

        def recorded(x: Any, y: Any, sample_weight: Any = None, has_data: Any = None) -> dict[str, tf.Tensor]:
            metrics = step(x, y, sample_weight, has_data)
            self.fit_state.record_step(metrics)
            return metrics

        return recorded

    def run_step(self, x: Any, y: Any, sample_weight: Any = None, *, has_data: bool | None = None) -> dict[str, tf.Tensor]:
        """One step (or micro-batch) on this rank's batch, as tensors; what `fit` calls per batch.

        `has_data`: whether this rank holds a batch for the next step; if given, the step also
        agrees over ranks whether all do, into `fit_state.all_have_data` (no extra round trip).
        """
        self.start(x)
        if has_data is not None:
            has_data = tf.constant(bool(has_data))
        # A lost peer ends the rank instead of hanging it; the first step also traces and compiles.
        # The first step after (re)tracing compiles: a longer bound.
        with default_watchdog().section(f"step {self._calls + 1}", compiling=self._traced_steps == 0):
            if self._accumulation_steps == 1:
                metrics = self._compiled["step"](x, y, sample_weight, has_data)
            else:
                self._micro_step += 1
                if self._micro_step < self._accumulation_steps:
                    return self._compiled["accumulate"](x, y, sample_weight, has_data)
                self._micro_step = 0
                metrics = self._compiled["accumulated_step"](x, y, sample_weight, has_data)
        if self._max_consecutive_skips is not None and self.clipper.skip_nonfinite:
            consecutive = int(self.clipper.consecutive_skips.numpy())
            if consecutive >= self._max_consecutive_skips:
                # Every rank reads the same counter after the same allreduce, so all raise together.
                raise NonFiniteGradientError(
                    f"The reduced gradient was NaN/Inf on {consecutive} consecutive steps "
                    f"(max_consecutive_skips={self._max_consecutive_skips}). Lower the learning rate, "
                    "check the input data for NaN/Inf, or clip harder."
                )
        self._calls += 1
        self._traced_steps += 1
        if self._check_every is not None and self._calls % self._check_every == 0:
            trainable = {id(v) for v in as_tf_variables(self.model.trainable_variables)}
            consistency.check_same_state(
                self._compiled_checksums(),
                [name for name, _ in self._guarded],
                [id(v) in trainable for _, v in self._guarded],
                self._calls,
            )
        return metrics

    def train_step(self, x: Any, y: Any, sample_weight: Any = None) -> dict[str, float | bool]:
        """Runs one step on this rank's batch `(x, y)` (weighted by `sample_weight`) and returns its metrics.

        `loss` is this rank's loss; `grad_norm` (before clipping) and `clipped_grad_norm` are
        norms of the reduced gradient, identical on every rank; `clip_active` says the clip stage
        clipped (False on a non-finite gradient); `skipped` says the step was skipped for a
        non-finite gradient.
        """
        check_batch(x, y, sample_weight)
        metrics = self.run_step(x, y, sample_weight)
        return {name: (bool(value) if value.dtype == tf.bool else float(value)) for name, value in metrics.items()}

    # ------------------------------------------------------------------ fit
    def agreed_steps(self, dataset: tf.data.Dataset, steps_per_epoch: int | None) -> EpochLength:
        """How long each epoch is, agreed by every rank (one allgather), so no rank waits forever.

        When every rank knows its number of batches, every rank runs the shortest shard's (capped by
        `steps_per_epoch`), and rank 0 warns with each rank's count if they differ. When some rank's
        length is unknown, an epoch runs `steps_per_epoch` steps or, if any rank runs out first,
        ends on every rank at that step: each step carries a has-data flag (`watch`).
        """
        cardinality = int(dataset.cardinality())
        if steps_per_epoch is None and cardinality == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "`dataset` is infinite (it repeats), so an epoch would never end. Pass `steps_per_epoch`, or "
                f"drop the `repeat()`. Received: cardinality={cardinality}"
            )
        counts = [int(c) for c in allgather_int64([cardinality], "cardinality")]
        if any(c == tf.data.UNKNOWN_CARDINALITY for c in counts):
            return EpochLength(steps_per_epoch, watch=True, counts=counts)
        finite = [c for c in counts if c >= 0]
        shortest = min(finite) if finite else steps_per_epoch
        steps = shortest if steps_per_epoch is None else min(shortest, steps_per_epoch)
        return EpochLength(steps, watch=False, counts=counts)

    def fit(
        self,
        dataset: tf.data.Dataset,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        *,
        batch_size: int | None = None,
        shuffle_buffer: int | None = None,
        shard: str | bool = "auto",
        validation_data: tf.data.Dataset | None = None,
        validation_metrics: list[keras.metrics.Metric] | None = None,
        callbacks: list[Any] | None = None,
        class_weight: dict[int, float] | None = None,
        verbose: int = 1,
        elastic: Any = None,
    ) -> History:
        """Trains for `epochs` epochs; call it on every rank with the same arguments.

        Each epoch, every rank takes its shard of `dataset`, shuffles it, batches it, and runs the
        same number of steps: the shortest shard's, capped by `steps_per_epoch`. If some rank's
        shard has unknown length (a generator, TFRecord files), the epoch ends on every rank at
        the step where the first rank runs out (or at `steps_per_epoch`), and rank 0 warns with
        each rank's count; fetching the next batch before each step makes this cost no extra
        round trip.

        Args:
            dataset: a `tf.data.Dataset` of `(x, y)` batches, or of single examples with
                `batch_size`. Every rank must build it in the same order for sharding to split it.
            epochs: epochs to train (>= 1). After `restore`, the epochs the checkpoint had done
                count too, so the same call finishes the interrupted run.
            steps_per_epoch: cap on steps per epoch; required only if the dataset is infinite
                (`repeat()`).
            batch_size: batch single examples into batches of this many per rank (the global
                batch is `batch_size * size`), dropping each rank's last, smaller batch.
            shuffle_buffer: shuffle each rank's shard every epoch with a buffer of this many
                elements; the seeds come from an RNG that is broadcast and checkpointed (and
                `tf.data` mixes in TensorFlow's global seed, so set that the same way on resume).
            shard: how to split `dataset` (and `validation_data`) over ranks. `"auto"` (default):
                by file when the dataset reads files (TFRecord, text lines) and has at least one
                per rank, else by element (warning if it reads too few files); `"files"`: each rank
                reads every `size`-th file (an error if that is impossible); `"elements"` (or
                `True`): each rank keeps every `size`-th element, reading the whole dataset;
                `False`: each rank already reads its own part. Build the dataset in the same order
                on every rank (seed any `shuffle` before `fit`); `fit` warns if the ranks' first
                elements differ.
            validation_data: evaluated after each epoch, sharded the same way: `val_loss` and each
                `validation_metrics` entry, exact over all ranks' examples however they split.
            validation_metrics: Keras metrics such as `keras.metrics.SparseCategoricalAccuracy()`,
                reported as `val_<name>`.
            callbacks: Keras callbacks (`keras.callbacks.EarlyStopping`, `ReduceLROnPlateau`,
                `CSVLogger`, `LearningRateScheduler`, ...) and `hvdclip.Callback` objects
                (`hvdclip.TensorBoard`, `hvdclip.CheckpointSaver`, or your own), run on every rank
                with the same epoch logs; a callback that writes files belongs on rank 0 only.
            class_weight: `{class index: weight}`: each example's loss is weighted by its class's
                weight (times its `sample_weight`, if the dataset has one), as in Keras' `fit`.
            verbose: 0 silent, 1 a progress bar, 2 one line per epoch; rank 0 only.
            elastic: `hvdclip.Elastic(commit_every=..., learning_rate=...)` (or True for the
                defaults) in a job launched with `hvdclip-run --elastic`: ranks may fail or join,
                and training continues from the last commit on the ranks there are
                (docs/elastic.md). Outside an elastic launch it warns and trains as usual.

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
            class_weight=class_weight,
            verbose=verbose,
            elastic=elastic,
            history=history,
        )
        return history

    def evaluate(
        self,
        dataset: tf.data.Dataset,
        *,
        metrics: list[keras.metrics.Metric] | None = None,
        batch_size: int | None = None,
        shard: str | bool = "auto",
    ) -> dict[str, float]:
        """The model's loss and `metrics` on `dataset`, over all ranks; call it on every rank.

        Plain BatchNormalization's moving statistics are averaged over ranks first. Each rank
        evaluates its shard (`shard` as in `fit`; all of `dataset` with `shard=False`); sums and counts are
        allreduced, so the result is the exact mean over every rank's examples, identical on every
        rank, even when the shards differ in length.

        Example:
            >>> trainer.evaluate(test, metrics=[keras.metrics.SparseCategoricalAccuracy()])
            {'loss': 0.061, 'sparse_categorical_accuracy': 0.983}
        """
        runtime.require_initialized("HvdClipTrainer.evaluate")
        plan = InputPlan.checked(
            "dataset", dataset, rank=runtime.rank(), size=runtime.size(), shard=shard, batch_size=batch_size, drop_remainder=False
        ).resolved("dataset")
        evaluate = Evaluator(self, check_metrics("metrics", metrics))
        self.start_on(plan)
        return evaluate(plan.for_epoch())  # Averages BatchNorm's rank-local statistics first.

    def start_on(self, plan: InputPlan) -> None:
        """Starts (builds, then the one broadcast) with a sample batch from `plan` if not started yet."""
        if not self._started:
            self.start(plan.sample_batch())

    @property
    def global_step(self) -> tf.Variable:
        """Steps `fit` has run over this trainer's life (skipped steps included); checkpointed."""
        return self.fit_state.global_step

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
            In an elastic job (`hvdclip-run --elastic`) the checkpoint is read by rank 0 at `fit`'s
            first sync instead, and this returns 0: `trainer.global_step` has the step once `fit`
            has started.

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
        named = self.named_state_variables()

        def read() -> int | None:
            if read_checkpoint(named, path, missing_ok=missing_ok) is None:
                return None
            return int(self.fit_state.global_step.numpy())

        if launched_elastically():
            # A rank that joins a running elastic job gets here while the others are in a sync, so no
            # collective: the first sync reads the checkpoint on rank 0 (a joining rank is never rank 0
            # while an older host lives: Horovod ranks the oldest hosts first) and sends it to all.
            self.deferred_restore = read
            return 0
        # Only rank 0 holds the restored values until the start-up broadcast sends them to the others.
        step = on_rank_zero(read, name="restore")
        if step is None:
            return 0
        self.fit_state.resume_pending = True
        return step

    def save(self, path: str) -> None:
        """Writes the model as a Keras `.keras` file, on rank 0 only; call it on every rank.

        Plain BatchNormalization's moving statistics are averaged over ranks first
        (`average_local_statistics`).

        If rank 0 cannot write `path`, every rank raises `OutputDirectoryError`.
        """
        path = check_path("path", path, "a file name ending in '.keras'")
        if not path.endswith(".keras"):
            raise ValueError(f"`path` must be a file name ending in '.keras'. Received: path={path!r}")

        def write() -> None:
            writable_directory(os.path.dirname(path) or ".", "path")
            self.model.save(path)

        if self._started:  # Before the start-up broadcast, nothing has trained the statistics yet.
            self.average_local_statistics()
        on_rank_zero(write, name="save_model")
