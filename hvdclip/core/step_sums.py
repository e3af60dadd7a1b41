"""`StepSums`: running sums of step metrics kept in one variable that a compiled step adds to.

A step returns its metrics as scalar tensors; reading one as a Python float waits for the device,
adding it to a sum on the device does not. `fit`'s epoch means (the trainer's and the Keras door's)
are read from these sums once per epoch, or when a progress bar redraws.

Which steps a metric's mean is over follows the core step's report (`hvdclip.core.step.REPORT`):

* the reduced gradient's `grad_norm`, `clipped_grad_norm` and `clip_active`: the steps that
  reduced (`synced`) and were applied (not `skipped`): a skipped step's norm is NaN or Inf and an
  accumulation micro-step has none;
* `skipped`: the steps that reduced (its mean is the skip rate over optimizer steps);
* anything else (the loss, training metrics): every call that was not skipped;
* `synced` and `all_have_data` are facts for the loop, not averaged.
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from hvdclip.distributed.collectives import sum_over_ranks

__all__ = ["StepSums", "step_weights"]

_OVER_APPLIED_STEPS = ("grad_norm", "clipped_grad_norm", "clip_active")
_NOT_AVERAGED = ("synced", "all_have_data")


_RULES = {"applied": 0, "synced": 1, "call": 2}


def _rule(name: str) -> int:
    return _RULES["applied" if name in _OVER_APPLIED_STEPS else "synced" if name == "skipped" else "call"]


def step_weights(metrics: Mapping[str, tf.Tensor]) -> tuple[list[str], tf.Tensor, tf.Tensor]:
    """One step's averaged metrics: their names, and (values, weights) as float64 vectors.

    A weight is 1 if the step counts in that metric's mean, else 0 (and the value 0, so that a NaN
    or an Inf adds nothing). Vectors, not one small op chain per metric: in a compiled step every
    op costs host time, which shows on small models.
    """
    names = [name for name in metrics if name not in _NOT_AVERAGED]
    if not names:
        return [], tf.zeros([0], tf.float64), tf.zeros([0], tf.float64)

    def flag(name: str, default: bool) -> tf.Tensor:
        return tf.cast(tf.reshape(metrics[name], []), tf.bool) if name in metrics else tf.constant(default)

    synced, skipped = flag("synced", True), flag("skipped", False)
    rules = tf.cast(tf.stack([synced & ~skipped, synced, ~skipped]), tf.float64)
    weights = tf.gather(rules, [_rule(name) for name in names])
    values = tf.stack([tf.cast(tf.reshape(metrics[name], []), tf.float64) for name in names])
    return names, tf.where(weights > 0, values, tf.zeros_like(values)), weights  # `where`: inf * 0 is NaN.


class StepSums:
    """Each step metric's sum and count since the last `reset`, in one variable a compiled step adds to.

    Means follow the module docstring's rules: a step that reports `skipped=True` (its reduced
    gradient was NaN/Inf, e.g. a mixed-precision overflow) is counted in `skipped`'s mean (the
    skip rate), but its other metrics are left out of their means, so one overflow does not turn
    the epoch's `grad_norm` into `inf`; a step that reports `synced=False` (an accumulation
    micro-step) adds its loss but no gradient norm. A step that reports neither counts as applied.

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
        names, values, weights = step_weights(metrics)
        if not names:
            return
        columns = [self._column(name) for name in names]
        ones = tf.ones([len(columns)], tf.float64)
        indices = [[row, column] for row in range(3) for column in columns]
        self._totals.scatter_nd_add(indices, tf.concat([values, weights, ones], axis=0))

    def reset(self) -> None:
        self._totals.assign(tf.zeros_like(self._totals))

    def names(self) -> set[str]:
        """The metrics some step reported since the last reset (reads the counts: one host sync)."""
        counts = self._totals[2].numpy()
        return {name for name, column in self._columns.items() if counts[column] > 0}

    def totals(self) -> dict[str, tuple[float, float]]:
        """Each reported metric's (sum, number of steps averaged in), as Python floats (one host sync)."""
        sums, counts, _ = self._totals.numpy()
        return {name: (float(sums[c]), float(counts[c])) for name, c in sorted(self._columns.items())}

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
