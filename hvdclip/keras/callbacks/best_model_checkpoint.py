"""`BestModelCheckpoint`: Horovod's `ModelCheckpoint` that keeps the best model only, on Keras 3.

Horovod's makes a `ModelCheckpoint` with `filepath=None`, to be set before training (its Spark
estimator sets it); Keras 3's `ModelCheckpoint` checks the file's suffix when it is made and fails
on None. This one checks the path when training starts, and writes from rank 0 only, so that it
can sit in every rank's callback list (several ranks writing one file would corrupt it).
"""

from __future__ import annotations

import os

import keras
from horovod.tensorflow.mpi_ops import rank

from hvdclip.validation import check_bool, check_int

__all__ = ["BestModelCheckpoint"]

_MODES = ("auto", "min", "max")
# Stands in for the path until it is set: ModelCheckpoint checks the suffix in its constructor.
_PENDING = {False: "pending.keras", True: "pending.weights.h5"}


def _check_filepath(filepath, save_weights_only: bool) -> None:
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"`filepath` must be a path (str or os.PathLike) or None. Received: filepath={filepath!r}")
    # Keras 3's suffixes: its own format or the legacy HDF5 one; weights alone in `.weights.h5`.
    suffixes = (".weights.h5",) if save_weights_only else (".keras", ".h5")
    if not os.fspath(filepath).endswith(suffixes):
        raise ValueError(
            f"`filepath` must end in {' or '.join(suffixes)} (Keras 3's formats"
            f"{' for weights alone' if save_weights_only else ''}). Received: filepath={filepath!r}"
        )


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Saves the model whenever `monitor` improves (`save_best_only=True`), on rank 0.

    Horovod's signature and defaults, plus `filepath` (Horovod's has none: set the attribute
    `filepath` before `fit`, or pass it here). Put it after `MetricAverageCallback`, so that rank 0
    decides on the mean over ranks.

    Args:
        monitor, verbose, save_weights_only, mode, save_freq: as for `keras.callbacks.ModelCheckpoint`.
        filepath: where to save: a `.keras` (or legacy `.h5`) file, or `.weights.h5` with
            `save_weights_only=True`; it may hold `{epoch}` and log names.

    Example:
        >>> checkpoint = hvd.callbacks.BestModelCheckpoint(monitor="val_loss", filepath="best.keras")
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq="epoch",
        filepath: str | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise (TypeError if not isinstance(monitor, str) else ValueError)(
                f"`monitor` must be the name of a logged metric (a non-empty str). Received: monitor={monitor!r}"
            )
        check_int("verbose", verbose, ge=0)
        check_bool("save_weights_only", save_weights_only)
        if not isinstance(mode, str) or mode not in _MODES:
            raise (TypeError if not isinstance(mode, str) else ValueError)(
                f"`mode` must be one of {_MODES}. Received: mode={mode!r}"
            )
        if save_freq != "epoch":
            if not isinstance(save_freq, int) or isinstance(save_freq, bool):
                raise TypeError(f"`save_freq` must be 'epoch' or an integer >= 1. Received: save_freq={save_freq!r}")
            check_int("save_freq", save_freq, ge=1)
        if filepath is not None:
            _check_filepath(filepath, save_weights_only)
        super().__init__(
            filepath=_PENDING[save_weights_only] if filepath is None else filepath,
            monitor=monitor,
            verbose=verbose,
            save_best_only=True,
            save_weights_only=save_weights_only,
            mode=mode,
            save_freq=save_freq,
        )
        if filepath is None:
            self.filepath = None

    def on_train_begin(self, logs=None):
        if self.filepath is None:
            raise ValueError(
                "BestModelCheckpoint needs `filepath`, where to save the best model: pass filepath=... or set the "
                "attribute before fit. Received: filepath=None"
            )
        _check_filepath(self.filepath, self.save_weights_only)
        super().on_train_begin(logs)

    def on_train_batch_end(self, batch, logs=None):
        if rank() == 0:
            super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if rank() == 0:
            super().on_epoch_end(epoch, logs)
