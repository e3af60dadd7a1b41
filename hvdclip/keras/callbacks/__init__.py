"""Keras callbacks for `fit` under Horovod, with Horovod's names."""

from hvdclip.keras.callbacks.broadcast_global_variables import BroadcastGlobalVariablesCallback
from hvdclip.keras.callbacks.metric_average import MetricAverageCallback

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback"]
