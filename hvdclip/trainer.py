"""`HvdClipTrainer`: Horovod data-parallel training that clips the globally reduced gradient.

One step, compiled once with `tf.function`, in the order the math happens:

    loss under a tape -> Horovod allreduce (average) -> clip stage -> optimizer.apply_gradients

Rank 0's model, optimizer and clip state reach every rank by one broadcast before step 1; the
step itself never broadcasts. Because clipping follows the allreduce, every rank clips the same
gradient the same way, so ranks stay bit-identical without re-broadcasting weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import horovod.tensorflow as hvd
import keras
import tensorflow as tf

from hvdclip import horovod_bridge, runtime
from hvdclip.errors import NonFiniteGradientError
from hvdclip.gradients import dedupe, global_norm, map_values, sum_of_squares
from hvdclip.transforms.base import GradientTransform, identity
from hvdclip.validation import check_bool, check_callable, check_int

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
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
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
        if clip is not None and not isinstance(clip, GradientTransform):
            raise TypeError(
                "`clip` must be a GradientTransform such as hvdclip.clip_by_global_norm(1.0), or None. "
                f"Received: clip={clip!r}"
            )
        self._skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        if max_consecutive_skips is not None:
            check_int("max_consecutive_skips", max_consecutive_skips, ge=1)
        self._max_consecutive_skips = max_consecutive_skips
        self._sparse_as_dense = check_bool("sparse_as_dense", sparse_as_dense)
        self._compression = horovod_bridge.compression_for(compression)
        self._accumulation_steps = check_int("accumulation_steps", accumulation_steps, ge=1)
        runtime.require_initialized("HvdClipTrainer")

        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.clip = clip if clip is not None else identity()

        self._built = False
        self._started = False
        self._broadcast_count = 0
        self._clip_state: Any = ()
        self._accumulators: list[tf.Variable] = []
        self._micro_step = 0  # Calls since the last optimizer step, with accumulation_steps > 1.
        self._compiled_step = tf.function(self._step, reduce_retracing=True)
        self._compiled_accumulate = tf.function(self._accumulate, reduce_retracing=True)
        self._compiled_accumulated_step = tf.function(self._accumulated_step, reduce_retracing=True)
        # Counters live in variables so that a compiled step can update them without a host sync.
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_skipped_steps")
        self._consecutive_skips = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_consecutive_skips")

    # ------------------------------------------------------------------ start-up

    @property
    def broadcast_count(self) -> int:
        """How many times state was broadcast from rank 0 (1 after start-up, never more)."""
        return self._broadcast_count

    @property
    def clip_state(self) -> Any:
        """The clip transform's state, as the nest of `tf.Variable`s the trainer owns."""
        return self._clip_state

    def _state_variables(self) -> list[tf.Variable]:
        """Everything that must be identical on every rank, as Horovod-ready `tf.Variable`s."""
        return (
            horovod_bridge.as_tf_variables(self.model.variables)
            + horovod_bridge.as_tf_variables(self.optimizer.variables)
            + tf.nest.flatten(self._clip_state)
        )

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
        return [map_values(lambda values: values * tf.cast(inverse, values.dtype), g) for g in grads]

    def _step(self, x: Any, y: Any) -> dict[str, tf.Tensor]:
        """One optimizer step: gradient -> allreduce -> unscale -> clip -> apply."""
        with tf.GradientTape() as tape:
            loss = self._loss(x, y)
            scaled_loss = self._scaled(loss)
        tape = hvd.DistributedGradientTape(
            tape, compression=self._compression, sparse_as_dense=self._sparse_as_dense, op=hvd.Average
        )
        grads = tape.gradient(scaled_loss, horovod_bridge.as_tf_variables(self.model.trainable_variables))
        return self._clip_and_apply(loss, self._unscaled(grads))

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
        reduced = horovod_bridge.allreduce_dense(means, compression=self._compression)
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

        clipped, new_clip_state = self.clip.update(list(grads), self._clip_state, variables)
        clipped_norm = global_norm(clipped)

        def apply() -> tf.Tensor:
            self._applier.apply_gradients(zip(clipped, variables))
            tf.nest.map_structure(lambda var, value: var.assign(value), self._clip_state, new_clip_state)
            self._consecutive_skips.assign(0)
            if self._loss_scaling:
                self._grow_loss_scale()
            return tf.constant(False)

        def skip() -> tf.Tensor:
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
            "clip_active": clipped_norm < grad_norm,
            "skipped": skipped,
        }

    def _grow_loss_scale(self) -> None:
        """Keras' dynamic loss scaling: double the scale after `dynamic_growth_steps` finite steps."""
        lso = self.optimizer
        grow = tf.equal(lso.step_counter, lso.dynamic_growth_steps - 1)
        lso.step_counter.assign(tf.where(grow, tf.zeros_like(lso.step_counter), lso.step_counter + 1))
        lso.dynamic_scale.assign(tf.where(grow, lso.dynamic_scale * 2.0, lso.dynamic_scale))

    def _run_step(self, x: Any, y: Any) -> dict[str, tf.Tensor]:
        self._start(x)
        if self._accumulation_steps == 1:
            metrics = self._compiled_step(x, y)
        else:
            self._micro_step += 1
            if self._micro_step < self._accumulation_steps:
                return self._compiled_accumulate(x, y)
            self._micro_step = 0
            metrics = self._compiled_accumulated_step(x, y)
        if self._max_consecutive_skips is not None and self._skip_nonfinite:
            consecutive = int(self._consecutive_skips.numpy())
            if consecutive >= self._max_consecutive_skips:
                # Every rank reads the same counter after the same allreduce, so all raise together.
                raise NonFiniteGradientError(
                    f"The reduced gradient was NaN/Inf on {consecutive} consecutive steps "
                    f"(max_consecutive_skips={self._max_consecutive_skips}). Lower the learning rate, "
                    "check the input data for NaN/Inf, or clip harder."
                )
        return metrics

    def train_step(self, x: Any, y: Any) -> dict[str, float | bool]:
        """Runs one step on this rank's batch `(x, y)` and returns its metrics as Python values.

        `loss` is this rank's loss; `grad_norm` (before clipping) and `clipped_grad_norm` are
        norms of the reduced gradient, identical on every rank; `clip_active` says the clip stage
        changed the gradient; `skipped` says the step was skipped for a non-finite gradient.
        """
        metrics = self._run_step(x, y)
        return {name: (bool(value) if value.dtype == tf.bool else float(value)) for name, value in metrics.items()}

    # ------------------------------------------------------------------ fit

    def _agreed_steps(self, dataset: tf.data.Dataset, steps_per_epoch: int | None) -> int | None:
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

    def fit(self, dataset: tf.data.Dataset, epochs: int = 1, steps_per_epoch: int | None = None) -> History:
        """Trains on `dataset`, which yields this rank's `(x, y)` batches.

        Every rank runs the same number of steps per epoch: `steps_per_epoch` if given, capped by
        the shortest rank's dataset when lengths are known.

        Returns:
            A `History` with the per-epoch mean of each step metric.
        """
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(f"`dataset` must be a tf.data.Dataset of (x, y) batches. Received: dataset={dataset!r}")
        epochs = check_int("epochs", epochs, ge=1)
        if steps_per_epoch is not None:
            steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, ge=1)
        runtime.require_initialized("HvdClipTrainer.fit")
        steps = self._agreed_steps(dataset, steps_per_epoch)

        history = History()
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            count = 0
            for x, y in dataset.take(steps) if steps is not None else dataset:
                metrics = self._run_step(x, y)
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                count += 1
            for name, total in sums.items():
                history.history.setdefault(name, []).append(total / count if count else math.nan)
            history.epochs.append(epoch)
        return history
