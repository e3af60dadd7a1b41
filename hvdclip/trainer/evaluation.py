"""Evaluation over all ranks' shards, giving the exact global mean however unevenly they split.

Each rank evaluates its own shard, keeping sums: the loss summed over examples, the example count,
and the state of each Keras metric (which for the usual metrics is sums: a `Mean`'s total and
count, `AUC`'s confusion counts). One allreduce adds the sums of all ranks; the means follow. A
rank with fewer examples simply adds less; no step needs the ranks in lock-step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from hvdclip.distributed.collectives import sum_over_ranks, sum_variables_over_ranks

__all__ = ["Evaluator", "check_metrics"]


def check_metrics(argument: str, metrics: Any) -> list[keras.metrics.Metric]:
    """Validates a list of Keras metric objects with distinct names."""
    if metrics is None:
        return []
    if not isinstance(metrics, (list, tuple)) or not all(isinstance(m, keras.metrics.Metric) for m in metrics):
        raise TypeError(
            f"`{argument}` must be a list of keras.metrics.Metric objects, e.g. "
            f"[keras.metrics.SparseCategoricalAccuracy()]. Received: {argument}={metrics!r}"
        )
    names = [m.name for m in metrics]
    if "loss" in names or len(set(names)) != len(names):
        raise ValueError(f"`{argument}` must have distinct names other than 'loss'. Received: names {names}")
    return list(metrics)


class Evaluator:
    """Computes the loss and `metrics` of a trainer's model on each rank's batches, averaged over ranks.

    The loss is `trainer.loss_fn` (plus the model's regularisation losses), in inference mode.
    """

    def __init__(self, trainer: Any, metrics: Sequence[keras.metrics.Metric] = ()) -> None:
        self.trainer = trainer
        self.metrics = list(metrics)
        self._compiled_batch = tf.function(self._batch, reduce_retracing=True)

    def _batch(self, x: Any, y: Any, sample_weight: Any = None) -> tuple[tf.Tensor, tf.Tensor]:
        model = self.trainer.model
        y_pred = model(x, training=False)
        loss = self.trainer.compute_loss(y, y_pred, sample_weight)
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
        count = tf.cast(tf.shape(tf.nest.flatten(y)[0])[0], tf.float64)
        return tf.cast(loss, tf.float64) * count, count

    def __call__(self, batches: tf.data.Dataset) -> dict[str, float]:
        """Evaluates this rank's `batches`, then combines all ranks (a collective: call on every rank)."""
        self.trainer.average_local_statistics()  # Inference reads the moving statistics: every rank's, not one's.
        for metric in self.metrics:
            metric.reset_state()
        loss_sum = tf.constant(0.0, tf.float64)
        count = tf.constant(0.0, tf.float64)
        for batch in batches:
            batch_loss, batch_count = self._compiled_batch(*batch)
            loss_sum += batch_loss
            count += batch_count
        totals = sum_over_ranks(tf.stack([loss_sum, count]), "eval_loss")
        sum_variables_over_ranks([v for metric in self.metrics for v in metric.variables], "eval_metric")
        results = {"loss": float(totals[0] / totals[1]) if totals[1] else float("nan")}
        results.update({metric.name: float(metric.result()) for metric in self.metrics})
        return results
