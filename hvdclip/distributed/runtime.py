"""Horovod start-up for hvdclip: `init()` and the checks that it happened.

Importing hvdclip initialises nothing; `init()` does, once per process.
"""

from __future__ import annotations

import os

import horovod.tensorflow as hvd
import tensorflow as tf

from hvdclip.errors import NotInitializedError

__all__ = ["init", "is_initialized", "launched_elastically", "require_initialized", "rank", "size", "local_rank"]

_LAUNCH_HINT = (
    "launch with `hvdclip-run -np 2 -- python train.py` (or `horovodrun -np 2 python train.py`) "
    "and call `hvdclip.init()` before building the trainer"
)


def init() -> None:
    """Initialises Horovod and, on GPU hosts, pins one GPU per local rank.

    Idempotent: a second call does nothing. Call it before creating models, so that TensorFlow
    sees only this rank's GPU (with memory growth on) when it first touches the device.

    Example:
        >>> import hvdclip
        >>> hvdclip.init()
        >>> hvdclip.rank(), hvdclip.size()
        (0, 1)
    """
    if hvd.is_initialized():
        return
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # Untested here: the build machine has no GPU.
        gpu = gpus[hvd.local_rank() % len(gpus)]
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")


def launched_elastically() -> bool:
    """Whether this process is a worker of an elastic job (`hvdclip-run --elastic`, horovodrun's elastic mode)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def is_initialized() -> bool:
    return bool(hvd.is_initialized())


def require_initialized(what: str) -> None:
    """Raises `NotInitializedError` naming `what` when Horovod is not initialised."""
    if not hvd.is_initialized():
        raise NotInitializedError(f"Horovod is not initialised, so {what} cannot run: {_LAUNCH_HINT}.")


def rank() -> int:
    require_initialized("hvdclip.rank()")
    return hvd.rank()


def size() -> int:
    require_initialized("hvdclip.size()")
    return hvd.size()


def local_rank() -> int:
    require_initialized("hvdclip.local_rank()")
    return hvd.local_rank()
