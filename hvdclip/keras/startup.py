"""`broadcast_initial_state`: rank 0's model and optimizer state to every rank, once, for `fit`."""

from __future__ import annotations

import keras

from hvdclip.distributed.collectives import broadcast_from_root
from hvdclip.distributed.runtime import require_initialized
from hvdclip.keras import xla
from hvdclip.keras.optimizer import DistributedOptimizer

__all__ = ["broadcast_initial_state", "prepare_fit"]


def broadcast_initial_state(model: keras.Model) -> None:
    """Builds the compiled model's optimizer and sends rank 0's weights, optimizer slots and clip state.

    With hvdclip's `DistributedOptimizer`, `fit` does this itself just before its first step (its
    train function, `hvdclip.keras.train_function`); call it yourself to send the state earlier
    (after loading a checkpoint on rank 0, say). With a plain Keras optimizer it broadcasts the
    model's and the optimizer's variables, as Horovod's callback does. A second call sends nothing.

    Raises:
        RankMismatchError: on every rank, if the ranks built different models.
        ValueError: the model is not compiled, not built, compiled with `jit_compile=True`, or
            computes in float16 with an optimizer that scales no loss.
    """
    optimizer = prepare_fit(model)
    if not isinstance(optimizer, DistributedOptimizer):
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        broadcast_from_root(list(model.variables) + list(optimizer.variables))
        return
    if not optimizer.state_broadcast:
        optimizer.clipper.broadcast_initial_state(model)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        optimizer.state_broadcast = True


def prepare_fit(model: keras.Model) -> keras.optimizers.Optimizer:
    """Checks a compiled, built model before `fit`'s first step; no collective.

    Returns the model's optimizer. Raises as `broadcast_initial_state` says.
    """
    require_initialized("hvdclip.keras.broadcast_initial_state")
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(f"`model` {model.name!r} is not compiled: call model.compile(optimizer=...) first.")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and isinstance(
        optimizer.inner_optimizer, DistributedOptimizer
    ):
        raise ValueError(
            "hvdclip's DistributedOptimizer is wrapped in a LossScaleOptimizer, which would test each rank's local "
            "gradient for NaN before the reduction and let ranks take different branches. Give the LossScaleOptimizer "
            "to the DistributedOptimizer instead (or a plain optimizer under mixed_float16: it scales the loss itself): "
            "DistributedOptimizer(keras.optimizers.LossScaleOptimizer(optimizer), clip=...). "
            f"Received: model.optimizer={optimizer.name!r} around {optimizer.inner_optimizer.name!r}"
        )
    if not model.built:
        raise ValueError(
            f"`model` {model.name!r} is not built yet: give it a keras.Input, call it on a batch or "
            "`model.build(input_shape)` first (with hvdclip's DistributedOptimizer, fit builds it from the first batch)."
        )
    if not isinstance(optimizer, DistributedOptimizer):
        return optimizer
    if model.dtype_policy.name == "mixed_float16" and not optimizer.loss_scaling:
        raise ValueError(
            f"`model` {model.name!r} computes in float16 (mixed_float16), but its DistributedOptimizer scales no loss, so "
            "small gradients would underflow: make the DistributedOptimizer after "
            "keras.mixed_precision.set_global_policy('mixed_float16') (it then scales the loss itself), or give it a "
            "keras.optimizers.LossScaleOptimizer. Received: an optimizer made under the float32 policy"
        )
    xla.check_fit_compile(model)
    return optimizer
