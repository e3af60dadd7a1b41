"""`horovod.tensorflow.keras.elastic` on Keras 3: `run`, `KerasState` and the state callbacks.

Re-exports only; `hvdclip.compat.elastic` says which are Horovod's own and what the others fix.
"""

from hvdclip.compat.elastic import (
    CommitStateCallback,
    KerasState,
    UpdateBatchStateCallback,
    UpdateEpochStateCallback,
    run,
)

__all__ = ["CommitStateCallback", "KerasState", "UpdateBatchStateCallback", "UpdateEpochStateCallback", "run"]
