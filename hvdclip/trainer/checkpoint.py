"""Checkpoints of a trainer's whole state, written by rank 0 with `tf.train.CheckpointManager`.

A checkpoint holds exactly what the start-up broadcast sends, in the same order: the model's
variables (weights, plain BatchNormalization's moving statistics averaged over ranks just before
the save, and rank 0's seed state of layers such as `Dropout`, from which the start-up broadcast
derives every rank's), the optimizer's (iteration
count, learning rate, slots), the clip transform's state, and the counters (skipped steps, `fit`'s
step and epoch counters and its shuffle RNG). Variables are stored by position, not by Keras'
auto-generated names ("dense_3"), so a checkpoint restores into a freshly built copy of the model
in another process; a structural difference is reported by the first variable that differs.

With gradient accumulation, a checkpoint taken inside a window also needs each rank's partial sums
(rank-local state: `hvdclip.core.accumulation`). Every rank's are gathered to rank 0 and written
beside the checkpoint, in `<prefix>-window.*`, with the number of ranks; `restore` reads them and
the start-up hands each rank its own, so the resumed window gives the uninterrupted run's update.
A checkpoint at a window's end has no such file.

Writes are atomic at the level that matters: TensorFlow writes a checkpoint's files under a
temporary name and renames them, and the manager then updates the `checkpoint` index file
(itself written to a temporary file and renamed). `latest` reads that index, so a crash during a
save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

import tensorflow as tf

from hvdclip.distributed.collectives import gather_variables
from hvdclip.distributed.rank_zero import is_rank_zero, on_rank_zero, writable_directory
from hvdclip.errors import CheckpointError
from hvdclip.trainer.callbacks import Callback
from hvdclip.validation import check_int, check_path

__all__ = ["CheckpointSaver", "Named", "Restored", "latest", "read"]

# [(label shown in errors, variable)], in the order of the trainer's start-up broadcast.
Named = Sequence[tuple[str, tf.Variable]]


def _checkpoint(named: Named) -> tf.train.Checkpoint:
    # The labels are saved too, only to name the checkpoint's side of a mismatch.
    labels = tf.Variable([label for label, _ in named], dtype=tf.string, trainable=False)
    return tf.train.Checkpoint(state=[variable for _, variable in named], labels=labels)


def _key(index: int) -> str:
    return f"state/{index}/.ATTRIBUTES/VARIABLE_VALUE"


_LABELS_KEY = "labels/.ATTRIBUTES/VARIABLE_VALUE"
_WINDOW = "-window"  # Suffix of the file with every rank's accumulation sums, beside its checkpoint.


def _window_key(index: int) -> str:
    return f"sums/{index}/.ATTRIBUTES/VARIABLE_VALUE"


class Restored(NamedTuple):
    """What `read` found: the checkpoint's prefix and, if taken inside an accumulation window, every
    rank's sums (`window_sums[i]` is `[window_ranks, *shape]` for local variable i)."""

    prefix: str
    window_ranks: int = 0
    window_sums: list[np.ndarray] | None = None


def latest(path: str | os.PathLike) -> str | None:
    """The checkpoint `path` names: the latest in a directory, or `path` itself if it is a prefix."""
    path = os.fspath(path)
    if tf.io.gfile.isdir(path):
        return tf.train.latest_checkpoint(path)
    return path if tf.io.gfile.exists(path + ".index") else None


def _check_fits(named: Named, prefix: str) -> None:
    """Raises `CheckpointError` naming the first variable whose presence, shape or dtype differs."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    labels = [label.decode() for label in reader.get_tensor(_LABELS_KEY)] if _LABELS_KEY in shapes else []
    ours = [(label, tuple(variable.shape), variable.dtype) for label, variable in named]
    theirs = []
    while _key(len(theirs)) in shapes:
        index = len(theirs)
        label = labels[index] if index < len(labels) else "?"
        theirs.append((label, tuple(shapes[_key(index)]), dtypes[_key(index)]))
    if [entry[1:] for entry in ours] == [entry[1:] for entry in theirs]:
        return

    first = next(
        i for i in range(max(len(ours), len(theirs))) if i >= min(len(ours), len(theirs)) or ours[i][1:] != theirs[i][1:]
    )

    def side(entries: list) -> str:
        if first >= len(entries):
            return "nothing"
        label, shape, dtype = entries[first]
        return f"{label!r} {shape} {dtype.name}"

    count = f"it has {len(theirs)} variables and this trainer {len(ours)}; " if len(ours) != len(theirs) else ""
    raise CheckpointError(
        f"Checkpoint {prefix!r} does not fit this trainer: {count}variable #{first} is {side(ours)} here but "
        f"{side(theirs)} in the checkpoint. Was it saved from a different model, optimizer or clip transform? "
        "Build the same ones to restore it."
    )


def read(named: Named, path: str | os.PathLike, *, missing_ok: bool = False, local: Named = ()) -> Restored | None:
    """Loads the checkpoint at `path` into the `named` variables (call on rank 0).

    `local` are the rank-local variables (accumulation sums) whose every-rank values a checkpoint
    taken inside a window holds; they are returned, not loaded: each belongs to another rank.

    Returns None if there is no checkpoint and `missing_ok`; raises `CheckpointError` if there is
    none otherwise, or if it does not fit (naming the mismatched variable), or cannot be read.
    """
    prefix = latest(path)
    if prefix is None:
        if missing_ok:
            return None
        raise CheckpointError(
            f"No checkpoint at {os.fspath(path)!r}: expected a directory written by hvdclip.CheckpointSaver "
            "or a checkpoint prefix such as 'ckpts/ckpt-100'. Pass missing_ok=True to start fresh instead."
        )
    try:
        _check_fits(named, prefix)
        status = _checkpoint(named).read(prefix)
        status.assert_existing_objects_matched().expect_partial()
        if not tf.io.gfile.exists(prefix + _WINDOW + ".index"):
            return Restored(prefix)
        reader = tf.train.load_checkpoint(prefix + _WINDOW)
        sums = [reader.get_tensor(_window_key(i)) for i in range(len(local))]
    except tf.errors.OpError as error:
        raise CheckpointError(f"Checkpoint {prefix!r} cannot be read: {error.message}") from None
    if any(tuple(value.shape[1:]) != tuple(variable.shape) for value, (_, variable) in zip(sums, local)):
        raise CheckpointError(f"Checkpoint {prefix!r}'s accumulation sums do not fit this trainer's variables.")
    return Restored(prefix, int(sums[0].shape[0]) if sums else 0, sums)


class CheckpointSaver(Callback):
    """Saves the trainer's whole state at the end of every epoch, and every n steps if asked.

    Rank 0 writes, with `tf.train.CheckpointManager` (files `ckpt-<global step>.*`, keeping the
    newest `max_to_keep`); other ranks write nothing. `trainer.restore(directory)` resumes from
    the latest one. If rank 0 cannot create or write `directory`, every rank raises
    `OutputDirectoryError` before the first step.

    Args:
        directory: where checkpoints go.
        every_n_steps: also save after every this many global steps; None saves at epoch ends only.
        max_to_keep: the newest checkpoints to keep; older ones are deleted.

    Example:
        >>> trainer.restore("ckpts", missing_ok=True)      # resume if a checkpoint exists
        >>> trainer.fit(dataset, epochs=10, callbacks=[hvdclip.CheckpointSaver("ckpts")])
    """

    def __init__(self, directory: str | os.PathLike, every_n_steps: int | None = None, max_to_keep: int = 3) -> None:
        self.directory = check_path("directory", directory)
        self.every_n_steps = None if every_n_steps is None else check_int("every_n_steps", every_n_steps, ge=1)
        self.max_to_keep = check_int("max_to_keep", max_to_keep, ge=1)
        self._manager: tf.train.CheckpointManager | None = None
        self.saved: list[str] = []

    def on_train_begin(self, logs=None):
        on_rank_zero(lambda: writable_directory(self.directory, "directory"), name="checkpoint_directory")
        if is_rank_zero():
            checkpoint = _checkpoint(self.trainer.engine.named_state_variables())
            self._manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=self.max_to_keep)

    def on_step_end(self, step, logs):
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            self._save(step)

    def on_epoch_end(self, epoch, logs):
        self._save(int(self.trainer.engine.fit_state.global_step.numpy()))

    def _save(self, step: int) -> None:
        # Plain BatchNormalization's rank-local moving statistics: save their mean over ranks (on
        # every rank, so a resumed run continues from exactly the state the others continue from).
        self.trainer.engine.average_local_statistics()
        # Inside an accumulation window (the counter is the same on every rank: all gather or none).
        local = [] if self.trainer.engine.between_windows() else [v for _, v in self.trainer.engine.local_state_variables()]
        sums = gather_variables(local, "window_sums") if local else None
        # Every rank waits for rank 0's write, so a failed write raises everywhere instead of hanging.
        saved = on_rank_zero(lambda: self._write(step, sums), name="checkpoint_save")
        self.saved.append(saved)

    def _write(self, step: int, sums: list[np.ndarray] | None) -> str:
        prefix = self._manager.save(checkpoint_number=step)
        for stale in tf.io.gfile.glob(prefix + _WINDOW + ".*"):  # From an earlier run that saved this step.
            tf.io.gfile.remove(stale)
        if sums is not None:
            window = tf.train.Checkpoint(sums=[tf.Variable(value, trainable=False) for value in sums])
            window.write(prefix + _WINDOW)
        kept = set(self._manager.checkpoints)
        for index in tf.io.gfile.glob(os.path.join(self.directory, f"*{_WINDOW}.index")):
            if index[: -len(_WINDOW + ".index")] not in kept:  # Its checkpoint was rotated out.
                for name in tf.io.gfile.glob(index[: -len(".index")] + ".*"):
                    tf.io.gfile.remove(name)
        return prefix
