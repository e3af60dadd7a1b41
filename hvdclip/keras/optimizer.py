"""Door 2: `DistributedOptimizer`, for `model.compile` + `model.fit`.

Keras' `fit` computes each rank's local gradient and hands it to `optimizer.apply_gradients`.
This optimizer wraps yours and runs the core step there (`hvdclip.Clipper.step`): reduce over
ranks, unscale (with a `LossScaleOptimizer`), merge sparse rows, clip, skip NaN/Inf steps on every
rank, apply. Horovod's own `hvd.DistributedOptimizer` fails on Keras 3 variables; this one takes
its name so that migrating is a find-and-replace:

    optimizer = hvdclip.keras.DistributedOptimizer(keras.optimizers.Adam(1e-3),
                                                   clip=hvdclip.clip_by_global_norm(1.0))
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    model.fit(x, y, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0),
                               hvdclip.keras.callbacks.MetricAverageCallback()])
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import tensorflow as tf

from hvdclip.core.step import Clipper
from hvdclip.errors import HvdClipError
from hvdclip.transforms.base import GradientTransform

__all__ = ["DistributedOptimizer", "STEP_METRICS"]

# What the optimizer sums over the steps since `reset_step_metrics`, in this order: the step count,
# the applied steps, then the norms and the clip flag of the applied steps only (a skipped step's
# norm is NaN or Inf and would swamp the mean), then the skipped steps.
STEP_METRICS = ("steps", "applied", "grad_norm", "clipped_grad_norm", "clip_active", "skipped")


@keras.saving.register_keras_serializable(package="hvdclip")
class DistributedOptimizer(keras.optimizers.Optimizer):
    """Wraps a Keras 3 optimizer so that `fit` reduces, clips and applies like every hvdclip door.

    Args:
        optimizer: the Keras 3 optimizer that applies the update (or a `LossScaleOptimizer`
            around it, for mixed precision). Without clipping keywords: clipping is `clip`.
        clip: a `GradientTransform` such as `hvdclip.clip_by_global_norm(1.0)`, run on the
            reduced, unscaled gradient; None applies it unclipped.
        skip_nonfinite: skip the step on every rank when the reduced gradient has a NaN or Inf.
        compression, sparse_as_dense, op, gradient_predivide_factor, groups: Horovod's reduction
            options, as for `hvd.DistributedOptimizer`.
        name: the optimizer's name.

    Its `variables` are the wrapped optimizer's plus the clip state and skip counters, so
    `BroadcastGlobalVariablesCallback`, `ModelCheckpoint` and `BackupAndRestore` carry them.
    `learning_rate` and `iterations` are the wrapped optimizer's (`ReduceLROnPlateau` and
    `LearningRateScheduler` work unchanged). The step's metrics (`grad_norm`, `clipped_grad_norm`,
    `clip_rate`, `skipped`) reach the logs through `MetricAverageCallback`.

    A model saved with this optimizer reloads with `compile=False`; compile it again with a new
    `DistributedOptimizer` (a clip transform holds Python functions, which a `.keras` file cannot).
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
        name: str | None = None,
    ) -> None:
        clipper = Clipper(
            optimizer,
            clip,
            skip_nonfinite=skip_nonfinite,
            compression=compression,
            sparse_as_dense=sparse_as_dense,
            op=op,
            gradient_predivide_factor=gradient_predivide_factor,
            groups=groups,
        )
        if name is not None and (not isinstance(name, str) or not name):
            error = TypeError if not isinstance(name, str) else ValueError
            raise error(f"`name` must be a non-empty str or None. Received: name={name!r}")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.clipper = clipper
        self._options = {
            "skip_nonfinite": skip_nonfinite,
            "compression": compression,
            "sparse_as_dense": sparse_as_dense,
            "op": op,
            "gradient_predivide_factor": gradient_predivide_factor,
            "groups": groups,
        }
        # Set by BroadcastGlobalVariablesCallback (or `broadcast_initial_state`): a compiled step
        # refuses to run before rank 0's state has reached every rank.
        self.state_broadcast = False
        self.step_sums = tf.Variable(tf.zeros([len(STEP_METRICS)], tf.float64), trainable=False, name="hvdclip_step_sums")

    def build(self, var_list):
        self.clipper.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        """The wrapped optimizer's variables, then the clip state and skip counters."""
        return self._variables + [variable for _, variable in self.clipper.named_variables()]

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
        if not self.state_broadcast:
            raise HvdClipError(
                "hvdclip.keras.DistributedOptimizer ran a step before rank 0's weights reached the other ranks, "
                "which would train them apart: pass callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)] "
                "to fit, or call hvdclip.keras.broadcast_initial_state(model) after compile and before the first step."
            )
        variables = list(trainable_variables if trainable_variables is not None else self._trainable_variables)
        metrics = self.clipper.step(list(grads), variables)
        skipped = metrics["skipped"]
        applied = [tf.where(skipped, tf.constant(0.0, tf.float64), tf.cast(metrics[name], tf.float64))
                   for name in ("grad_norm", "clipped_grad_norm", "clip_active")]
        one = tf.constant(1.0, tf.float64)
        self.step_sums.assign_add(tf.stack([one, one - tf.cast(skipped, tf.float64), *applied, tf.cast(skipped, tf.float64)]))

    def step_metrics(self) -> dict[str, float]:
        """The steps since `reset_step_metrics` (the same on every rank); empty before any step.

        `grad_norm`, `clipped_grad_norm` and `clip_rate` are means over the applied steps (NaN if
        every step was skipped); `skipped` counts the skipped ones.
        """
        sums = dict(zip(STEP_METRICS, self.step_sums.numpy().tolist()))
        if sums["steps"] == 0:
            return {}
        applied = sums["applied"]
        mean = (lambda name: sums[name] / applied) if applied else (lambda name: float("nan"))  # noqa: E731
        return {
            "grad_norm": mean("grad_norm"),
            "clipped_grad_norm": mean("clipped_grad_norm"),
            "clip_rate": mean("clip_active"),
            "skipped": sums["skipped"],
        }

    def reset_step_metrics(self) -> None:
        self.step_sums.assign(tf.zeros_like(self.step_sums))

    def scale_loss(self, loss):
        return self.clipper.scale_loss(loss)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            **self._options,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        warnings.warn(
            "hvdclip.keras.DistributedOptimizer was restored without its clip transform (a .keras file cannot hold "
            "one): load the model with compile=False and compile it with a new DistributedOptimizer(..., clip=...).",
            stacklevel=2,
        )
        return cls(optimizer, None, **config)
