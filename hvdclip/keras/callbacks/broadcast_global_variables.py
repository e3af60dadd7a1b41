"""`BroadcastGlobalVariablesCallback`: one broadcast of rank 0's state when `fit` starts, and every rank's
epochs kept in step."""

from __future__ import annotations

import keras

from hvdclip.keras import train_function
from hvdclip.keras.broadcast import broadcast_initial_state, prepare_fit
from hvdclip.validation import check_int

__all__ = ["BroadcastGlobalVariablesCallback"]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Sends rank 0's weights, optimizer slots and clip state to every rank just before the first step.

    Horovod's callback of the same name broadcasts after the first batch, once the optimizer has
    made its slots, so rank 0's first step was already applied while the others' was not. Keras 3
    builds the model (from fit's first batch, if it has no `Input`) and the optimizer before any
    callback runs, so this one broadcasts at the first batch's *begin*: after every callback's
    `on_train_begin` (a `BackupAndRestore` or a load on rank 0 reaches every rank), before any
    step, and never again (a second `fit` on the same model sends nothing). Its checks (compiled,
    built, XLA, mixed precision) run at `on_train_begin`. With hvdclip's `DistributedOptimizer`
    it also keeps the ranks' epochs in step: at each epoch's start the ranks agree on its length
    from each one's number of batches (`hvdclip.keras.train_function`).

    Args:
        root_rank: the rank whose state every rank starts from; hvdclip supports 0 only (the
            rank that also writes checkpoints and logs).
        device: accepted for Horovod's signature; the broadcast runs where Horovod places it.
    """

    def __init__(self, root_rank: int = 0, device: str = "") -> None:
        super().__init__()
        check_int("root_rank", root_rank, ge=0)
        if root_rank != 0:
            raise ValueError(
                "`root_rank` must be 0: hvdclip starts every rank from rank 0, the rank that also writes "
                f"checkpoints and logs. Received: root_rank={root_rank!r}"
            )
        if not isinstance(device, str):
            raise TypeError(f"`device` must be a device name such as '/cpu:0', or ''. Received: device={device!r}")
        self.root_rank = root_rank
        self.device = device
        self._sent = False

    def on_train_begin(self, logs=None):
        prepare_fit(self.model)
        self._sent = False

    def on_train_batch_begin(self, batch, logs=None):
        if not self._sent:
            broadcast_initial_state(self.model)
            self._sent = True

    def on_epoch_begin(self, epoch, logs=None):
        function = self.model.train_function
        if isinstance(function, train_function.TrainFunction):
            function.begin_epoch(self.params.get("steps"))
