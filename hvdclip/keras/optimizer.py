"""Door 2: `DistributedOptimizer`, for `model.compile` + `model.fit`, under Horovod's name and signature.

Keras' `fit` computes each rank's local gradient and hands it to `optimizer.apply`. This optimizer
wraps yours and runs the core step there (`hvdclip.Clipper.step`): [accumulate] -> reduce over
ranks (with the has-data vote of hvdclip's train function) -> unscale -> merge sparse rows -> clip
-> skip NaN/Inf steps on every rank -> apply. Horovod's own `hvd.DistributedOptimizer` fails on
Keras 3 variables; this one takes Horovod's arguments, in Horovod's order, with Horovod's defaults,
plus hvdclip's keywords:

    optimizer = hvdclip.keras.DistributedOptimizer(keras.optimizers.Adam(1e-3),
                                                   clip=hvdclip.clip_by_global_norm(1.0))
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0),
                               hvdclip.keras.callbacks.MetricAverageCallback()])

Why it subclasses `keras.optimizers.LossScaleOptimizer`: under the `mixed_float16` policy Keras'
`compile` wraps any optimizer that is not one in a `LossScaleOptimizer`, which tests each rank's
*local* gradient for NaN/Inf before the reduction (ranks could then take different branches, one
waiting in an allreduce the other skipped) and unscales before the clip. Being one, this optimizer
is left alone, and does the loss scaling itself, in the core step's order: unscale after the
reduction, skip on the reduced gradient. Without mixed precision it scales nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import horovod.tensorflow as hvd
import keras
import tensorflow as tf

from hvdclip.core.step import Clipper
from hvdclip.core.step_sums import StepSums
from hvdclip.distributed.reduction import Reduction
from hvdclip.distributed.runtime import launched_elastically
from hvdclip.errors import HvdClipError
from hvdclip.transforms.base import GradientTransform
from hvdclip.validation import check_bool, check_int

__all__ = ["DistributedOptimizer"]

# Horovod's Keras optimizer takes these ops only; its reduction arguments' defaults.
_HOROVOD_OPS = ("average", "sum")
_HOROVOD_DEFAULTS = {
    "device_dense": "", "device_sparse": "", "compression": hvd.Compression.none, "sparse_as_dense": False,
    "gradient_predivide_factor": 1.0, "op": hvd.Average, "num_groups": 0, "groups": None,
    "process_set": hvd.global_process_set,
}  # fmt: skip


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (isinstance(value, (str, bool, int, float)) and value == default and type(value) is type(default))


@keras.saving.register_keras_serializable(package="hvdclip")
class DistributedOptimizer(keras.optimizers.LossScaleOptimizer):
    """Wraps a Keras 3 optimizer so that `fit` reduces, clips and applies like every hvdclip door.

    Horovod's arguments, with Horovod's defaults:
        optimizer: the Keras 3 optimizer that applies the update (or a `LossScaleOptimizer`
            around it, for mixed precision; a plain one is wrapped for you under `mixed_float16`).
            Without clipping keywords: clipping is `clip`.
        name: the optimizer's name (default "Distributed" + the optimizer's class name).
        device_dense, device_sparse: devices for the reduction ("" lets Horovod choose).
        compression: `hvd.Compression.none` (default) or `hvd.Compression.fp16` (or "fp16").
        sparse_as_dense: allreduce embedding gradients as dense tensors.
        gradient_predivide_factor: divide by this before the sum, by size / factor after.
        op: `hvd.Average` (default) or `hvd.Sum`.
        backward_passes_per_step: batches per optimizer step: the first k - 1 add this rank's
            gradient to its sums without communicating, the k-th reduces and applies the window.
        average_aggregated_gradients: divide the window's sum by `backward_passes_per_step`
            (default False, Horovod's: the window's gradients are summed).
        num_groups: Horovod's older name for an int `groups` (0, the default, leaves it to `groups`).
        groups: None (default, with `num_groups=0`): one allreduce per gradient, batched by
            Horovod's fusion buffer, where Horovod reduces on GPUs with NCCL (Horovod's behaviour),
            and one grouped allreduce on CPU, which is faster there (docs/performance.md); 0 for one
            allreduce per gradient everywhere, an int > 0 for that many grouped allreduces, or a
            list of lists of variables.
        process_set: the Horovod process set to reduce over (default: every rank).
        scale_local_gradients: accepted for Horovod's signature; it only acts on variables given
            to Horovod's `register_local_var`, which hvdclip does not support (docs/horovod.md).

    hvdclip's, by keyword:
        clip: a `GradientTransform` such as `hvdclip.clip_by_global_norm(1.0)`, run on the
            reduced, unscaled gradient; None applies it unclipped.
        skip_nonfinite: skip the step on every rank when the reduced gradient has a NaN or Inf.
        reduction: an `hvdclip.Reduction` instead of Horovod's reduction arguments (not both).

    Its `variables` are the wrapped optimizer's plus the clip state, the counters and the
    accumulation state, so `BroadcastGlobalVariablesCallback`, `ModelCheckpoint` and
    `BackupAndRestore` carry them. `learning_rate` and `iterations` are the wrapped optimizer's
    (`ReduceLROnPlateau` and `LearningRateScheduler` work unchanged). The step's metrics
    (`grad_norm`, `clipped_grad_norm`, `clip_rate`, `skipped`) reach the logs through
    `MetricAverageCallback`.

    A model saved with this optimizer reloads with `compile=False`; compile it again with a new
    `DistributedOptimizer` (a clip transform holds Python functions, which a `.keras` file cannot).
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        name: str | None = None,
        device_dense: str = "",
        device_sparse: str = "",
        compression: Any = hvd.Compression.none,
        sparse_as_dense: bool = False,
        gradient_predivide_factor: float = 1.0,
        op: Any = hvd.Average,
        backward_passes_per_step: int = 1,
        average_aggregated_gradients: bool = False,
        num_groups: int = 0,
        groups: Any = None,
        process_set: Any = hvd.global_process_set,
        scale_local_gradients: bool = True,
        *,
        clip: GradientTransform | None = None,
        skip_nonfinite: bool = True,
        reduction: Reduction | None = None,
    ) -> None:
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"`optimizer` must be a Keras 3 optimizer such as keras.optimizers.Adam(). Received: optimizer={optimizer!r}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise (TypeError if not isinstance(name, str) else ValueError)(
                f"`name` must be a non-empty str or None. Received: name={name!r}"
            )
        check_int("backward_passes_per_step", backward_passes_per_step, ge=1)
        check_bool("average_aggregated_gradients", average_aggregated_gradients)
        check_bool("scale_local_gradients", scale_local_gradients)
        check_int("num_groups", num_groups, ge=0)
        horovod = {
            "device_dense": device_dense, "device_sparse": device_sparse, "compression": compression,
            "sparse_as_dense": sparse_as_dense, "gradient_predivide_factor": gradient_predivide_factor, "op": op,
            "num_groups": num_groups, "groups": groups, "process_set": process_set,
        }  # fmt: skip
        if reduction is None:
            reduction = Reduction(
                device_dense=device_dense, device_sparse=device_sparse, compression=compression,
                sparse_as_dense=sparse_as_dense, gradient_predivide_factor=gradient_predivide_factor, op=op,
                groups=groups if groups is not None else (num_groups or None),  # Horovod's defaults: hvdclip's for the device.
                process_set=None if process_set is hvd.global_process_set else process_set,
            )  # fmt: skip
            if reduction.op not in _HOROVOD_OPS:
                raise ValueError(f"`op` must be hvd.Average or hvd.Sum, as for Horovod's DistributedOptimizer. Received: op={op!r}")
        elif not isinstance(reduction, Reduction):
            raise TypeError(f"`reduction` must be an hvdclip.Reduction or None. Received: reduction={reduction!r}")
        else:
            changed = sorted(name for name, value in horovod.items() if not _is_default(value, _HOROVOD_DEFAULTS[name]))
            if changed:
                raise ValueError(
                    "Pass the reduction either as `reduction=hvdclip.Reduction(...)` or as Horovod's arguments, not "
                    f"both. Received: reduction={reduction!r} and {', '.join(changed)}"
                )
        inner = optimizer
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and keras.config.dtype_policy().name == "mixed_float16":
            # What Keras' compile would do, but inside the core step's order (see the module docstring).
            inner = keras.optimizers.LossScaleOptimizer(optimizer)
        clipper = Clipper(
            inner, clip, reduction=reduction, accumulation_steps=backward_passes_per_step,
            average_accumulated=average_aggregated_gradients, skip_nonfinite=skip_nonfinite,
        )  # fmt: skip
        super().__init__(optimizer, name=name or f"Distributed{type(optimizer).__name__}")
        self.clipper = clipper
        self._config = {
            "backward_passes_per_step": backward_passes_per_step,
            "average_aggregated_gradients": average_aggregated_gradients,
            "skip_nonfinite": skip_nonfinite,
            "reduction": {"compression": reduction.compression, "sparse_as_dense": reduction.sparse_as_dense,
                          "op": reduction.op, "gradient_predivide_factor": reduction.gradient_predivide_factor,
                          "groups": reduction.groups if reduction.groups is None or isinstance(reduction.groups, int) else 0,
                          "device_dense": reduction.device_dense, "device_sparse": reduction.device_sparse},
        }  # fmt: skip
        # Set by `hvdclip.keras.broadcast_initial_state` (which BroadcastGlobalVariablesCallback runs):
        # a step refuses to run before rank 0's state has reached every rank.
        self.state_broadcast = False
        self.step_sums = StepSums()
        self._has_data: tf.Tensor | None = None  # The vote of the step being traced (hvdclip's train function).

    # ------------------------------------------------------------------ Keras' optimizer interface

    def build(self, var_list):
        self.clipper.build(var_list)
        keras.optimizers.Optimizer.build(self, var_list)  # Not LossScaleOptimizer's: the clipper scales.

    @property
    def variables(self):
        """The wrapped optimizer's variables, the clip state, the counters and the accumulation state."""
        own = [variable for _, variable in self.clipper.named_variables() + self.clipper.local_variables()]
        return self._variables + own

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
        if not self.state_broadcast and not launched_elastically():
            # In an elastic job the state's sync broadcasts (Horovod's elastic Keras scripts warm up
            # with a step before it); elsewhere a step before the broadcast trains the ranks apart.
            raise HvdClipError(
                "hvdclip.keras.DistributedOptimizer ran a step before rank 0's weights reached the other ranks, "
                "which would train them apart: pass callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)] "
                "to fit, or call hvdclip.keras.broadcast_initial_state(model) after compile and before the first step."
            )
        variables = list(trainable_variables if trainable_variables is not None else self._trainable_variables)
        report = self.clipper.step(list(grads), variables, has_data=self._has_data)
        self.step_sums.add(report)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("hvdclip.keras.DistributedOptimizer runs on the TensorFlow backend, with state.")

    def scale_loss(self, loss):
        return self.clipper.scale_loss(loss)

    @property
    def loss_scaling(self) -> bool:
        """Whether the loss is scaled (mixed precision): the wrapped optimizer is, or was made, a LossScaleOptimizer."""
        return self.clipper.loss_scaling

    # ------------------------------------------------------------------ hvdclip's train function

    @contextlib.contextmanager
    def voting(self, has_data: tf.Tensor | None) -> Iterator[None]:
        """While a train step is traced: this rank's has-data flag rides in the step's gradient allreduce."""
        self._has_data = has_data
        try:
            yield
        finally:
            self._has_data = None

    def step_metrics(self) -> dict[str, float]:
        """The steps since `reset_step_metrics` (the same on every rank); empty before any step.

        `grad_norm`, `clipped_grad_norm` and `clip_rate` are means over the applied optimizer steps
        (NaN if every step was skipped); `skipped` counts the skipped ones.
        """
        totals = self.step_sums.totals()
        if "skipped" not in totals or totals["skipped"][1] == 0:
            return {}

        def mean(name: str) -> float:
            total, count = totals[name]
            return total / count if count else float("nan")

        return {
            "grad_norm": mean("grad_norm"),
            "clipped_grad_norm": mean("clipped_grad_norm"),
            "clip_rate": mean("clip_active"),
            "skipped": totals["skipped"][0],
        }

    def reset_step_metrics(self) -> None:
        self.step_sums.reset()

    # ------------------------------------------------------------------ saving

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            **self._config,
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
        reduction = Reduction(**config.pop("reduction", {}))
        return cls(optimizer, name=config.pop("name", None), reduction=reduction, **config)
