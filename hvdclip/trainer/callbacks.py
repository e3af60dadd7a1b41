"""Callbacks for `HvdClipTrainer.fit`: the interface, Keras callbacks inside it, and the progress bar `verbose` adds.

Every rank runs every callback with the same arguments at the same point of the loop. Epoch logs
are averaged over ranks, so a decision based on them (stop now) is the same everywhere. Callbacks
that write (progress bar, TensorBoard, checkpoints) do so on rank 0 only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import keras

from hvdclip.distributed.rank_zero import is_rank_zero
from hvdclip.trainer.step_logs import display_name
from hvdclip.validation import check_int, check_number

__all__ = ["Callback", "CallbackList", "KerasCallback", "ProgressBar"]


class Callback:
    """Base class: override the hooks you need.

    Attributes:
        trainer: the `HvdClipTrainer` running `fit`; set `trainer.stop_training = True` to stop
            after the current epoch (ranks agree: if any rank asks, all stop).
        params: `{"epochs": ..., "steps": ..., "verbose": ...}`, `steps` being steps per epoch.

    Hooks:
        on_train_begin(logs): before the first step (after a restore, if any).
        on_epoch_begin(epoch, logs): `logs["first_step"]` is the step the epoch starts at
            (not 0 when resuming mid-epoch).
        on_step_end(step, logs): `step` is the trainer's global step count after this step;
            `logs` maps each step metric to a scalar tensor on the device (reading one with
            `float()` waits for the device, so do it only when needed) and holds `samples`, the
            number of examples this rank's batch had.
        on_epoch_end(epoch, logs): `logs` maps each metric to a Python float, averaged over the
            epoch's steps and over ranks, plus `val_*` metrics when `fit` has `validation_data`.
        on_train_end(logs): after the last epoch, with the last epoch's logs.

    Example:
        >>> class PrintNorm(hvdclip.Callback):
        ...     def on_epoch_end(self, epoch, logs):
        ...         if hvdclip.rank() == 0:
        ...             print(epoch, logs["grad_norm"])
    """

    trainer: Any = None
    params: dict = {}

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def set_params(self, params: dict) -> None:
        self.params = params

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        pass

    def on_step_end(self, step: int, logs: Mapping[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float]) -> None:
        pass

    def on_train_end(self, logs: Mapping[str, float] | None = None) -> None:
        pass


class CallbackList:
    """Calls each hook on every callback, in the order given."""

    def __init__(self, callbacks: Sequence[Callback], trainer: Any, params: dict) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            callback.set_trainer(trainer)
        self.set_params(params)

    def set_params(self, params: dict) -> None:
        """Gives every callback `params` (again when an elastic resize changed the steps per epoch)."""
        self.params = params
        for callback in self.callbacks:
            callback.set_params(params)

    @staticmethod
    def checked(callbacks: Any) -> list[Callback]:
        """Validates `fit`'s `callbacks=` argument; Keras callbacks are wrapped in `KerasCallback`."""
        if callbacks is None:
            return []
        what = "a list of Keras callbacks or hvdclip.Callback objects"
        if isinstance(callbacks, (Callback, keras.callbacks.Callback)) or not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"`callbacks` must be {what}. Received: callbacks={callbacks!r}")
        checked = []
        for position, callback in enumerate(callbacks):
            if isinstance(callback, keras.callbacks.Callback):
                callback = KerasCallback(callback)
            if not isinstance(callback, Callback):
                raise TypeError(f"`callbacks` must be {what}. Received: callbacks[{position}]={callback!r}")
            checked.append(callback)
        return checked

    def on_train_begin(self, logs=None):
        for callback in self.callbacks:
            callback.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        for callback in self.callbacks:
            callback.on_epoch_begin(epoch, logs)

    def on_step_end(self, step, logs):
        for callback in self.callbacks:
            callback.on_step_end(step, logs)

    def on_epoch_end(self, epoch, logs):
        for callback in self.callbacks:
            callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        for callback in self.callbacks:
            callback.on_train_end(logs)


# What the progress bar shows during an epoch; at its end it adds the validation metrics.
_SHOWN = ("loss", "grad_norm", "clip_active")


class ProgressBar(Callback):
    """A Keras `Progbar` on rank 0: loss, gradient norm, clip rate and steps/s; silent elsewhere.

    `fit(verbose=1)` adds one; `verbose=2` prints one line per epoch instead of a live bar.
    The loss shown during an epoch is rank 0's running mean (the sums `fit`'s compiled step keeps);
    the line at the end of the epoch shows the epoch's means over all ranks. Metrics are read from
    the device only when the bar is redrawn (at most every `interval` seconds), not at every step.

    Args:
        verbose: 1 for a live bar, 2 for one line per epoch.
        sums: the epoch's running sums of the step metrics (`FitState.epoch_sums`), read at each redraw.
        interval: minimum seconds between redraws of the live bar.
    """

    def __init__(self, verbose: int, sums: Any, interval: float = 0.05) -> None:
        self.verbose = check_int("verbose", verbose, ge=1, le=2)
        self.interval = check_number("interval", interval, ge=0)
        self._sums = sums
        self._bar: keras.utils.Progbar | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if not is_rank_zero():
            return
        # One write, so that launchers that tag each chunk of output (mpirun) tag one whole line.
        sys.stdout.write(f"Epoch {epoch + 1}/{self.params['epochs']}\n")
        sys.stdout.flush()
        self._bar = keras.utils.Progbar(self.params["steps"], verbose=self.verbose, stateless_metrics=[])
        self._done = (logs or {}).get("first_step", 0)
        self._run = 0
        self._epoch_start = self._last_draw = self._last_step = time.perf_counter()

    def on_step_end(self, step, logs):
        if self._bar is None:
            return
        self._done += 1
        self._run += 1
        now = self._last_step = time.perf_counter()
        if self.verbose == 1 and now - self._last_draw >= self.interval:
            self._last_draw = now
            means = self._sums.means()  # This rank's steps of the epoch so far.
            self._bar.update(self._done, self._values(means), finalize=False)

    def on_epoch_end(self, epoch, logs):
        if self._bar is None:
            return
        values = self._values(logs)
        values += [(name, value) for name, value in logs.items() if name.startswith("val_")]
        self._bar.update(self._done, values, finalize=True)  # The steps run: `steps` is None for data of unknown length.
        self._bar = None

    def _values(self, means: Mapping[str, float]) -> list[tuple[str, float]]:
        values = [(display_name(name), means[name]) for name in _SHOWN if name in means]
        elapsed = self._last_step - self._epoch_start  # Training steps only, not validation.
        values.append(("steps/s", self._run / elapsed if elapsed > 0 else 0.0))
        return values


class KerasCallback(Callback):
    """Runs a Keras callback inside `HvdClipTrainer.fit`, on the trainer's model.

    Keras' own callbacks work unchanged: the epoch logs they read are the same on every rank
    (means over ranks), so `EarlyStopping` and `ReduceLROnPlateau` decide the same everywhere; a
    callback that sets `model.stop_training` stops every rank after that epoch. The model's
    `optimizer` attribute is the trainer's optimizer (for learning-rate callbacks). Batch hooks
    receive the step's metrics as Python floats, read from the device only for callbacks that
    implement them.
    """

    def __init__(self, callback: keras.callbacks.Callback) -> None:
        self.callback = callback
        batch_hooks = getattr(callback, "_implements_train_batch_hooks", lambda: True)
        self._batch_hooks = bool(batch_hooks())
        self._epoch_first_step = 0

    def set_trainer(self, trainer: Any) -> None:
        super().set_trainer(trainer)
        if getattr(trainer.model, "optimizer", None) is None:
            trainer.model.optimizer = trainer.optimizer
        self.callback.set_model(trainer.model)

    def set_params(self, params: dict) -> None:
        super().set_params(params)
        self.callback.set_params({"epochs": params["epochs"], "steps": params["steps"], "verbose": params["verbose"]})

    def on_train_begin(self, logs=None):
        self.callback.on_train_begin({})

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_first_step = self.trainer.global_step.numpy()
        self.callback.on_epoch_begin(epoch, {})

    def on_step_end(self, step, logs):
        if self._batch_hooks:
            values = {name: float(value) for name, value in logs.items()}
            self.callback.on_train_batch_end(int(step - self._epoch_first_step) - 1, values)

    def on_epoch_end(self, epoch, logs):
        self.callback.on_epoch_end(epoch, logs)
        if getattr(self.trainer.model, "stop_training", False):
            self.trainer.stop_training = True

    def on_train_end(self, logs=None):
        self.callback.on_train_end(dict(logs or {}))
