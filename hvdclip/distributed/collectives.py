"""The small collectives hvdclip runs outside the gradient reduction: the start-up broadcast and
the agreements that keep every rank's loop in lock-step.

Each is called by every rank at the same point, with a fixed name, so ranks match them whatever
their graphs are called.
"""

from __future__ import annotations

from collections.abc import Sequence

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from hvdclip.distributed.bridge import as_tf_variables

__all__ = [
    "broadcast_from_root",
    "agree_any",
    "agree_min",
    "sum_over_ranks",
    "sum_variables_over_ranks",
    "average_variables_over_ranks",
    "allgather_int64",
    "gather_variables",
    "scatter_from_root",
]


def broadcast_from_root(variables: Sequence, root_rank: int = 0) -> None:
    """Overwrites `variables` (Keras 3 or `tf.Variable`s) on every rank with rank `root_rank`'s values.

    One compiled group of broadcasts named by position. `hvd.broadcast_variables` names each
    broadcast after its variable, and Keras numbers auto-named layers per process (`dense_9` on
    one rank, `dense_10` on a rank that built one more layer elsewhere), so with Horovod's names
    ranks would wait forever for each other; the structure check before the broadcast makes
    positions agree.
    """
    variables = as_tf_variables(variables)
    if variables and hvd.size() > 1:
        _broadcast_group(variables, root_rank)


@tf.function(autograph=False)
def _broadcast_group(variables: list, root_rank: int) -> None:
    for position, variable in enumerate(variables):
        variable.assign(hvd.broadcast(variable, root_rank, name=f"hvdclip_broadcast_{position}", ignore_name_scope=True))


def agree_any(flag: bool, name: str) -> bool:
    """True on every rank if `flag` is True on any rank."""
    vote = hvd.allreduce(tf.constant(int(bool(flag)), tf.int32), op=hvd.Max, name=f"hvdclip_any_{name}")
    return bool(int(vote) > 0)


def agree_min(value: int, name: str) -> int:
    """The smallest `value` over ranks, on every rank."""
    return int(hvd.allreduce(tf.constant(int(value), tf.int64), op=hvd.Min, name=f"hvdclip_min_{name}"))


def sum_over_ranks(values, name: str) -> np.ndarray:
    """The element-wise sum of a float64 or int64 vector over ranks (one allreduce)."""
    return hvd.allreduce(tf.convert_to_tensor(values), op=hvd.Sum, name=f"hvdclip_sum_{name}").numpy()


def sum_variables_over_ranks(variables: Sequence, name: str) -> None:
    """Replaces each variable (e.g. a Keras metric's state) by its sum over ranks, in place."""
    for index, variable in enumerate(as_tf_variables(variables)):
        variable.assign(sum_over_ranks(variable.value(), f"{name}_{index}"))


def average_variables_over_ranks(variables: Sequence, name: str) -> None:
    """Replaces each variable (e.g. BatchNorm moving statistics) by its mean over ranks, in place (one grouped allreduce)."""
    variables = as_tf_variables(variables)
    if not variables:
        return
    means = hvd.grouped_allreduce([v.value() for v in variables], op=hvd.Average, name=f"hvdclip_mean_{name}")
    for variable, mean in zip(variables, means):
        variable.assign(mean)


def allgather_int64(values, name: str) -> np.ndarray:
    """Every rank's int64 vector `values`, concatenated in rank order."""
    return hvd.allgather(tf.reshape(tf.cast(values, tf.int64), [-1]), name=f"hvdclip_gather_{name}").numpy()


def gather_variables(variables: Sequence, name: str) -> list[np.ndarray]:
    """Every rank's value of each variable, stacked in rank order: one `[size, *shape]` array per variable."""
    return [
        hvd.allgather(tf.expand_dims(variable.value(), 0), name=f"hvdclip_gather_{name}_{index}").numpy()
        for index, variable in enumerate(as_tf_variables(variables))
    ]


def scatter_from_root(stacked: Sequence[np.ndarray] | None, variables: Sequence, root_rank: int = 0) -> None:
    """Gives each rank its own row of rank `root_rank`'s `[size, *shape]` arrays (None on the other ranks).

    Row r of `stacked[i]` goes into `variables[i]` on rank r: a broadcast of each stacked array,
    named by position. For state that is each rank's own (gradient-accumulation sums) read from a
    checkpoint by one rank.
    """
    size, rank = hvd.size(), hvd.rank()
    for index, variable in enumerate(as_tf_variables(variables)):
        if rank == root_rank:
            value = tf.constant(stacked[index], dtype=variable.dtype)
        else:
            value = tf.zeros([size, *variable.shape], variable.dtype)
        if size > 1:
            value = hvd.broadcast(value, root_rank, name=f"hvdclip_scatter_{index}", ignore_name_scope=True)
        variable.assign(value[rank])

