"""Running means of step metrics, summed on the device so that logging costs no host sync per step.

A step returns its metrics as scalar tensors. Reading one as a Python float waits for the device;
adding it to a sum on the device does not. Means are read only when something is shown or written.

* `StepSums`: sums kept in a variable that `fit`'s compiled step adds to, so that summing costs
  no eager op either (`fit`'s epoch means and the progress bar read them).
* `RunningMeans`: sums of the tensors a callback is handed, added eagerly (TensorBoard's windows).
"""

from __future__ import annotations

from collections.abc import Mapping

from hvdclip.distributed.collectives import sum_over_ranks
import tensorflow as tf

__all__ = ["RunningMeans", "StepSums", "display_name"]

# What a mean of each boolean step metric is called in progress bars and TensorBoard.
_DISPLAY_NAMES = {"clip_active": "clip_rate", "skipped": "skip_rate"}


def display_name(metric: str) -> str:
    """The name a metric's mean is shown under: the mean of `clip_active` is the `clip_rate`."""
    return _DISPLAY_NAMES.get(metric, metric)


class StepSums:
    """Each step metric's sum and count since the last `reset`, in one variable a compiled step adds to.

    Means are over the steps that were *applied*: a step that reports `skipped=True` (its reduced
    gradient was NaN/Inf, e.g. a mixed-precision overflow) is counted, in `skipped`'s mean (the
    skip rate, over all steps), but its other metrics are left out of their means, so one
    overflow does not turn the epoch's `grad_norm` into `inf`. A step that does not report
    `skipped` (an accumulation micro-step) counts as applied.

    `add` runs inside the compiled step, so a step's sums cost one variable update on the device:
    no eager op and no host sync. A metric gets a column of the variable the first time a traced
    step reports it; the columns are the same on every rank, which traces the same steps.

    The variable is this rank's scratch: it is neither broadcast nor checkpointed.

    Example:
        >>> sums = StepSums()
        >>> step = tf.function(lambda: sums.add({"loss": tf.constant(2.0)}))
        >>> step(); step()
        >>> sums.means()
        {'loss': 2.0}
    """

    # Columns for distinct metric names; the trainer's step reports five.
    CAPACITY = 16

    def __init__(self) -> None:
        # Row 0 sums each metric over the steps averaged in, row 1 counts those steps, row 2 counts
        # every step that reported the metric, skipped or not (float64 counts are exact to 2**53).
        self._totals = tf.Variable(tf.zeros([3, self.CAPACITY], tf.float64), trainable=False, name="hvdclip_step_sums")
        self._columns: dict[str, int] = {}

    def _column(self, name: str) -> int:
        if name not in self._columns:
            if len(self._columns) == self.CAPACITY:
                raise ValueError(
                    f"A step reports more than StepSums.CAPACITY={self.CAPACITY} metrics; cannot add {name!r} "
                    f"to {sorted(self._columns)}. Raise StepSums.CAPACITY."
                )
            self._columns[name] = len(self._columns)
        return self._columns[name]

    def add(self, metrics: Mapping[str, tf.Tensor]) -> None:
        """Adds one step's scalar metrics (bools count as 0 or 1); call it inside the compiled step."""
        if not metrics:
            return
        columns = [self._column(name) for name in metrics]
        applied = tf.logical_not(tf.cast(tf.reshape(metrics["skipped"], []), tf.bool)) if "skipped" in metrics else None
        values, weights = [], []
        for name, value in metrics.items():
            value = tf.cast(tf.reshape(value, []), tf.float64)
            if applied is None or name == "skipped":
                values.append(value)
                weights.append(tf.constant(1.0, tf.float64))
            else:  # `where`, not a product: inf * 0 would be NaN.
                values.append(tf.where(applied, value, tf.zeros_like(value)))
                weights.append(tf.cast(applied, tf.float64))
        ones = [tf.constant(1.0, tf.float64)] * len(columns)
        indices = [[row, column] for row in range(3) for column in columns]
        self._totals.scatter_nd_add(indices, tf.stack(values + weights + ones))

    def reset(self) -> None:
        self._totals.assign(tf.zeros_like(self._totals))

    def names(self) -> set[str]:
        """The metrics some step reported since the last reset (reads the counts: one host sync)."""
        counts = self._totals[2].numpy()
        return {name for name, column in self._columns.items() if counts[column] > 0}

    def means(self) -> dict[str, float]:
        """Each reported metric's mean over the applied steps that reported it, as Python floats (one host sync)."""
        sums, counts, _ = self._totals.numpy()
        return {name: float(sums[c] / counts[c]) for name, c in sorted(self._columns.items()) if counts[c] > 0}

    def rank_means(self, names: list[str]) -> dict[str, float]:
        """Each metric in `names` averaged over steps and over ranks: one allreduce, identical everywhere.

        Every rank must call this with the same `names` after running the same steps. A metric no
        applied step reported since the reset counts as 0 over 0 steps, so its mean is NaN.
        """
        if not names:
            return {}
        unknown = sorted(set(names) - set(self._columns))
        if unknown:
            raise ValueError(f"`names` has metrics no step reported: {unknown}. Received: names={names!r}")
        ours = tf.gather(self._totals[:2], [self._columns[name] for name in names], axis=1)
        totals = sum_over_ranks(ours, "epoch_means")
        # 0/0 is NaN on purpose: an epoch resumed at its end has no steps left to average.
        means = tf.math.divide(totals[0], totals[1]).numpy()
        return {name: float(value) for name, value in zip(names, means)}


class RunningMeans:
    """Sums of step metrics since the last `reset`, per metric (a step may report only some).

    For a callback that keeps its own window of steps (TensorBoard): each `add` runs a cast and an
    add per metric eagerly, but waits for nothing. Only tensor values are metrics; anything else in
    the logs (such as `samples`) is ignored.
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

    def tensors(self) -> dict[str, tf.Tensor]:
        """Each metric's mean as a float64 tensor, with no host sync."""
        return {name: total / self._counts[name] for name, total in sorted(self._sums.items())}
