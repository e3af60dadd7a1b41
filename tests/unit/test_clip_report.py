"""`ClipReport`: every built-in transform's account of what it did equals measuring its output.

The trainer logs `clipped_grad_norm` and `clip_active` from the report instead of two more passes
over the gradients, so a report that drifts from the truth would mislead every user's logs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.gradients import global_norm
from hvdclip.transforms.base import update_and_report
from support import make_data, make_mlp

RNG = np.random.default_rng(7)


def variables():
    """A dense kernel, a bias, an embedding table and a variable the loss does not reach."""
    shapes = {"dense/kernel": (4, 3), "dense/bias": (3,), "embedding/table": (5, 2), "unused/kernel": (2, 2)}
    return [tf.Variable(RNG.normal(size=shape).astype("float32"), name=name.replace("/", "_")) for name, shape in shapes.items()]


def gradients(scale):
    # Row 1 of the embedding gradient appears twice, as after Horovod's allgather.
    sparse = tf.IndexedSlices(
        tf.constant(RNG.normal(size=(4, 2)).astype("float32") * scale), tf.constant([1, 3, 1, 0]), tf.constant([5, 2])
    )
    return [
        tf.constant(RNG.normal(size=(4, 3)).astype("float32") * scale),
        tf.constant(RNG.normal(size=(3,)).astype("float32") * scale),
        sparse,
        None,
    ]


def dense(grad):
    return None if grad is None else tf.convert_to_tensor(grad).numpy()


def changed(before, after):
    return any(not np.array_equal(dense(b), dense(a)) for b, a in zip(before, after) if b is not None)


# Scales of the gradient on successive steps: some far under every threshold, some far over, and
# a run of equal ones that lets the adaptive methods' statistics settle before the spikes.
SCALES = [1e-3, 1e-3, 1e-3, 1e-3, 50.0, 1e-3, 0.3, 200.0, 1e-3, 2.0]

REPORTING = {
    "identity": hvdclip.identity(),
    "clip_by_value": hvdclip.clip_by_value(1.0),
    "clip_by_norm": hvdclip.clip_by_norm(1.0),
    "clip_by_global_norm": hvdclip.clip_by_global_norm(1.0),
    "agc": hvdclip.adaptive_grad_clip(0.05),
    "agc_excluding": hvdclip.adaptive_grad_clip(0.05, exclude=("dense_bias",)),
    "autoclip": hvdclip.autoclip(50, history=4),
    "zclip": hvdclip.zclip(alpha=0.9, z_threshold=2.0, warmup_steps=3),
    "chain_value_then_global": hvdclip.chain(hvdclip.clip_by_value(2.0), hvdclip.clip_by_global_norm(3.0)),
    "chain_identity_then_norm": hvdclip.chain(hvdclip.identity(), hvdclip.clip_by_norm(1.0)),
    "skip_nonfinite": hvdclip.skip_nonfinite(hvdclip.clip_by_global_norm(1.0)),
}


@pytest.mark.parametrize("name", sorted(REPORTING))
def test_report_equals_measuring_the_output(name):
    transform, params = REPORTING[name], variables()
    assert transform.update_with_report is not None, "every built-in transform reports"
    state = transform.init(params)
    actives = []
    for scale in SCALES:
        grads = gradients(scale)
        out, new_state, report = update_and_report(transform, grads, state, params)
        plain_out, plain_state = transform.update(grads, state, params)

        # `update` is exactly `update_with_report` without the report.
        for a, b in zip(out, plain_out):
            assert (a is None) == (b is None) and (a is None or np.array_equal(dense(a), dense(b)))
        tf.nest.map_structure(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new_state, plain_state)

        norm = global_norm(grads) if report.norm is None else report.norm
        assert float(norm) == pytest.approx(float(global_norm(out)), rel=1e-5), f"scale {scale}"
        assert bool(report.active) == changed(grads, out), f"scale {scale}"
        actives.append(bool(report.active))
        state = new_state
    if name != "identity":
        assert True in actives and False in actives, f"{name} should both clip and not clip over {SCALES}: {actives}"


def test_skip_nonfinite_reports_the_zeros_it_puts_in_place_of_a_nan_gradient():
    transform, params = REPORTING["skip_nonfinite"], variables()
    grads = gradients(1e-3)
    grads[0] = tf.constant(np.full((4, 3), np.nan, "float32"))
    out, _, report = update_and_report(transform, grads, transform.init(params), params)
    assert float(report.norm) == 0.0 == float(global_norm(out))
    assert bool(report.active) is True


def test_chain_reports_only_when_every_member_does():
    unreported = hvdclip.GradientTransform(*hvdclip.clip_by_norm(1.0)[:2])
    assert unreported.update_with_report is None
    assert hvdclip.chain(hvdclip.clip_by_value(1.0), unreported).update_with_report is None
    assert hvdclip.chain(hvdclip.clip_by_value(1.0), hvdclip.clip_by_norm(1.0)).update_with_report is not None


def test_update_with_report_must_return_a_clip_report():
    def update_with_report(grads, state, variables):
        return grads, state, (1.0, True)

    transform = hvdclip.reporting(None, update_with_report)
    with pytest.raises(TypeError, match=r"must return \(grads, state, hvdclip.ClipReport\(norm, active\)\)\. Received a report of \(1\.0, True\)"):
        update_and_report(transform, gradients(1.0), (), variables())


# ------------------------------------------------------------------------------- in the trainer


def run(clip, steps=12):
    x, y = make_data(seed=5, n=steps * 8)
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=2), keras.optimizers.SGD(0.05), keras.losses.MeanSquaredError(), clip=clip)
    return [trainer.train_step(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(steps)]


# Thresholds at which each method clips some of run()'s steps and not others (norms 6-33).
IN_THE_TRAINER = {
    "clip_by_global_norm": hvdclip.clip_by_global_norm(15.0),
    "clip_by_value": hvdclip.clip_by_value(5.0),
    "agc": hvdclip.adaptive_grad_clip(100.0),
    "zclip": hvdclip.zclip(alpha=0.9, z_threshold=1.0, warmup_steps=3),
}


@pytest.mark.parametrize("name", sorted(IN_THE_TRAINER))
def test_trainer_metrics_from_the_report_equal_the_measured_ones(name):
    transform = IN_THE_TRAINER[name]
    measured = run(hvdclip.GradientTransform(transform.init, transform.update))  # No report: the trainer measures.
    reported = run(transform)
    assert [m["clip_active"] for m in reported] == [m["clip_active"] for m in measured]
    for a, b in zip(reported, measured):
        assert a["clipped_grad_norm"] == pytest.approx(b["clipped_grad_norm"], rel=1e-5)
        assert a["loss"] == b["loss"]
    assert {m["clip_active"] for m in reported} == {True, False}


def test_trainer_logs_what_the_report_says():
    """The trainer takes the transform's word: a report that lies shows in the metrics."""

    def update_with_report(grads, state, variables):
        return list(grads), state, hvdclip.ClipReport(tf.constant(42.0), tf.constant(True))

    metrics = run(hvdclip.reporting(None, update_with_report), steps=1)[0]
    assert metrics["clipped_grad_norm"] == 42.0 and metrics["clip_active"] is True
