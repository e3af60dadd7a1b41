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

__all__ = ["as_tf_variables", "broadcast_from_root", "compression_for", "allreduce_gradients"]

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


def allreduce_gradients(
    grads: Sequence,
    *,
    compression=hvd.Compression.none,
    sparse_as_dense: bool = False,
    name: str = "hvdclip_grads",
) -> list:
    """Averages a gradient list over ranks; `None` stays `None`.

    The same reduction as `hvd.DistributedGradientTape`: one grouped (fused) allreduce with
    `op=Average` for dense gradients, and an allgather of rows (values divided by the world size)
    for `tf.IndexedSlices` unless `sparse_as_dense`. The difference is naming. Horovod matches
    collectives across ranks *by name*, and in a compiled step its default names come from the
    gradient tensors' names, which carry Keras layer names. Keras numbers auto-named layers per
    process (`dense_9` on one rank, `dense_10` on a rank that built one more layer elsewhere),
    so default names can differ between ranks, and each rank then waits forever for a tensor the
    other never sends. Here every collective is named by the gradient's position in the list,
    which the start-up structure check guarantees is the same everywhere.
    """
    out = list(grads)
    world = hvd.size()
    if world == 1:
        return out
    dense_positions, dense = [], []
    for position, grad in enumerate(grads):
        if grad is None:
            continue
        if isinstance(grad, tf.IndexedSlices) and not sparse_as_dense:
            values = hvd.allgather(grad.values, name=f"{name}_{position}_values", ignore_name_scope=True)
            indices = hvd.allgather(grad.indices, name=f"{name}_{position}_indices", ignore_name_scope=True)
            out[position] = tf.IndexedSlices(values / tf.cast(world, values.dtype), indices, grad.dense_shape)
        else:
            dense_positions.append(position)
            dense.append(tf.convert_to_tensor(grad))
    if dense:
        reduced = hvd.grouped_allreduce(
            dense, op=hvd.Average, compression=compression, name=f"{name}_dense", ignore_name_scope=True
        )
        for position, value in zip(dense_positions, reduced):
            out[position] = value
    return out
