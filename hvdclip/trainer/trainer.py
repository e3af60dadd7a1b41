"""`HvdClipTrainer`: door 3, a facade over the core step (`hvdclip.Clipper`) with a `fit` loop.

What a user calls: `fit`, `train_step`, `evaluate`, `restore`, `save`, and a few read-only views.
Underneath, `hvdclip.trainer.engine.Engine` holds the step and every variable; `fit`'s loop and
the elastic state drive that, not this class. The step is the core's, in the order the math
happens:

    loss under a tape -> reduce over ranks -> unscale -> merge sparse rows -> clip -> guard -> apply

Rank 0's model, optimizer, clip state and loop counters reach every rank by one broadcast before
step 1; the step itself never broadcasts.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from hvdclip.distributed import runtime
from hvdclip.distributed.rank_zero import on_rank_zero, writable_directory
from hvdclip.distributed.reduction import Reduction
from hvdclip.trainer.config import FitConfig
from hvdclip.trainer.data import InputPlan, check_batch
from hvdclip.trainer.elastic import check_rescalable
from hvdclip.trainer.engine import Engine
from hvdclip.trainer.evaluation import Evaluator, check_metrics
from hvdclip.trainer.loop import fit as run_fit
from hvdclip.transforms.base import GradientTransform
from hvdclip.validation import check_bool, check_path

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
        reduction: how gradients are averaged over ranks: an `hvdclip.Reduction` (compression,
            `sparse_as_dense`, op, groups, ...), the same object every door takes; None: its defaults.
        skip_nonfinite: skip the optimizer step on every rank when the reduced gradient has a
            NaN or Inf (the decision follows the allreduce, so it is the same everywhere).
        abort_after_skips: with `skip_nonfinite`, raise `NonFiniteGradientError` once this many
            steps in a row were skipped; `None` never raises.
        accumulation_steps: micro-batches per optimizer step: the local gradients of this many
            consecutive steps are summed without communicating, then their mean is reduced,
            clipped and applied once. The sums and the counter are variables, so a checkpoint
            anywhere in a window resumes exactly (on as many ranks).
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
        reduction: Reduction | None = None,
        skip_nonfinite: bool = True,
        abort_after_skips: int | None = None,
        accumulation_steps: int = 1,
        check_consistency_every: int | None = None,
        metrics: list[keras.metrics.Metric] | None = None,
    ) -> None:
        self.engine = Engine(
            model, optimizer, loss_fn, clip,
            reduction=reduction, skip_nonfinite=skip_nonfinite, abort_after_skips=abort_after_skips,
            accumulation_steps=accumulation_steps, check_consistency_every=check_consistency_every,
            metrics=check_metrics("metrics", metrics),
        )  # fmt: skip

    # ------------------------------------------------------------------ views

    @property
    def model(self) -> keras.Model:
        return self.engine.model

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self.engine.optimizer

    @property
    def clip_state(self) -> Any:
        """The clip transform's state, as the nest of `tf.Variable`s the core step owns."""
        return self.engine.clipper.clip_state

    @property
    def skipped_steps(self) -> tf.Variable:
        """Steps skipped for a non-finite reduced gradient, over the trainer's life (checkpointed)."""
        return self.engine.clipper.skipped_steps

    @property
    def global_step(self) -> tf.Variable:
        """Steps `fit` has run over this trainer's life (skipped steps and micro-steps included); checkpointed."""
        return self.engine.fit_state.global_step

    @property
    def broadcast_count(self) -> int:
        """How many times state was broadcast from rank 0: 1 after start-up; an elastic `fit` adds one per sync."""
        return self.engine.clipper.broadcast_count

    @property
    def stop_training(self) -> bool:
        """Set it to True in a callback (on any rank) to stop every rank after the current epoch."""
        return self.engine.stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self.engine.stop_training = bool(value)

    # ------------------------------------------------------------------ training

    def train_step(self, x: Any, y: Any, sample_weight: Any = None) -> dict[str, float | bool]:
        """Runs one step on this rank's batch `(x, y)` (weighted by `sample_weight`) and returns its metrics.

        `loss` is this rank's loss; `grad_norm` (before clipping) and `clipped_grad_norm` are
        norms of the reduced gradient, identical on every rank; `clip_active` says the clip stage
        clipped (False on a non-finite gradient); `skipped` says the step was skipped for a
        non-finite gradient; `synced` is False on an accumulation micro-step (no norms: NaN).
        """
        check_batch(x, y, sample_weight)
        metrics = self.engine.run_step(x, y, sample_weight)
        return {name: (bool(value) if value.dtype == tf.bool else float(value)) for name, value in metrics.items()}

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

        Uneven data: with every rank's length known, every rank runs the shortest rank's number of
        steps; with some rank's length unknown, each step carries a has-data vote in its gradient
        allreduce and every rank ends the epoch after the first step where some rank has no next
        batch (with accumulation: no next whole window). `hvdclip.core.lockstep` says why.

        Returns:
            A `History` whose `.history` maps each metric to its per-epoch values, averaged over the
            epoch's steps and over ranks (`clip_active` is the fraction of steps that clipped).
        """
        runtime.require_initialized("HvdClipTrainer.fit")
        config = FitConfig.checked(
            dataset=dataset, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
            shuffle_buffer=shuffle_buffer, shard=shard, validation_data=validation_data,
            validation_metrics=validation_metrics, callbacks=callbacks, class_weight=class_weight, verbose=verbose,
            elastic=elastic, rank=runtime.rank(), size=runtime.size(),
        )  # fmt: skip
        if config.elastic is not None and not runtime.launched_elastically():
            if runtime.rank() == 0:
                warnings.warn(
                    "fit(elastic=...) in a job that was not launched elastically: training without elastic recovery. "
                    "Launch with `hvdclip-run --elastic --min-np N --max-np M --host-discovery-script S -- ...`.",
                    stacklevel=2,
                )
            config = dataclasses.replace(config, elastic=None)
        if config.elastic is not None and config.elastic.learning_rate == "scale":
            check_rescalable(self.optimizer)
        history = History()
        run_fit(self.engine, config, self, history)
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
        evaluate = Evaluator(self.engine, check_metrics("metrics", metrics))
        self.engine.start(plan.sample_batch())
        return evaluate(plan.for_epoch())  # Averages BatchNorm's rank-local statistics first.

    # ------------------------------------------------------------------ checkpoints and export

    def restore(self, path: str, *, missing_ok: bool = False) -> int:
        """Restores a checkpoint written by `hvdclip.CheckpointSaver`; call it on every rank before `fit`.

        Rank 0 reads the checkpoint (the latest one in directory `path`, or the checkpoint prefix
        `path`); the start-up broadcast then gives every rank its state, so other ranks need no
        access to the files. The next `fit` continues where the checkpoint was taken, mid-epoch
        and mid-accumulation-window included (then on as many ranks as wrote it), and gives the
        same weights as a run that was never interrupted.

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
        return self.engine.restore(path, missing_ok=missing_ok)

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

        if self.engine.started:  # Before the start-up broadcast, nothing has trained the statistics yet.
            self.engine.average_local_statistics()
        on_rank_zero(write, name="save_model")
