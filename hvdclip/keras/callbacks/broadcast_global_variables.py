"""`BroadcastGlobalVariablesCallback`: one broadcast of rank 0's state when `fit` starts, and every rank's
epochs kept in step."""

from __future__ import annotations

from typing import Any

import keras

from hvdclip.keras import train_function
from hvdclip.keras.startup import broadcast_initial_state, prepare_fit
from hvdclip.keras.optimizer import DistributedOptimizer
from hvdclip.validation import check_int

__all__ = ["BroadcastGlobalVariablesCallback"]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Starts every rank from rank 0's weights, optimizer slots and clip state, before any step.

    Horovod's callback of the same name broadcasts after the first batch, so each rank's first step
    is applied to its own weights. With hvdclip's `DistributedOptimizer` the broadcast happens just
    before the first step instead, inside hvdclip's train function: after every callback's
    `on_train_begin` (a `BackupAndRestore`, or a load on rank 0, reaches every rank) and after Keras
    has built a model without `Input` from the first batch; never again (a second `fit` sends
    nothing). This callback then checks the model at `on_train_begin` (compiled, XLA, mixed
    precision) and, at each epoch's start, gives the train function Keras' count of this rank's
    batches, so the ranks agree on the epoch's length (`hvdclip.keras.train_function`). With a
    plain Keras optimizer it broadcasts at the first batch's begin (the model must be built by
    then: give it a `keras.Input`). It implements no batch-*end* hook, which would make Keras read
    every step's logs back from the device before the next step.

    Args:
        root_rank: the rank whose state every rank starts from; hvdclip supports 0 only (the
            rank that also writes checkpoints and logs).
        device: accepted for Horovod's signature; the broadcast runs where Horovod places it.
        local_variables: Horovod's variables to leave out of the broadcast; hvdclip sends every
            model variable (rank-local state it knows of stays each rank's), so only None is taken.
    """

    def __init__(self, root_rank: int = 0, device: str = "", local_variables: Any = None) -> None:
        super().__init__()
        check_int("root_rank", root_rank, ge=0)
        if root_rank != 0:
            raise ValueError(
                "`root_rank` must be 0: hvdclip starts every rank from rank 0, the rank that also writes "
                f"checkpoints and logs. Received: root_rank={root_rank!r}"
            )
        if not isinstance(device, str):
            raise TypeError(f"`device` must be a device name such as '/cpu:0', or ''. Received: device={device!r}")
        if local_variables is not None:
            raise ValueError(
                "`local_variables` must be None: hvdclip broadcasts every model variable once, before the first "
                "step (the rank-local state it knows of, BatchNorm statistics and random seeds, stays each rank's). "
                f"Received: local_variables={local_variables!r}"
            )
        self.root_rank = root_rank
        self.device = device
        self._sent = False

    def on_train_begin(self, logs=None):
        self._ours = isinstance(self.model.optimizer, DistributedOptimizer)
        self._sent = self._ours  # hvdclip's train function sends it, just before the first step.
        if self._ours and self.model.built:
            prepare_fit(self.model)  # Its checks now, before the first epoch's agreements.

    def on_train_batch_begin(self, batch, logs=None):
        if not self._sent:  # A plain Keras optimizer: hvdclip's train function is not there to send it.
            broadcast_initial_state(self.model)
            self._sent = True

    def on_epoch_begin(self, epoch, logs=None):
        function = self.model.train_function
        if isinstance(function, train_function.TrainFunction):
            function.begin_epoch(self.params.get("steps"))
