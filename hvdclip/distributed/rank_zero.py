"""Work that only rank 0 does (writing files, reading a checkpoint), with its outcome agreed everywhere.

If rank 0 raised on its own, the other ranks would wait forever in the next collective. So rank 0
runs the work, then broadcasts either its result or its exception, and every rank returns the same
result or raises the same error.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import horovod.tensorflow as hvd
import tensorflow as tf

from hvdclip.errors import HvdClipError, OutputDirectoryError

__all__ = ["is_rank_zero", "on_rank_zero", "writable_directory"]

T = TypeVar("T")


def is_rank_zero() -> bool:
    return hvd.rank() == 0


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (to cross to the other ranks), else an `HvdClipError` saying the same."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure means "send the message instead"
        return HvdClipError(f"{type(error).__name__} on rank 0: {error}")


def on_rank_zero(work: Callable[[], T], name: str) -> T:
    """Runs `work()` on rank 0 only; every rank returns its result or raises its exception.

    `name` labels the broadcast; every rank must pass the same one. The result must be picklable.
    """
    outcome: tuple[bool, Any] = (True, None)
    if is_rank_zero():
        try:
            outcome = (True, work())
        except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
            outcome = (False, _portable(error))
    if hvd.size() > 1:
        outcome = hvd.broadcast_object(outcome, root_rank=0, name=f"hvdclip_{name}")
    ok, value = outcome
    if not ok:
        raise value
    return value


def writable_directory(directory: str | os.PathLike, argument: str) -> str:
    """Creates `directory` if needed and checks that a file can be written in it (call on rank 0).

    Returns the directory as a string; raises `OutputDirectoryError` naming `argument` otherwise.
    Uses `tf.io.gfile`, so `gs://`-style paths work where TensorFlow supports them.
    """
    path = os.fspath(directory)
    probe = os.path.join(path, f".hvdclip-write-test-{uuid.uuid4().hex}")
    try:
        tf.io.gfile.makedirs(path)
        with tf.io.gfile.GFile(probe, "w") as handle:
            handle.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as error:
        reason = getattr(error, "message", None) or str(error)
        raise OutputDirectoryError(
            f"`{argument}` is not a writable directory: {path!r} ({reason}). Pass a directory that rank 0 "
            "can create and write to."
        ) from None
    return path
