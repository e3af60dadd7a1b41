"""`LearningRateScheduleCallback`: Horovod's learning-rate schedule by epoch, on Keras 3 optimizers.

Horovod's reads and writes `optimizer.lr` and `optimizer.momentum` with `keras.backend.get_value`
and `set_value`, all gone in Keras 3. Keras 3 keeps the learning rate in a variable
(`optimizer.learning_rate`), which this callback assigns. It keeps the momentum as a Python
float that the compiled train step read when it was traced, so Horovod's momentum correction (the
momentum times new/old rate for the one batch after a change) would not reach the step. It
scales the optimizer's momentum buffers by new/old rate instead, before that batch: the same
update (the velocity there is `momentum * velocity - rate * gradient`), and the correction of
Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 2.2. (One difference: with
`SGD(nesterov=True)` the look-ahead term of that one step keeps the uncorrected momentum.)
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import keras
import tensorflow as tf

from hvdclip import foreign
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.validation import check_bool, check_int, check_number

__all__ = ["LearningRateScheduleCallback"]


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Sets the learning rate to `initial_lr * multiplier(epoch)` for epochs in `[start_epoch, end_epoch)`.

    Horovod's signature, defaults and semantics. With `staircase=True` the rate is set at the
    first batch of each epoch, from the integer epoch; with `staircase=False` at every batch,
    from the fractional epoch `epoch + batch / steps_per_epoch`. A number `multiplier` means
    `multiplier ** (epoch - start_epoch)` (exponential decay). Outside the range the rate is left
    as it is. Each epoch's logs get `lr`, the rate at its end.

    Args:
        initial_lr: the rate the multiplier scales (a number > 0; Horovod requires it too).
        multiplier: a number, or a function of the epoch returning the factor.
        start_epoch: the first epoch the schedule applies to.
        end_epoch: the epoch it stops applying at (exclusive); None: never.
        staircase: set the rate once per epoch (True) or at every batch (False).
        momentum_correction: when the rate changes, scale the momentum buffers of an optimizer
            with `momentum` (SGD, RMSprop) by new/old rate for that step, as Horovod does.
        steps_per_epoch: batches per epoch, for `staircase=False`; default: what `fit` was given.

    Example:
        >>> callbacks = [hvd.callbacks.LearningRateScheduleCallback(0.1 * hvd.size(), 0.1, start_epoch=30)]
    """

    def __init__(
        self,
        initial_lr: float,
        multiplier: float | Callable[[float], float],
        start_epoch: int = 0,
        end_epoch: int | None = None,
        staircase: bool = True,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if initial_lr is None:
            raise ValueError("Parameter `initial_lr` is required. Received: initial_lr=None")
        self.initial_lr = check_number("initial_lr", initial_lr, gt=0)
        self.start_epoch = check_int("start_epoch", start_epoch, ge=0)
        if end_epoch is not None:
            check_int("end_epoch", end_epoch, ge=self.start_epoch)
        self.end_epoch = end_epoch
        self.staircase = check_bool("staircase", staircase)
        self.momentum_correction = check_bool("momentum_correction", momentum_correction)
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, ge=1)
        self.steps_per_epoch = steps_per_epoch
        if callable(multiplier):
            self.multiplier = multiplier
        elif isinstance(multiplier, numbers.Real) and not isinstance(multiplier, bool):
            factor = float(multiplier)
            self.multiplier = lambda epoch: factor ** (epoch - start_epoch)
        else:
            raise TypeError(f"`multiplier` must be a number or a function of the epoch. Received: multiplier={multiplier!r}")
        self.current_epoch: int | None = None
        # The optimizer's momentum buffers, found once it is built (None until then).
        self._momentum_buffers: list | None = None

    # ------------------------------------------------------------------ Keras hooks

    def on_train_begin(self, logs=None):
        rate = getattr(_applying_optimizer(self.model.optimizer), "_learning_rate", None)
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                f"{type(self).__name__} sets the optimizer's learning rate, but the optimizer follows a "
                f"LearningRateSchedule ({type(rate).__name__}), which Keras does not let a callback overwrite: give "
                "the optimizer a number as learning_rate, or use the schedule without this callback."
            )
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self._autodetect_steps_per_epoch()
        self._momentum_buffers = None if self.momentum_correction else []

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_batch_begin(self, batch, logs=None):
        if self.current_epoch < self.start_epoch or (self.end_epoch is not None and self.current_epoch >= self.end_epoch):
            return  # Outside the schedule's epochs.
        if self.staircase and batch == 0:
            self._adjust_learning_rate(self.current_epoch)
        elif not self.staircase:
            self._adjust_learning_rate(self.current_epoch + float(batch) / self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = self._learning_rate()

    # ------------------------------------------------------------------ the schedule

    def _learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def _adjust_learning_rate(self, epoch: float) -> None:
        old_lr = self._learning_rate()
        new_lr = self.initial_lr * self.multiplier(epoch)
        self.model.optimizer.learning_rate = new_lr
        if self._momentum_buffers is None:
            self._momentum_buffers = as_tf_variables(_momentum_buffers(self.model.optimizer) or []) or None
        if self._momentum_buffers and old_lr > 0 and new_lr != old_lr:
            _scale(self._momentum_buffers, tf.constant(new_lr / old_lr, tf.float32))

    def _autodetect_steps_per_epoch(self) -> int:
        steps = self.params.get("steps")
        if steps:
            return steps
        raise ValueError(
            "Could not autodetect the number of steps per epoch: fit does not know it (a dataset of unknown "
            f"length). Pass steps_per_epoch to fit or to {type(self).__name__}()."
        )


def _applying_optimizer(optimizer):
    """The optimizer that applies the update, inside hvdclip's and Keras' wrappers (`inner_optimizer`)."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _momentum_buffers(optimizer) -> list | None:
    """The variables of `optimizer` holding `rate * gradient` terms that its momentum decays.

    [] if it has none (Adam and others have no `momentum`; SGD and RMSprop keep no buffers with
    momentum 0); None if it is not built yet (its buffers are still to come, and zero).
    """
    inner = _applying_optimizer(optimizer)
    if not getattr(inner, "momentum", 0):
        return []
    if not inner.built:
        return None
    if isinstance(inner, keras.optimizers.SGD):
        return list(inner.momentums)
    if isinstance(inner, keras.optimizers.RMSprop):
        return foreign.rmsprop_momentums(inner)
    warnings.warn(
        f"momentum_correction=True has no effect with {type(inner).__name__}: on Keras 3 the momentum is fixed when "
        "the train step is traced, and hvdclip scales the momentum buffers of SGD and RMSprop only. Pass "
        "momentum_correction=False to silence this.",
        stacklevel=3,
    )
    return []


@tf.function(autograph=False)
def _scale(variables: list, factor: tf.Tensor) -> None:
    for variable in variables:
        variable.assign(variable * tf.cast(factor, variable.dtype))
