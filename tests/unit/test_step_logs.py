"""`StepSums`: the epoch sums that `fit`'s compiled step keeps, against plain Python float64 sums."""

import math

import numpy as np
import pytest
import tensorflow as tf

from hvdclip.trainer.step_logs import StepSums


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
