"""`LearningRateWarmupCallback`: Horovod's gradual warmup from `initial_lr / size` to `initial_lr`."""

from __future__ import annotations

import math

from horovod.tensorflow.mpi_ops import rank, size

from hvdclip.keras.callbacks.learning_rate_schedule import LearningRateScheduleCallback
from hvdclip.validation import check_int, check_number

__all__ = ["LearningRateWarmupCallback"]


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Raises the learning rate from `initial_lr / size` to `initial_lr` over `warmup_epochs`, batch by batch.

    Horovod's signature, defaults and semantics (Goyal et al. 2017, "Accurate, Large Minibatch
    SGD"): at batch b of epoch e, with `epoch = e + (b + 1) / steps_per_epoch`, the rate is
    `initial_lr / size * (epoch * (size - 1) / warmup_epochs + 1)`, so the last batch of the
    warmup runs at `initial_lr`; after it the rate is left alone. `size` is Horovod's world size
    when the batch starts. On Keras 3 optimizers, with momentum correction as
    `LearningRateScheduleCallback` does it.

    Args:
        initial_lr: the rate to reach, usually the single-process rate times `hvd.size()`.
        warmup_epochs: epochs the warmup takes.
        momentum_correction: scale the momentum buffers by new/old rate at each change.
        steps_per_epoch: batches per epoch; default: what `fit` was given.
        verbose: 1 prints, on rank 0, when the warmup ends.

    Example:
        >>> hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.001 * hvd.size(), warmup_epochs=3, verbose=1)
    """

    def __init__(
        self,
        initial_lr: float,
        warmup_epochs: int = 5,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
        verbose: int = 0,
    ) -> None:
        warmup_epochs = check_number("warmup_epochs", warmup_epochs, gt=0)

        def multiplier(epoch: float) -> float:
            # Shifted by one batch, so the rate is a round number at the end of each epoch (Horovod's choice).
            epoch += 1.0 / self.steps_per_epoch
            return 1.0 / size() * (epoch * (size() - 1) / warmup_epochs + 1)

        super().__init__(
            initial_lr,
            multiplier,
            start_epoch=0,
            end_epoch=math.ceil(warmup_epochs),  # Horovod's end is warmup_epochs, compared with whole epochs.
            staircase=False,
            momentum_correction=momentum_correction,
            steps_per_epoch=steps_per_epoch,
        )
        self.warmup_epochs = warmup_epochs
        self.verbose = check_int("verbose", verbose, ge=0)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and rank() == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {self._learning_rate():g}.")

