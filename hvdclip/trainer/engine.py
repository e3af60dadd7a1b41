"""`Engine`: the trainer's step and state, the one object `fit`'s loop and the elastic state drive.

`HvdClipTrainer` is the facade a user calls; this is what runs underneath: the core step
(`hvdclip.Clipper`) fed by the model's loss, compiled once, the loop's counters (`FitState`), the
start-up broadcast, the consistency guard and the checkpoint's bookkeeping. `hvdclip.trainer.loop`
and `hvdclip.trainer.elastic` use this class and nothing else of the trainer's.

Its step, compiled once with `tf.function`, is the core's, in the order the math happens:

    loss under a tape -> [accumulate] -> reduce over ranks (+ the has-data vote) -> unscale
      -> merge sparse rows -> clip -> guard -> apply -> count the step, add its metrics to the epoch's sums
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvdclip.core.lockstep import EpochLength, agree_epoch_length
from hvdclip.core.step import Clipper
from hvdclip.distributed import collectives, consistency, runtime
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.distributed.rank_zero import on_rank_zero
from hvdclip.distributed.reduction import Reduction
from hvdclip.errors import CheckpointError, NonFiniteGradientError
from hvdclip.trainer import checkpoint
from hvdclip.trainer.fit_state import FitState
from hvdclip.transforms.base import GradientTransform
from hvdclip.validation import check_callable, check_int

__all__ = ["Engine"]


class Engine:
    """The model's loss, the core step and every variable the trainer owns; see the module docstring.

    Args: as `HvdClipTrainer`'s (which validates nothing itself: this does).
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss_fn: Callable[[Any, Any], Any],
        clip: GradientTransform | None,
        *,
        reduction: Reduction | None,
        skip_nonfinite: bool,
        abort_after_skips: int | None,
        accumulation_steps: int,
        check_consistency_every: int | None,
        metrics: list[keras.metrics.Metric],
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
        if model.built and not model.trainable_variables:
            raise ValueError(f"`model` has no trainable variables (is it frozen?). Received: model={model.name!r}")
        self.clipper = Clipper(
            optimizer, clip, reduction=reduction, accumulation_steps=accumulation_steps, skip_nonfinite=skip_nonfinite
        )
        self.loss_fn = check_callable("loss_fn", loss_fn)
        self._abort_after_skips = None if abort_after_skips is None else check_int("abort_after_skips", abort_after_skips, ge=1)
        self._check_every = None if check_consistency_every is None else check_int("check_consistency_every", check_consistency_every, ge=1)  # fmt: skip
        self.metrics = metrics
        runtime.require_initialized("HvdClipTrainer")
        self.model = model
        self.optimizer = optimizer
        self.fit_state = FitState()
        self.stop_training = False  # Set by a callback (on any rank): every rank stops after this epoch.
        self._started = False
        self._calls = 0  # Steps run (micro-steps included): the consistency guard's clock.
        self._guarded: list[tuple[str, tf.Variable]] = []  # What the consistency guard compares (set by `start`).
        self._compiled_checksums = tf.function(lambda: consistency.variable_checksums([v for _, v in self._guarded]))
        # A checkpoint read on rank 0 and not yet sent to every rank: `restore` in an elastic launch
        # defers the read itself to the first sync; a checkpoint taken inside an accumulation window
        # also holds every rank's sums, sent at `start` (how many ranks' sums: `_window_ranks`).
        self.deferred_restore: Callable[[], int | None] | None = None
        self._window_sums: list[np.ndarray] | None = None
        self._window_ranks = 0
        self.elastic_state = None  # The last elastic `fit`'s `ElasticState` (its commits, resets and their times).
        self.retrace()

    # ------------------------------------------------------------------ state

    def named_state_variables(self) -> list[tuple[str, tf.Variable]]:
        """Everything that must be identical on every rank, named: what is broadcast and checkpointed."""
        named = [(f"model/{v.path}", tv) for v, tv in zip(self.model.variables, as_tf_variables(self.model.variables))]
        return named + self.clipper.named_variables() + self._loop_variables()

    def local_state_variables(self) -> list[tuple[str, tf.Variable]]:
        """This rank's own state that a resume needs: its gradient-accumulation sums."""
        return self.clipper.local_variables()

    def _loop_variables(self) -> list[tuple[str, tf.Variable]]:
        return [(f"counters/{v.name}", v) for v in self.fit_state.variables]

    @property
    def started(self) -> bool:
        """Whether the start-up broadcast has run (the trainer is built and in step on every rank)."""
        return self._started

    @property
    def optimizer_steps(self) -> int:
        """Steps this trainer ran (micro-steps included): the consistency guard's clock."""
        return self._calls

    @optimizer_steps.setter
    def optimizer_steps(self, value: int) -> None:
        # An elastic reset: the committed count, or rank 0's for a joining rank, so every rank runs
        # the consistency guard's allgather at the same steps.
        self._calls = int(value)

    def between_windows(self) -> bool:
        """False inside a gradient-accumulation window (the sums hold micro-batches no optimizer step has applied)."""
        acc = self.clipper.accumulation
        return acc is None or int(acc.micro_step.numpy()) == 0

    def build(self, x: Any = None) -> None:
        """Creates every variable (model weights, optimizer slots, clip state, accumulators); no communication.

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

    def start(self, x: Any = None) -> None:
        """Builds every variable, then sends rank 0's state to every rank, once (later calls do nothing).

        A pending restore is completed first: an elastic launch's deferred read (on rank 0), and the
        accumulation sums of a checkpoint taken inside a window (each rank gets its own).
        """
        if self._started:
            return
        self.build(x)
        if self.deferred_restore is not None:  # `restore` in an elastic launch, then a `fit` that is not elastic.
            read, self.deferred_restore = self.deferred_restore, None
            self.take_restored(on_rank_zero(read, name="restore"))
        self._send_window_sums()
        self.clipper.broadcast_initial_state(self.model, extra=self._loop_variables())
        local = {id(v) for v in as_tf_variables(consistency.rank_local_variables(self.model))}
        self._guarded = [(name, v) for name, v in self.named_state_variables() if id(v) not in local]
        self._started = True

    def rebroadcast(self) -> None:
        """Sends rank 0's whole state to every rank again: an elastic job's sync after a reset.

        The start-up broadcast, with its structure check, run again for the ranks of the new world;
        each rank then folds its new rank into the seed generators. A collective: every rank calls it.
        """
        self.clipper.broadcast_initial_state(self.model, extra=self._loop_variables())

    def retrace(self) -> None:
        """Drops the compiled step, so the next step traces it again.

        An elastic job calls it when the world size changes: a learning-rate schedule such as
        `ScaledWarmup` holds the size as a Python number, read when the step was traced. The next
        allreduce may then wait for peers that are compiling: the watchdog gives it the longer bound.
        """
        self._compiled = tf.function(self._recorded_step, reduce_retracing=True)
        if self.clipper.marker is not None:
            self.clipper.marker.expect_compile()

    def prepare_for_reentry(self) -> None:
        """After an elastic reset: the next step may wait for a joining rank that is compiling; no stop is pending.

        Commits happen between accumulation windows only, so the restored sums are zero on every rank.
        """
        self.retrace()
        self.stop_training = False  # A stop asked for after the commit is asked again if it still holds.
        self.model.stop_training = False

    def average_local_statistics(self) -> None:
        """Replaces rank-local BatchNorm moving statistics by their mean over ranks, on every rank (a collective)."""
        collectives.average_variables_over_ranks(consistency.local_batch_norm_statistics(self.model), "batch_norm_statistics")

    # ------------------------------------------------------------------ restore

    def restore(self, path: str, *, missing_ok: bool) -> int:
        """`HvdClipTrainer.restore` (which documents it): rank 0 reads, `start` sends."""
        if self._started:
            raise CheckpointError(
                "restore() must come before the first training step: the start-up broadcast has already "
                "sent this trainer's state to every rank. Create the trainer, restore, then fit."
            )
        self.build()
        named, local = self.named_state_variables(), self.local_state_variables()

        def read() -> tuple[int, int] | None:
            restored = checkpoint.read(named, path, missing_ok=missing_ok, local=local)
            if restored is None:
                return None
            self._window_sums = restored.window_sums
            return int(self.fit_state.global_step.numpy()), restored.window_ranks

        if runtime.launched_elastically():
            # A rank that joins a running elastic job gets here while the others are in a sync, so no
            # collective: the first sync reads the checkpoint on rank 0 (a joining rank is never rank 0
            # while an older host lives: Horovod ranks the oldest hosts first) and sends it to all.
            self.deferred_restore = read
            return 0
        outcome = on_rank_zero(read, name="restore")  # Only rank 0 holds the values until `start` sends them.
        return self.take_restored(outcome)

    def take_restored(self, outcome: tuple[int, int] | None) -> int:
        """Records what a checkpoint read returned (`(global step, ranks whose sums it holds)`, or None)."""
        if outcome is None:
            return 0
        step, self._window_ranks = outcome
        self.fit_state.resume_here()
        return step

    def discard_window_sums(self) -> None:
        """Forgets the accumulation sums a read returned: an elastic sync cannot send them (a joining rank would
        not expect the collective), so the start-up broadcast's check refuses the window instead."""
        self._window_sums, self._window_ranks = None, 0

    def _send_window_sums(self) -> None:
        """A checkpoint taken inside an accumulation window: each rank gets its own sums from rank 0's read."""
        ranks, self._window_ranks = self._window_ranks, 0
        if not ranks:
            return
        if ranks != runtime.size():
            raise CheckpointError(
                f"The checkpoint was taken inside a gradient-accumulation window on {ranks} ranks; its partial sums "
                f"are each rank's own, so it resumes exactly on {ranks} ranks only, not {runtime.size()}. Restore it on "
                f"{ranks} ranks, or restore a checkpoint taken at the end of a window."
            )
        sums, self._window_sums = self._window_sums, None
        collectives.scatter_from_root(sums, [v for _, v in self.local_state_variables()])

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

    def _recorded_step(self, x: Any, y: Any, sample_weight: Any = None, has_data: Any = None) -> dict[str, tf.Tensor]:
        """Local gradient, the core step, then count the step and add its metrics to the epoch's sums."""
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self.compute_loss(y, y_pred, sample_weight)
            scaled_loss = self.clipper.scale_loss(loss)
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
        local = tape.gradient(scaled_loss, as_tf_variables(self.model.trainable_variables))
        metrics = {"loss": loss, **self.clipper.step(local, self.model.trainable_variables, has_data=has_data)}
        self.fit_state.record_step(metrics)
        return metrics

    def run_step(self, x: Any, y: Any, sample_weight: Any = None, *, has_data: Any = None) -> dict[str, tf.Tensor]:
        """One step (or accumulation micro-step) on this rank's batch, as tensors; what `fit` calls per batch.

        `has_data`: a bool tensor, whether this rank holds a batch for the next step (from
        `Lockstep`); the step's report then says whether every rank does. The core step runs under
        the watchdog's marker: a rank whose peer is lost ends within the step bound.
        """
        self.start(x)
        # The fewer arguments a compiled function is handed, the less its call costs on the host.
        if has_data is not None:
            metrics = self._compiled(x, y, sample_weight, has_data)
        elif sample_weight is not None:
            metrics = self._compiled(x, y, sample_weight)
        else:
            metrics = self._compiled(x, y)
        if self._abort_after_skips is not None and self.clipper.skip_nonfinite:
            consecutive = int(self.clipper.consecutive_skips.numpy())
            if consecutive >= self._abort_after_skips:
                # Every rank reads the same counter after the same allreduce, so all raise together.
                raise NonFiniteGradientError(
                    f"The reduced gradient was NaN/Inf on {consecutive} consecutive steps "
                    f"(abort_after_skips={self._abort_after_skips}). Lower the learning rate, "
                    "check the input data for NaN/Inf, or clip harder."
                )
        self._calls += 1
        if self._check_every is not None and self._calls % self._check_every == 0:
            trainable = {id(v) for v in as_tf_variables(self.model.trainable_variables)}
            consistency.check_same_state(
                self._compiled_checksums(),
                [name for name, _ in self._guarded],
                [id(v) in trainable for _, v in self._guarded],
                self._calls,
            )
        return metrics

    def epoch_length(self, dataset: tf.data.Dataset, steps_per_epoch: int | None) -> EpochLength:
        """How long each epoch is, agreed by every rank from its dataset's cardinality (one allgather)."""
        return agree_epoch_length(int(dataset.cardinality()), steps_per_epoch)
