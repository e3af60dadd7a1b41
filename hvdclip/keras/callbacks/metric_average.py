"""`MetricAverageCallback`: epoch metrics averaged over ranks, plus the clip stage's metrics."""

from __future__ import annotations

import numbers

import keras
import numpy as np

from hvdclip.distributed.collectives import sum_over_ranks
from hvdclip.distributed.runtime import size
from hvdclip.keras.optimizer import DistributedOptimizer

__all__ = ["MetricAverageCallback"]


class MetricAverageCallback(keras.callbacks.Callback):
    """Averages each epoch's logs over ranks and adds `grad_norm`, `clipped_grad_norm`, `clip_rate`, `skipped`.

    Keras computes `loss` and compiled metrics on each rank's own batches; this replaces each with
    its mean over ranks (one allreduce per epoch), so every rank logs, and later callbacks
    (`ReduceLROnPlateau`, `EarlyStopping`, `ModelCheckpoint`) decide on, the same numbers. Put it
    before those callbacks in the list. With `hvdclip.keras.DistributedOptimizer` it also logs
    the epoch's mean reduced-gradient norm before and after clipping, the fraction of optimizer
    steps that clipped, and the steps skipped for NaN/Inf (computed after the reduction: the same
    on every rank). A mean over ranks of per-rank means is the exact mean over examples only when
    every rank saw as many examples, which hvdclip's train function sees to for the steps.

    Args:
        device: accepted for Horovod's signature; the allreduce runs where Horovod places it.
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()
        if not isinstance(device, str):
            raise TypeError(f"`device` must be a device name such as '/cpu:0', or ''. Received: device={device!r}")
        self.device = device

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        if isinstance(optimizer, DistributedOptimizer):
            optimizer.reset_step_metrics()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        names = sorted(name for name, value in logs.items() if isinstance(value, numbers.Real))
        if names:
            sums = sum_over_ranks(np.array([float(logs[name]) for name in names], np.float64), "epoch_logs")
            logs.update({name: float(value) / size() for name, value in zip(names, sums)})
        optimizer = getattr(self.model, "optimizer", None)
        if isinstance(optimizer, DistributedOptimizer):
            logs.update(optimizer.step_metrics())
