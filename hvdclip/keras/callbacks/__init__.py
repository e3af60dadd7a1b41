"""Keras callbacks for `fit` under Horovod, with Horovod's names (`horovod.tensorflow.keras.callbacks`)."""

from hvdclip.keras.callbacks.best_model_checkpoint import BestModelCheckpoint
from hvdclip.keras.callbacks.broadcast_global_variables import BroadcastGlobalVariablesCallback
from hvdclip.keras.callbacks.learning_rate_schedule import LearningRateScheduleCallback
from hvdclip.keras.callbacks.learning_rate_warmup import LearningRateWarmupCallback
from hvdclip.keras.callbacks.metric_average import MetricAverageCallback

__all__ = [
    "BestModelCheckpoint",
    "BroadcastGlobalVariablesCallback",
    "LearningRateScheduleCallback",
    "LearningRateWarmupCallback",
    "MetricAverageCallback",
]
