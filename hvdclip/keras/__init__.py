"""Door 2: Keras `model.fit` with hvdclip, under Horovod's names (a find-and-replace away from
`horovod.tensorflow.keras`): `DistributedOptimizer`, `callbacks.BroadcastGlobalVariablesCallback`,
`callbacks.MetricAverageCallback`; plus `broadcast_initial_state` for a loop without callbacks and
the learning-rate schedule `ScaledWarmup`."""

from hvdclip.keras import callbacks
from hvdclip.keras.broadcast import broadcast_initial_state
from hvdclip.keras.optimizer import DistributedOptimizer
from hvdclip.keras.schedules import ScaledWarmup

__all__ = ["DistributedOptimizer", "ScaledWarmup", "broadcast_initial_state", "callbacks"]
