"""Horovod's process sets (collectives over a subset of the ranks), as Horovod has them.

They hold rank lists and ids only, so Horovod's own objects work unchanged on Keras 3.
"""

from horovod.tensorflow.mpi_ops import ProcessSet, add_process_set, global_process_set, remove_process_set

__all__ = ["ProcessSet", "add_process_set", "global_process_set", "remove_process_set"]
