"""Learning-rate scaling for data-parallel training: the linear scaling rule with gradual warmup.

Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour": when the global
batch grows k-fold (k ranks, each with the single-process batch), multiply the learning rate by k,
and reach that rate gradually, from the single-process rate, over the first 5 epochs, because the
scaled rate is too large while the weights still change quickly.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from hvdclip.distributed import runtime
from hvdclip.validation import check_int, check_number

__all__ = ["ScaledWarmup"]


@keras.saving.register_keras_serializable(package="hvdclip")
class ScaledWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`base_lr` times a factor that grows linearly from 1 to `size` over the warmup, then stays.

    At optimizer step t (Keras' `optimizer.iterations`, from 0), with W warmup steps:
    `lr(t) = base_lr(t) * (1 + (size - 1) * min(t, W) / W)`. So step 0 uses the single-process
    rate and every step from W on uses `size` times it. `base_lr` may itself be a schedule (a
    decay), which is then scaled the same way.

    Args:
        base_lr: the learning rate that suits one process with this per-rank batch size: a
            number > 0 or a `keras.optimizers.schedules.LearningRateSchedule`.
        steps_per_epoch: optimizer steps in one epoch (per rank, which is the same on all ranks).
        warmup_epochs: epochs to reach the scaled rate; 0 scales from the first step.
        size: the number of ranks; `None` means `hvdclip.size()`.

    Example:
        >>> lr = hvdclip.ScaledWarmup(1e-3, steps_per_epoch=100)   # 5 warmup epochs
        >>> optimizer = keras.optimizers.SGD(lr, momentum=0.9)
    """

    def __init__(
        self,
        base_lr: float | keras.optimizers.schedules.LearningRateSchedule,
        steps_per_epoch: int,
        warmup_epochs: float = 5,
        size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_lr, keras.optimizers.schedules.LearningRateSchedule):
            base_lr = check_number("base_lr", base_lr, gt=0)
        self.base_lr = base_lr
        self.steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, ge=1)
        self.warmup_epochs = check_number("warmup_epochs", warmup_epochs, ge=0)
        self.size = runtime.size() if size is None else check_int("size", size, ge=1)

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        base = self.base_lr(step) if callable(self.base_lr) else tf.constant(self.base_lr, tf.float32)
        if self.warmup_steps == 0:
            progress = tf.constant(1.0)
        else:
            progress = tf.minimum(step / float(self.warmup_steps), 1.0)
        return tf.cast(base, tf.float32) * (1.0 + (self.size - 1) * progress)

    def get_config(self) -> dict:
        base_lr = self.base_lr
        if isinstance(base_lr, keras.optimizers.schedules.LearningRateSchedule):
            base_lr = keras.optimizers.schedules.serialize(base_lr)
        return {
            "base_lr": base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
            "size": self.size,
        }

    @classmethod
    def from_config(cls, config: dict) -> ScaledWarmup:
        config = dict(config)
        if isinstance(config["base_lr"], dict):
            config["base_lr"] = keras.optimizers.schedules.deserialize(config["base_lr"])
        return cls(**config)
