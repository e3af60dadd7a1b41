"""Running means of step metrics, kept as tensors so that logging costs no host sync per step.

A step returns its metrics as scalar tensors. Reading one as a Python float waits for the device;
adding it to a tensor sum does not. Means are read only when something is shown or written.
"""

from __future__ import annotations

from collections.abc import Mapping

import horovod.tensorflow as hvd
import tensorflow as tf

__all__ = ["RunningMeans", "display_name"]

# What a mean of each boolean step metric is called in progress bars and TensorBoard.
_DISPLAY_NAMES = {"clip_active": "clip_rate", "skipped": "skip_rate"}


def display_name(metric: str) -> str:
    """The name a metric's mean is shown under: the mean of `clip_active` is the `clip_rate`."""
    return _DISPLAY_NAMES.get(metric, metric)


class RunningMeans:
    """Sums of step metrics since the last `reset`, per metric (a step may report only some).

    Only tensor values are metrics; anything else in the logs (such as `samples`) is ignored.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, tf.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, logs: Mapping[str, object]) -> None:
        for name, value in logs.items():
            if isinstance(value, tf.Tensor):
                value = tf.cast(value, tf.float64)
                self._sums[name] = self._sums[name] + value if name in self._sums else value
                self._counts[name] = self._counts.get(name, 0) + 1

    @property
    def names(self) -> set[str]:
        """The metrics added since the last reset."""
        return set(self._sums)

    def tensors(self) -> dict[str, tf.Tensor]:
        """Each metric's mean as a float64 tensor, with no host sync."""
        return {name: total / self._counts[name] for name, total in sorted(self._sums.items())}

    def means(self) -> dict[str, float]:
        """Each metric's mean as a Python float (one host sync)."""
        return {name: float(value) for name, value in self.tensors().items()}

    def rank_means(self, names: list[str]) -> dict[str, float]:
        """Each metric in `names` averaged over steps and over ranks: one allreduce, identical everywhere.

        Every rank must call this with the same `names` after running the same steps. A metric no
        step reported here counts as 0 over 0 steps, so its mean is NaN.
        """
        if not names:
            return {}
        zero = tf.constant(0.0, tf.float64)
        sums = tf.stack([self._sums.get(name, zero) for name in names])
        counts = tf.constant([float(self._counts.get(name, 0)) for name in names], tf.float64)
        totals = hvd.allreduce(tf.stack([sums, counts]), op=hvd.Sum, name="hvdclip_epoch_means")
        # 0/0 is NaN on purpose: an epoch resumed at its end has no steps left to average.
        means = tf.math.divide(totals[0], totals[1]).numpy()
        return {name: float(value) for name, value in zip(names, means)}
