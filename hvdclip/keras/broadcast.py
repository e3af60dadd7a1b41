"""`broadcast_initial_state`: rank 0's model and optimizer state to every rank, once, for `fit`."""

from __future__ import annotations

import keras

from hvdclip.distributed.collectives import broadcast_from_root
from hvdclip.distributed.runtime import require_initialized
from hvdclip.keras.optimizer import DistributedOptimizer

__all__ = ["broadcast_initial_state"]


def broadcast_initial_state(model: keras.Model) -> None:
    """Builds the compiled model's optimizer and sends rank 0's weights, optimizer slots and clip state.

    Call it on every rank after `model.compile` and before training (or let
    `BroadcastGlobalVariablesCallback` call it when `fit` starts). With a plain Keras optimizer
    it broadcasts the model's and the optimizer's variables, as Horovod's callback does.

    Raises:
        RankMismatchError: on every rank, if the ranks built different models.
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
            "Keras wrapped hvdclip's DistributedOptimizer in a LossScaleOptimizer (the mixed_float16 policy's "
            "auto_scale_loss), which would test each rank's local gradient for NaN before the reduction and let ranks "
            "take different branches. Compile with auto_scale_loss=False and put the loss scaling inside: "
            "DistributedOptimizer(keras.optimizers.LossScaleOptimizer(optimizer), clip=...). "
            f"Received: model.optimizer={optimizer.name!r} around {optimizer.inner_optimizer.name!r}"
        )
    if not model.built:
        raise ValueError(
            f"`model` {model.name!r} is not built yet: call it on a batch or `model.build(input_shape)` first, "
            "or let fit build it (BroadcastGlobalVariablesCallback broadcasts when fit starts)."
        )
    if isinstance(optimizer, DistributedOptimizer):
        if not optimizer.state_broadcast:
            optimizer.clipper.broadcast_initial_state(model)
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            optimizer.state_broadcast = True
        return
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    broadcast_from_root(list(model.variables) + list(optimizer.variables))
