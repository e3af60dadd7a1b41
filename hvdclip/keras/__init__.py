"""`import hvdclip.keras as hvd`: `horovod.tensorflow.keras`'s API on Keras 3, under Horovod's names.

Door 2, Keras `model.fit` with hvdclip: `DistributedOptimizer`, `callbacks` and `load_model`;
plus Horovod's runtime queries, process sets and value collectives, and `elastic`. Also hvdclip's
own `broadcast_initial_state` (to send rank 0's state before `fit`). `docs/horovod.md` lists every name of `horovod.tensorflow.keras` and what hvdclip
does with it.
"""

from hvdclip.compat.collectives import Adasum, Average, Compression, Sum
from hvdclip.compat.process_sets import ProcessSet, add_process_set, global_process_set, remove_process_set
from hvdclip.compat.runtime import (
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    init,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    rocm_built,
    shutdown,
    size,
    start_timeline,
    stop_timeline,
)
from hvdclip.compat.saving import load_model
from hvdclip.keras import callbacks
from hvdclip.keras.startup import broadcast_initial_state
from hvdclip.keras.optimizer import DistributedOptimizer
from hvdclip.keras import elastic  # After the above: it imports hvdclip.trainer, which imports hvdclip.keras.schedules.
from hvdclip.compat.keras_collectives import allgather, allreduce, broadcast, broadcast_global_variables, reducescatter

__all__ = [
    "Adasum",
    "Average",
    "Compression",
    "DistributedOptimizer",
    "ProcessSet",
    "Sum",
    "add_process_set",
    "allgather",
    "allreduce",
    "broadcast",
    "broadcast_global_variables",
    "broadcast_initial_state",
    "callbacks",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "elastic",
    "global_process_set",
    "gloo_built",
    "gloo_enabled",
    "init",
    "is_initialized",
    "load_model",
    "local_rank",
    "local_size",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "rank",
    "reducescatter",
    "remove_process_set",
    "rocm_built",
    "shutdown",
    "size",
    "start_timeline",
    "stop_timeline",
]
