"""`horovod.tensorflow`'s collectives on Keras 3: Horovod's own where they work, and the variable broadcasts fixed.

Horovod's tensor collectives (`allreduce`, `allgather`, `broadcast`, ...) take tensors, and a
Keras 3 variable converts to one, so they work unchanged and are re-exported. An unnamed
collective inside a `tf.function` is named after its input tensor, as in Horovod: pass `name=`
when that tensor comes out of a layer, whose auto-numbered name can differ between ranks.

Horovod's variable broadcasts break on Keras 3: `broadcast_variables` calls `assign` on the
tensor a `tf.function` argument becomes, and `broadcast_` reads `.device` and `.name` of a
`tf.Variable`. Their replacements hand Horovod the `tf.Variable` behind each Keras variable (the
bridge, `hvdclip.distributed.bridge`) and name every broadcast by its position in the list, never
by the variable's name: the `tf.Variable` behind a Keras 3 variable is named after its layer path
(`sequential_3/dense_7/kernel`), and Keras numbers auto-named layers per process, so names can
differ between ranks, which then wait forever for each other. Positions agree when the lists have
the same structure, so the group first compares a digest of the count, shapes and dtypes over
ranks, and every rank raises on a mismatch instead of hanging.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf
from horovod.tensorflow.compression import Compression
from horovod.tensorflow.functions import allgather_object, broadcast_object
from horovod.tensorflow.mpi_ops import Adasum, Average, Max, Min, ProcessSet, Product, Sum, global_process_set, join

from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.errors import HvdClipError, RankMismatchError
from hvdclip.validation import check_bool, check_int

__all__ = [
    "Adasum",
    "Average",
    "Compression",
    "Max",
    "Min",
    "Product",
    "Sum",
    "allgather",
    "allgather_object",
    "allreduce",
    "alltoall",
    "broadcast",
    "broadcast_",
    "broadcast_global_variables",
    "broadcast_object",
    "broadcast_variables",
    "grouped_allgather",
    "grouped_allreduce",
    "grouped_reducescatter",
    "join",
    "reducescatter",
]

allreduce = hvd.allreduce
grouped_allreduce = hvd.grouped_allreduce
allgather = hvd.allgather
grouped_allgather = hvd.grouped_allgather
broadcast = hvd.broadcast
alltoall = hvd.alltoall
reducescatter = hvd.reducescatter
grouped_reducescatter = hvd.grouped_reducescatter

# The absolute name scope of every broadcast group: its collectives are `<scope>/structure` and
# `<scope>/variable_<i>`, and a second group in the same graph gets TensorFlow's `_1` suffixes,
# in the order the groups were built, which is the same on every rank.
_SCOPE = "hvdclip_broadcast_variables"
_MISMATCH = "hvdclip: ranks passed variable lists of different structure to broadcast_variables"


def broadcast_variables(variables: Iterable, root_rank: int, process_set=global_process_set, inplace: bool = False):
    """Overwrites `variables` on every rank of `process_set` with rank `root_rank`'s values.

    Horovod's signature and defaults. Works on Keras 3 variables (and `tf.Variable`s), eagerly
    and inside a `tf.function`, e.g. Horovod's first-batch broadcast in a compiled step:

        if first_batch:
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(optimizer.variables, root_rank=0)

    The broadcasts are named by position (see the module docstring). `inplace=True` is accepted
    and broadcasts the same way: Horovod's in-place op keys its broadcasts by variable names.

    Returns:
        None when run eagerly; inside a `tf.function`, the op that runs the group (as Horovod).

    Raises:
        RankMismatchError: eagerly, on every rank, if ranks passed lists that differ in count,
            shape or dtype (inside a `tf.function`: `tf.errors.InvalidArgumentError` saying so).
    """
    variables = _checked_variables(variables)
    root_rank = check_int("root_rank", root_rank, ge=0)
    _check_process_set(process_set)
    check_bool("inplace", inplace)
    if tf.executing_eagerly():
        if process_set.size() == 1:
            # Nothing to send. Also, a compiled group first run in a world of one rank, when run
            # again after an elastic job grew, never enqueued its structure allgather (Horovod
            # 0.28.1, TensorFlow 2.21, Horovod's trace log), and the new rank waited for it forever.
            return None
        try:
            _broadcast_group_compiled(variables, root_rank, process_set)
        except tf.errors.InvalidArgumentError as error:
            if _MISMATCH not in str(error.message):
                raise
            raise RankMismatchError(
                f"{_MISMATCH}: this rank passed {len(variables)} variable(s); build the model and optimizer the same "
                "way on every rank, and broadcast after the optimizer is built on every rank (Keras 3 creates an "
                "optimizer's variables when it is built, at its first apply_gradients or optimizer.build(...))."
            ) from None
        return None
    return _broadcast_group(variables, root_rank, process_set)


def broadcast_(variables: Iterable, root_rank: int, name: str | None = None, process_set=global_process_set) -> list:
    """Horovod's in-place broadcast, on Keras 3 variables: rank `root_rank`'s values, named by position.

    Returns the variables' values after the broadcast, as Horovod's does. `name` names the group's
    scope (default: that of `broadcast_variables`).
    """
    variables = _checked_variables(variables)
    root_rank = check_int("root_rank", root_rank, ge=0)
    _check_process_set(process_set)
    if name is not None and (not isinstance(name, str) or not name):
        raise (TypeError if not isinstance(name, str) else ValueError)(
            f"`name` must be a non-empty str or None. Received: name={name!r}"
        )
    if tf.executing_eagerly():
        broadcast_variables(variables, root_rank, process_set)
        return [variable.read_value() for variable in variables]
    with tf.control_dependencies([_broadcast_group(variables, root_rank, process_set, scope=name or _SCOPE)]):
        return [variable.read_value() for variable in variables]


def broadcast_global_variables(root_rank: int):
    """Refuses, as Horovod's does under TensorFlow 2 eager: Keras 3 keeps no global variables.

    Horovod's broadcasts TensorFlow 1's global-variable collection, which Keras 3 never fills; inside
    a `tf.function` it would broadcast nothing, silently. Raises `HvdClipError` (a RuntimeError,
    like Horovod's) saying what to call instead.
    """
    check_int("root_rank", root_rank, ge=0)
    raise HvdClipError(
        "broadcast_global_variables broadcasts TensorFlow 1's global-variable collection, which Keras 3 never fills "
        "(so it would broadcast nothing): call hvd.broadcast_variables(model.variables, root_rank) and "
        "hvd.broadcast_variables(optimizer.variables, root_rank), or pass "
        "hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank) to model.fit."
    )


def _checked_variables(variables) -> list[tf.Variable]:
    if isinstance(variables, (tf.Variable, keras.Variable)) or not isinstance(variables, Iterable):
        raise TypeError(f"`variables` must be a list of variables. Received: variables={variables!r}")
    variables = list(variables)
    for variable in variables:
        if not isinstance(variable, (tf.Variable, keras.Variable)):
            raise TypeError(f"`variables` must hold Keras 3 variables or tf.Variables. Received an item {variable!r}")
    return as_tf_variables(variables)


def _check_process_set(process_set) -> None:
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"`process_set` must be a hvd.ProcessSet. Received: process_set={process_set!r}")
    if process_set.process_set_id is None:
        raise ValueError(
            "`process_set` has not been registered with Horovod: pass it to hvd.init(process_sets=[...]) or "
            f"hvd.add_process_set(...) first. Received: process_set=ProcessSet(ranks={process_set.ranks})"
        )


def _structure_digest(variables: list[tf.Variable]) -> int:
    structure = repr([(str(v.shape), v.dtype.name) for v in variables])
    return int(np.frombuffer(hashlib.sha256(structure.encode()).digest()[:8], dtype=np.int64)[0])


def _broadcast_group(variables: list[tf.Variable], root_rank: int, process_set, scope: str = _SCOPE) -> tf.Operation:
    """The group's ops in the current graph: the structure check, then one broadcast per position."""
    with tf.name_scope(f"{scope}/"):
        digest = tf.constant([_structure_digest(variables)], tf.int64)
        everyone = hvd.allgather(digest, name="structure", process_set=process_set)
        # Every rank sees every digest, so every rank reaches the same verdict: none waits alone.
        # The bare op, not tf.debugging.Assert's guarded form, whose cond grappler warns about.
        same = tf.raw_ops.Assert(condition=tf.reduce_all(tf.equal(everyone, digest[0])), data=[_MISMATCH, everyone])
        with tf.control_dependencies([same]):
            assigns = [
                variable.assign(hvd.broadcast(variable, root_rank, name=f"variable_{position}", process_set=process_set))
                for position, variable in enumerate(variables)
            ]
    return tf.group(*assigns)


@tf.function(autograph=False)
def _broadcast_group_compiled(variables: list[tf.Variable], root_rank: int, process_set) -> None:
    # Eagerly, the group runs as one graph (as Horovod's does), so the broadcasts go out together.
    _broadcast_group(variables, root_rank, process_set)
