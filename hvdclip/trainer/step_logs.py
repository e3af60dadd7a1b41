"""Running means of step metrics for callbacks, and the names their means are shown under.

A step returns its metrics as scalar tensors. Reading one as a Python float waits for the device;
adding it to a sum does not. `RunningMeans` sums the tensors a callback is handed, eagerly
(TensorBoard's windows); `fit`'s own epoch sums are `hvdclip.core.step_sums.StepSums`, added inside
the compiled step.
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from hvdclip.core.step_sums import step_weights

__all__ = ["RunningMeans", "display_name"]

# What a mean of each boolean step metric is called in progress bars and TensorBoard.
_DISPLAY_NAMES = {"clip_active": "clip_rate", "skipped": "skip_rate"}


def display_name(metric: str) -> str:
    """The name a metric's mean is shown under: the mean of `clip_active` is the `clip_rate`."""
    return _DISPLAY_NAMES.get(metric, metric)


class RunningMeans:
    """Sums of step metrics since the last `reset`, per metric, with `StepSums`' rules for which steps count.

    For a callback that keeps its own window of steps (TensorBoard): each `add` runs a few ops per
    metric eagerly, but waits for nothing. Only tensor values are metrics; anything else in the
    logs (such as `samples`) is ignored.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, tf.Tensor] = {}
        self._weights: dict[str, tf.Tensor] = {}

    def add(self, logs: Mapping[str, object]) -> None:
        tensors = {name: value for name, value in logs.items() if isinstance(value, tf.Tensor)}
        names, values, weights = step_weights(tensors)
        for index, name in enumerate(names):
            self._sums[name] = self._sums[name] + values[index] if name in self._sums else values[index]
            self._weights[name] = self._weights[name] + weights[index] if name in self._weights else weights[index]

    def tensors(self) -> dict[str, tf.Tensor]:
        """Each metric's mean as a float64 tensor (NaN if no step of the window counted), with no host sync."""
        return {name: total / self._weights[name] for name, total in sorted(self._sums.items())}
