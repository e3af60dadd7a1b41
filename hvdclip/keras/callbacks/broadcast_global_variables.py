"""`BroadcastGlobalVariablesCallback`: one broadcast of rank 0's state when `fit` starts."""

from __future__ import annotations

import keras

from hvdclip.keras.broadcast import broadcast_initial_state
from hvdclip.validation import check_int

__all__ = ["BroadcastGlobalVariablesCallback"]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Sends rank 0's weights, optimizer slots and clip state to every rank before the first step.

    Horovod's callback of the same name broadcasts after the first batch, once the optimizer has
    made its slots; Keras 3 builds the optimizer before `on_train_begin`, so this one broadcasts
    there, before any step, and never again (a second `fit` on the same model sends nothing).

    Args:
        root_rank: the rank whose state every rank starts from; hvdclip supports 0 only (the
            rank that also writes checkpoints and logs).
    """

    def __init__(self, root_rank: int = 0) -> None:
        super().__init__()
        check_int("root_rank", root_rank, ge=0)
        if root_rank != 0:
            raise ValueError(
                "`root_rank` must be 0: hvdclip starts every rank from rank 0, the rank that also writes "
                f"checkpoints and logs. Received: root_rank={root_rank!r}"
            )
        self.root_rank = root_rank

    def set_model(self, model):
        if getattr(model, "jit_compile", False):
            raise ValueError(
                "`model` is compiled with jit_compile=True (XLA), but Horovod's collectives have no XLA "
                "kernels: compile with jit_compile=False. Received: jit_compile=True"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        broadcast_initial_state(self.model)
