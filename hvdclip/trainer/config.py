"""`FitConfig`: `HvdClipTrainer.fit`'s arguments, validated once, before anything runs or is traced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from hvdclip.trainer.callbacks import Callback, CallbackList
from hvdclip.trainer.data import InputPlan, check_class_weight
from hvdclip.trainer.elastic import Elastic, check_elastic
from hvdclip.trainer.evaluation import check_metrics
from hvdclip.validation import check_int

__all__ = ["FitConfig"]


@dataclass(frozen=True)
class FitConfig:
    """One `fit` call's arguments (see `HvdClipTrainer.fit` for each), checked.

    Attributes:
        dataset, validation_data: as given; `plans` splits them for a world.
        epochs, steps_per_epoch, batch_size, shuffle_buffer, shard, verbose: as given, checked.
        validation_metrics: the checked list (empty if none).
        callbacks: the user's callbacks, Keras ones wrapped (`KerasCallback`).
        class_weights: one weight per class index, or None.
        elastic: the elastic policy, or None (also when `elastic=` was given outside an elastic launch).
    """

    dataset: tf.data.Dataset
    epochs: int
    steps_per_epoch: int | None
    batch_size: int | None
    shuffle_buffer: int | None
    shard: Any
    validation_data: tf.data.Dataset | None
    validation_metrics: tuple[keras.metrics.Metric, ...]
    callbacks: tuple[Callback, ...]
    class_weights: tf.Tensor | None
    verbose: int
    elastic: Elastic | None

    @classmethod
    def checked(cls, *, dataset, epochs, steps_per_epoch, batch_size, shuffle_buffer, shard, validation_data,
                validation_metrics, callbacks, class_weight, verbose, elastic, rank: int, size: int) -> FitConfig:  # fmt: skip
        """Validates every argument, in `fit`'s order of parameters, raising on the first that is wrong."""
        _plans(dataset, validation_data, shard, batch_size, shuffle_buffer, rank, size)  # The data arguments.
        epochs = check_int("epochs", epochs, ge=1)
        if steps_per_epoch is not None:
            steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, ge=1)
        metrics = tuple(check_metrics("validation_metrics", validation_metrics))
        if metrics and validation_data is None:
            raise ValueError(f"`validation_metrics` needs `validation_data`. Received: validation_metrics={list(metrics)!r}")
        return cls(
            dataset=dataset,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            shard=shard,
            validation_data=validation_data,
            validation_metrics=metrics,
            callbacks=tuple(CallbackList.checked(callbacks)),
            class_weights=check_class_weight(class_weight),
            verbose=check_int("verbose", verbose, ge=0, le=2),
            elastic=check_elastic(elastic),
        )

    def plans(self, rank: int, size: int) -> tuple[InputPlan, InputPlan | None]:
        """The training data and the validation data (if any) split for a world of `size` ranks."""
        return _plans(self.dataset, self.validation_data, self.shard, self.batch_size, self.shuffle_buffer, rank, size)


def _plans(dataset, validation_data, shard, batch_size, shuffle_buffer, rank, size) -> tuple[InputPlan, InputPlan | None]:
    plan = InputPlan.checked(
        "dataset", dataset, rank=rank, size=size, shard=shard, batch_size=batch_size, shuffle_buffer=shuffle_buffer
    )
    validation = None
    if validation_data is not None:
        validation = InputPlan.checked(
            "validation_data", validation_data, rank=rank, size=size, shard=shard, batch_size=batch_size,
            drop_remainder=False,
        )  # fmt: skip
    return plan, validation
