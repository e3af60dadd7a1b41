"""`StepSums`: the epoch sums that `fit`'s compiled step keeps, against plain Python float64 sums."""

import math

import numpy as np
import pytest
import tensorflow as tf

from hvdclip.core.step_sums import StepSums


def compiled_add(sums):
    return tf.function(lambda metrics: sums.add(metrics))


def test_sums_added_in_a_compiled_step_equal_python_float64_sums_exactly():
    rng = np.random.default_rng(0)
    losses = rng.lognormal(0.0, 3.0, size=40).astype("float32")  # Wide range: rounding would show.
    clipped = rng.random(40) < 0.3
    sums = StepSums()
    add = compiled_add(sums)
    for step, (loss, active) in enumerate(zip(losses, clipped)):
        if step % 4 == 3:  # A step that reports only some metrics, like an accumulation micro-step.
            add({"loss": tf.constant(loss)})
        else:
            add({"loss": tf.constant(loss), "clip_active": tf.constant(active)})

    full = [step % 4 != 3 for step in range(40)]
    expected_loss = sum(float(v) for v in losses) / 40
    expected_rate = sum(float(a) for a, f in zip(clipped, full) if f) / sum(full)
    assert sums.names() == {"loss", "clip_active"}
    assert sums.means() == {"clip_active": expected_rate, "loss": expected_loss}
    assert sums.rank_means(["clip_active", "loss"]) == {"clip_active": expected_rate, "loss": expected_loss}


def test_reset_forgets_the_sums_but_keeps_the_columns():
    sums = StepSums()
    add = compiled_add(sums)
    add({"loss": tf.constant(3.0), "grad_norm": tf.constant(1.0)})
    sums.reset()
    add({"loss": tf.constant(5.0)})
    assert sums.names() == {"loss"} and sums.means() == {"loss": 5.0}
    means = sums.rank_means(["grad_norm", "loss"])
    assert math.isnan(means["grad_norm"]) and means["loss"] == 5.0, "a metric no step reported since the reset is 0/0"


def test_rank_means_refuses_a_name_no_step_reported():
    sums = StepSums()
    compiled_add(sums)({"loss": tf.constant(1.0)})
    with pytest.raises(ValueError, match=r"`names` has metrics no step reported: \['lr'\]. Received: names=\['loss', 'lr'\]"):
        sums.rank_means(["loss", "lr"])


def test_more_metrics_than_columns_fail_at_trace_time_with_the_limit():
    sums = StepSums()
    too_many = {f"m{i}": tf.constant(1.0) for i in range(StepSums.CAPACITY + 1)}
    with pytest.raises(ValueError, match=rf"more than StepSums.CAPACITY={StepSums.CAPACITY} metrics; cannot add 'm{StepSums.CAPACITY}'"):
        compiled_add(sums)(too_many)


def test_skipped_steps_are_counted_but_not_averaged_in():
    sums = StepSums()
    add = compiled_add(sums)
    add({"grad_norm": tf.constant(float("inf")), "loss": tf.constant(9.0), "skipped": tf.constant(True)})
    add({"grad_norm": tf.constant(2.0), "loss": tf.constant(1.0), "skipped": tf.constant(False)})
    add({"grad_norm": tf.constant(4.0), "loss": tf.constant(3.0), "skipped": tf.constant(False)})
    add({"loss": tf.constant(5.0)})  # An accumulation micro-step: no `skipped`, counts as applied.
    assert sums.means() == {"grad_norm": 3.0, "loss": 3.0, "skipped": 1 / 3}
    assert sums.rank_means(["grad_norm", "loss", "skipped"]) == {"grad_norm": 3.0, "loss": 3.0, "skipped": 1 / 3}


def test_a_metric_whose_every_step_was_skipped_is_named_and_its_mean_is_nan():
    sums = StepSums()
    compiled_add(sums)({"grad_norm": tf.constant(float("nan")), "skipped": tf.constant(True)})
    assert sums.names() == {"grad_norm", "skipped"}
    means = sums.rank_means(["grad_norm", "skipped"])
    assert math.isnan(means["grad_norm"]) and means["skipped"] == 1.0
