"""The one place where hvdclip hands Keras 3 state to Horovod.

Horovod 0.28.1's TensorFlow API predates Keras 3 and rejects `keras.Variable` (upstream
horovod#4290: its broadcast calls `assign` on an object it expects to be a `tf.Variable`). Each
Keras 3 variable on the TensorFlow backend wraps a `tf.Variable`, reachable as `.value`; Horovod
gets that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import horovod.tensorflow as hvd
import tensorflow as tf

__all__ = ["as_tf_variables", "broadcast_from_root", "compression_for", "allreduce_dense"]

_COMPRESSIONS = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}


def as_tf_variables(variables: Iterable) -> list[tf.Variable]:
    """The `tf.Variable` behind each Keras 3 variable (plain `tf.Variable`s pass through)."""
    out = []
    for variable in variables:
        if isinstance(variable, tf.Variable):
            out.append(variable)
        else:
            inner = getattr(variable, "value", None)
            if not isinstance(inner, tf.Variable):
                raise TypeError(
                    "hvdclip needs Keras 3 on the TensorFlow backend (KERAS_BACKEND=tensorflow): "
                    f"variable {getattr(variable, 'path', variable)!r} is not backed by a tf.Variable."
                )
            out.append(inner)
    return out


def broadcast_from_root(variables: Sequence[tf.Variable], root_rank: int = 0) -> None:
    """Overwrites `variables` on every rank with rank `root_rank`'s values (one grouped call)."""
    if variables:
        hvd.broadcast_variables(list(variables), root_rank=root_rank)


def compression_for(name: str | None):
    """Horovod's compression object for `compression=` ("none" or "fp16"); None means "none"."""
    key = "none" if name is None else name
    if not isinstance(key, str) or key not in _COMPRESSIONS:
        raise ValueError(f"`compression` must be one of {sorted(_COMPRESSIONS)} or None. Received: compression={name!r}")
    return _COMPRESSIONS[key]


def allreduce_dense(grads: Sequence, compression=hvd.Compression.none) -> list:
    """Averages dense gradients over ranks in one grouped (fused) allreduce; `None` stays `None`.

    For gradients that were not produced by `hvd.DistributedGradientTape` (accumulated sums).
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return list(grads)
    reduced = hvd.grouped_allreduce([grads[i] for i in present], op=hvd.Average, compression=compression)
    out = list(grads)
    for i, value in zip(present, reduced):
        out[i] = value
    return out
