"""Input pipelines for `fit` and `evaluate`: each rank's part of a `tf.data.Dataset`.

The order is shard -> shuffle -> batch. Sharding first means the shards are disjoint whatever the
shuffle seeds are, as long as every rank builds the *same* dataset in the same order (a fixed
file list, or a `shuffle` with a fixed seed). Shuffling after sharding reorders each rank's own
part every epoch, with a seed drawn from the trainer's checkpointed RNG. (`tf.data` combines that
seed with TensorFlow's global seed, so a resumed job must set the global seed as the original did,
which running the same script does.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from hvdclip.validation import check_bool, check_int, check_number

__all__ = ["InputPlan", "batch_size_of", "check_batch", "check_class_weight"]


@dataclass(frozen=True)
class InputPlan:
    """How to turn the dataset given to `fit`/`evaluate` into this rank's batches.

    Attributes:
        dataset: what the user passed: `(x, y)` batches, or single examples when `batch_size` is set.
        rank, size: this rank and the number of ranks.
        shard: keep every `size`-th element, starting at `rank`; False when each rank already
            reads its own part.
        batch_size: batch single examples into batches of this many, per rank; None when
            `dataset` is already batched.
        drop_remainder: drop each rank's last, smaller batch (training: every step has the same
            batch size).
        shuffle_buffer: shuffle this rank's elements with a buffer of this many, reseeded each
            epoch; None for no shuffling.
    """

    dataset: tf.data.Dataset
    rank: int
    size: int
    shard: bool = True
    batch_size: int | None = None
    drop_remainder: bool = True
    shuffle_buffer: int | None = None

    @classmethod
    def checked(cls, argument: str, dataset: Any, *, rank: int, size: int, shard: Any = True,
                batch_size: Any = None, drop_remainder: bool = True, shuffle_buffer: Any = None) -> InputPlan:
        """Validates the user's arguments (`argument` is the dataset's parameter name)."""
        what = "(x, y) or (x, y, sample_weight) " + ("examples" if batch_size is not None else "batches")
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(f"`{argument}` must be a tf.data.Dataset of {what}. Received: {argument}={dataset!r}")
        if not isinstance(dataset.element_spec, (tuple, list)) or len(dataset.element_spec) not in (2, 3):
            raise ValueError(f"`{argument}` must be a tf.data.Dataset of {what}. Received: {argument}={dataset!r}")
        if int(dataset.cardinality()) == 0:
            raise ValueError(f"`{argument}` must not be empty. Received: {argument}={dataset!r}")
        check_bool("shard", shard)
        if batch_size is not None:
            check_int("batch_size", batch_size, ge=1)
        if shuffle_buffer is not None:
            check_int("shuffle_buffer", shuffle_buffer, ge=1)
        return cls(dataset, rank, size, shard, batch_size, drop_remainder, shuffle_buffer)

    def for_epoch(self, seed: int = 0) -> tf.data.Dataset:
        """This rank's batches for one epoch; `seed` reseeds the shuffle (same seed, same order)."""
        dataset = self.dataset
        if self.shard and self.size > 1:
            dataset = dataset.shard(self.size, self.rank)
        if self.shuffle_buffer is not None:
            dataset = dataset.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        if self.batch_size is not None:
            dataset = dataset.batch(self.batch_size, drop_remainder=self.drop_remainder)
        return dataset

    def sample_batch(self) -> Any:
        """The first batch's `x` (unshuffled), to build a model that creates its weights on first call."""
        dataset = self.dataset if self.batch_size is None else self.dataset.batch(self.batch_size)
        for element in dataset.take(1):
            return element[0]
        raise ValueError("`dataset` is empty, so there is nothing to train or evaluate on.")

    def warn_if_uneven(self) -> None:
        """Warns when the ranks' shards differ in length (call it on one rank only).

        Every rank runs the shortest shard's number of steps, or an allreduce would wait forever,
        so the longer shards' last elements are skipped each epoch.
        """
        total = int(self.dataset.cardinality())
        if not self.shard or self.size == 1 or total < 0 or total % self.size == 0:
            return
        unit = "examples" if self.batch_size is not None else "batches"
        short, extra = divmod(total, self.size)
        warnings.warn(
            f"`dataset` has {total} {unit}, which {self.size} ranks cannot split evenly: {extra} rank(s) get "
            f"{short + 1} and the others {short}. Every rank runs as many steps as the shortest shard allows, "
            f"so up to {extra} {unit} are skipped each epoch; a length divisible by {self.size} uses them all.",
            stacklevel=4,
        )


def check_class_weight(class_weight: Any) -> tf.Tensor | None:
    """`fit`'s `class_weight` ({class index: weight}) as a dense weight per class, or None."""
    if class_weight is None:
        return None
    if (
        not isinstance(class_weight, dict)
        or not class_weight
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in class_weight)
    ):
        raise TypeError(
            "`class_weight` must be a dict from class index (int >= 0) to weight, e.g. {0: 1.0, 1: 5.0}. "
            f"Received: class_weight={class_weight!r}"
        )
    weights = [0.0] * (max(class_weight) + 1)
    for index, weight in class_weight.items():
        weights[index] = check_number(f"class_weight[{index}]", weight, ge=0)
    return tf.constant(weights, tf.float32)


def with_class_weight(batches: tf.data.Dataset, weights: tf.Tensor) -> tf.Tensor:
    """Batches `(x, y[, sample_weight])` with each example's weight multiplied by its class's.

    `y` holds class indices, or one-hot rows (the class is the argmax), as in Keras' `fit`.
    """

    def weighted(x, y, sample_weight=None):
        labels = y if y.shape.rank == 1 or y.shape[-1] == 1 else tf.argmax(y, axis=-1)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        per_example = tf.gather(weights, labels)
        if sample_weight is not None:
            per_example = per_example * tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
        return x, y, per_example

    return batches.map(weighted)


def batch_size_of(x: Any) -> int:
    """The leading dimension of a batch `x` (the first tensor if `x` is a nest); no host sync."""
    first = tf.nest.flatten(x)[0]
    size = first.shape[0]
    return int(size) if size is not None else int(tf.shape(first)[0])


def _is_batch(leaf: Any) -> bool:
    """Whether `leaf` is a numeric (or bool) tensor or array with at least one axis."""
    try:
        dtype = tf.as_dtype(leaf.dtype)
    except (AttributeError, TypeError):
        return False
    numeric = dtype.is_floating or dtype.is_integer or dtype.is_bool or dtype.is_complex
    return numeric and len(getattr(leaf, "shape", ())) >= 1


def check_batch(x: Any, y: Any, sample_weight: Any = None) -> None:
    """Validates a batch given to `train_step` before it is traced: numeric tensors or arrays (or
    nests of them) with a leading batch axis, as many examples in each, and at least one."""
    rows = {}
    given = (("x", x), ("y", y)) + ((("sample_weight", sample_weight),) if sample_weight is not None else ())
    for name, value in given:
        leaves = tf.nest.flatten(value)
        if not leaves or not all(_is_batch(leaf) for leaf in leaves):
            raise TypeError(
                f"`{name}` must be a batch: a numeric tensor or NumPy array with a leading batch axis, or a "
                f"list, tuple or dict of them. Received: {name}={value!r}"
            )
        rows[name] = sorted({leaf.shape[0] for leaf in leaves if leaf.shape[0] is not None})
    if len(set(sum(rows.values(), []))) > 1:
        shown = ", ".join(f"{name} with {'/'.join(map(str, counts))} rows" for name, counts in rows.items())
        raise ValueError(f"`x`, `y` (and `sample_weight`) must hold the same number of examples (their first axis). Received: {shown}")
    if rows["x"] == [0]:
        raise ValueError("`x` must hold at least one example. Received: x and y with 0 rows")
