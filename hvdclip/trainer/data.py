"""Input pipelines for `fit` and `evaluate`: each rank's part of a `tf.data.Dataset`.

The order is shard -> shuffle -> batch. Sharding first means the shards are disjoint whatever the
shuffle seeds are, as long as every rank builds the *same* dataset in the same order (a fixed
file list, or a `shuffle` with a fixed seed); `fit` compares a fingerprint of the first elements
over ranks and warns when they differ.

How to shard (`shard=`):

* `"files"`: each rank reads every `size`-th file (tf.data's FILE auto-shard rewrite, which puts
  the shard right after the file list). Each rank reads and parses only its own files.
* `"elements"` (or `True`, its old spelling): each rank keeps every `size`-th element. Every rank
  still reads and parses the whole dataset, `size` times the I/O in all.
* `"auto"` (the default): `"files"` when the dataset reads files and has at least as many as
  ranks; otherwise `"elements"`, with a warning if the dataset reads files (too few to split).
* `False`: no sharding; each rank already reads its own part. Shuffling after sharding reorders each rank's own
part every epoch, with a seed drawn from the trainer's checkpointed RNG. (`tf.data` combines that
seed with TensorFlow's global seed, so a resumed job must set the global seed as the original did,
which running the same script does.)
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import tensorflow as tf

from hvdclip import foreign
from hvdclip.distributed.collectives import agree_any, allgather_int64
from hvdclip.validation import check_int, check_number

__all__ = ["InputPlan", "SHARD_MODES", "check_shard", "batch_size_of", "check_batch", "check_class_weight"]

SHARD_MODES = ("auto", "files", "elements", False)
# How many leading elements `fit` fingerprints to see whether every rank built the same dataset.
_FINGERPRINT_ELEMENTS = 8


def check_shard(shard: Any) -> str | bool:
    """Validates `shard`; `True` (the old default) means `"elements"`."""
    if shard is True:
        return "elements"
    if not any(shard is mode or (isinstance(shard, str) and shard == mode) for mode in SHARD_MODES):
        error = ValueError if isinstance(shard, str) else TypeError
        raise error(f"`shard` must be 'auto', 'files', 'elements' or False (True means 'elements'). Received: shard={shard!r}")
    return shard


def _can_shard_by_file(dataset: tf.data.Dataset, size: int, rank: int) -> bool:
    """Whether tf.data can give this rank its own files: the dataset reads files, at least `size` of them.

    Reads at most one element (the rewrite is checked when the first element is fetched). A dataset
    with no file reader is answered from its graph, without the rewrite (whose failure TensorFlow
    logs as an error on every rank).
    """
    if not _reads_files(dataset):
        return False
    try:
        for _ in foreign.auto_shard_by_file(dataset, size, rank).take(1):
            pass
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError):
        return False
    return True


def _reads_files(dataset: tf.data.Dataset) -> bool:
    """Whether the dataset's graph has a file reader (TFRecord, text lines, fixed-length records)."""
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(foreign.serialized_dataset_graph(dataset))
    ops = {node.op for node in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    return any(op.startswith(("TFRecordDataset", "TextLineDataset", "FixedLengthRecordDataset")) for op in ops)


def _fingerprint(dataset: tf.data.Dataset) -> int:
    """A 63-bit hash of the bytes of the dataset's first few elements."""
    digest = hashlib.sha256()
    for element in dataset.take(_FINGERPRINT_ELEMENTS):
        for leaf in tf.nest.flatten(element):
            digest.update(np.ascontiguousarray(leaf.numpy()).tobytes())
    return int(np.frombuffer(digest.digest()[:8], dtype=np.int64)[0] & 0x7FFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class InputPlan:
    """How to turn the dataset given to `fit`/`evaluate` into this rank's batches.

    Attributes:
        dataset: what the user passed: `(x, y)` batches, or single examples when `batch_size` is set.
        rank, size: this rank and the number of ranks.
        shard: `"files"` (each rank reads every `size`-th file), `"elements"` (each rank keeps every
            `size`-th element), `"auto"` (decided by `resolved`) or False (each rank already reads
            its own part).
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
    shard: str | bool = "auto"
    batch_size: int | None = None
    drop_remainder: bool = True
    shuffle_buffer: int | None = None

    @classmethod
    def checked(cls, argument: str, dataset: Any, *, rank: int, size: int, shard: Any = "auto",
                batch_size: Any = None, drop_remainder: bool = True, shuffle_buffer: Any = None) -> InputPlan:
        """Validates the user's arguments (`argument` is the dataset's parameter name)."""
        what = "(x, y) or (x, y, sample_weight) " + ("examples" if batch_size is not None else "batches")
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(f"`{argument}` must be a tf.data.Dataset of {what}. Received: {argument}={dataset!r}")
        if not isinstance(dataset.element_spec, (tuple, list)) or len(dataset.element_spec) not in (2, 3):
            raise ValueError(f"`{argument}` must be a tf.data.Dataset of {what}. Received: {argument}={dataset!r}")
        if int(dataset.cardinality()) == 0:
            raise ValueError(f"`{argument}` must not be empty. Received: {argument}={dataset!r}")
        shard = check_shard(shard)
        if batch_size is not None:
            check_int("batch_size", batch_size, ge=1)
        if shuffle_buffer is not None:
            check_int("shuffle_buffer", shuffle_buffer, ge=1)
        return cls(dataset, rank, size, shard, batch_size, drop_remainder, shuffle_buffer)

    def for_epoch(self, seed: int = 0) -> tf.data.Dataset:
        """This rank's batches for one epoch; `seed` reseeds the shuffle (same seed, same order)."""
        dataset = self.dataset
        if self.size > 1 and self.shard == "files":
            dataset = foreign.auto_shard_by_file(dataset, self.size, self.rank)
        elif self.size > 1 and self.shard:  # "elements" ("auto" before `resolved` counts as elements).
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

    def resolved(self, argument: str = "dataset") -> InputPlan:
        """This plan with `"auto"` decided as `"files"` or `"elements"`, the same on every rank.

        A collective (call it on every rank): ranks agree whether each can take its own files.

        Raises:
            ValueError: on every rank, for `shard="files"` when the dataset does not read files
                or has fewer files than ranks.
        """
        if self.size == 1 or self.shard in (False, "elements"):
            return self
        by_file = not agree_any(not _can_shard_by_file(self.dataset, self.size, self.rank), f"shard_{argument}")
        if by_file:
            return replace(self, shard="files")
        if self.shard == "files":
            raise ValueError(
                f"`shard='files'` needs `{argument}` to read files (TFRecordDataset, TextLineDataset, ...), at "
                f"least one per rank ({self.size}); it does not, or has fewer files. Use shard='elements', or write "
                f"the data into at least {self.size} files. Received: shard='files'"
            )
        if self.rank == 0 and _reads_files(self.dataset):
            warnings.warn(
                f"`{argument}` reads fewer files than there are ranks ({self.size}), so it is sharded by element: "
                f"every rank reads and parses every file ({self.size}x the I/O). Write the data into at least "
                f"{self.size} files (a multiple of {self.size} balances them) to shard by file.",
                stacklevel=4,
            )
        return replace(self, shard="elements")

    def warn_if_orders_differ(self) -> None:
        """Warns on rank 0 when the ranks' datasets start with different elements (one allgather).

        Sharding assumes every rank builds the same dataset in the same order; an unseeded
        `shuffle` (or `list_files` with its default shuffle) before `fit` breaks that, and the
        ranks' shards then overlap while some elements are never used.
        """
        if self.size == 1 or not self.shard:
            return
        prints = allgather_int64([_fingerprint(self.dataset)], "dataset_fingerprint")
        if self.rank == 0 and len(set(prints.tolist())) > 1:
            different = [rank for rank, value in enumerate(prints) if value != prints[0]]
            warnings.warn(
                f"The ranks' `dataset`s start with different elements (rank(s) {different} differ from rank 0), so "
                "their shards overlap and some elements are never used. Is there an unseeded `shuffle` (or "
                "`list_files`, which shuffles by default) before `fit`? Give it a seed, e.g. "
                "dataset.shuffle(n, seed=42), or let `fit` shuffle (`shuffle_buffer=`), which shuffles after sharding.",
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
