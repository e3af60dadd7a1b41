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
from hvdclip.transforms.base import apply_transform
from support import make_clicks, make_data, make_embedding_model, make_mlp

RNG = np.random.default_rng(7)


def variables():
    """A dense kernel, a bias, an embedding table and a variable the loss does not reach."""
    shapes = {"dense/kernel": (4, 3), "dense/bias": (3,), "embedding/table": (5, 2), "unused/kernel": (2, 2)}
    return [tf.Variable(RNG.normal(size=shape).astype("float32"), name=name.replace("/", "_")) for name, shape in shapes.items()]


def gradients(scale, dtype="float32"):
    # Row 1 of the embedding gradient appears twice, as after Horovod's allgather.
    def normal(shape):
        return tf.constant(RNG.normal(size=shape) * scale, dtype)

    sparse = tf.IndexedSlices(normal((4, 2)), tf.constant([1, 3, 1, 0]), tf.constant([5, 2]))
    return [normal((4, 3)), normal((3,)), sparse, None]


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
    "zero_nonfinite": hvdclip.zero_nonfinite(hvdclip.clip_by_global_norm(1.0)),
}
# How close the reported norm is to the measured one: float32 accumulates in float32 both ways;
# in 16-bit dtypes the output is rounded after scaling, which the report (computed before) cannot see.
NORM_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


@pytest.mark.parametrize("dtype", sorted(NORM_TOLERANCE))
@pytest.mark.parametrize("name", sorted(REPORTING))
def test_report_equals_measuring_the_output(name, dtype):
    transform, params = REPORTING[name], variables()
    state = transform.init(params)
    actives = []
    for scale in SCALES:
        grads = gradients(scale, dtype)
        out, new_state, report = apply_transform(transform, grads, state, params)
        assert report is not None, "every built-in transform reports"
        plain_out, plain_state, _ = transform.update(list(grads), state, params)

        # `apply_transform` returns what `update` returned, only checked.
        for a, b in zip(out, plain_out):
            assert (a is None) == (b is None) and (a is None or np.array_equal(dense(a), dense(b)))
        tf.nest.map_structure(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new_state, plain_state)

        norm = global_norm(grads) if report.norm is None else report.norm
        assert float(norm) == pytest.approx(float(global_norm(out)), rel=NORM_TOLERANCE[dtype]), f"scale {scale}"
        assert bool(report.active) == changed(grads, out), f"scale {scale}"
        actives.append(bool(report.active))
        state = new_state
    if name != "identity":
        assert True in actives and False in actives, f"{name} should both clip and not clip over {SCALES}: {actives}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_factor_that_rounds_to_one_in_the_gradients_dtype_is_not_a_clip(dtype):
    grads = gradients(1.0, dtype)
    norm = float(global_norm(grads))
    out, _, report = apply_transform(hvdclip.clip_by_global_norm(norm * 0.99995), grads, (), variables())
    assert not changed(grads, out), "the factor is exactly 1 in 16 bits"
    assert bool(report.active) is False
    assert float(report.norm) == pytest.approx(norm, rel=1e-6)


@pytest.mark.parametrize("name", ["clip_by_global_norm", "clip_by_norm", "autoclip"])
def test_a_norm_that_overflows_is_reported_as_it_is_measured(name):
    """A finite gradient whose squared norm overflows float32 gets the factor max/Inf = 0: zeros, not NaN."""
    grads = [tf.constant([1e20, 1.0]), tf.constant([3.0])]
    transform = REPORTING[name]
    out, _, report = apply_transform(transform, grads, transform.init([]), [])
    assert float(report.norm) == pytest.approx(float(global_norm(out)), rel=1e-6)
    assert bool(report.active) == changed(grads, out)


def test_zero_nonfinite_reports_the_zeros_it_puts_in_place_of_a_nan_gradient():
    transform, params = REPORTING["zero_nonfinite"], variables()
    grads = gradients(1e-3)
    grads[0] = tf.constant(np.full((4, 3), np.nan, "float32"))
    out, _, report = apply_transform(transform, grads, transform.init(params), params)
    assert float(report.norm) == 0.0 == float(global_norm(out))
    assert bool(report.active) is True


# ----------------------------------------------------------------------------------- the protocol


def test_a_transform_is_still_a_pair():
    init, update = hvdclip.clip_by_global_norm(1.0)
    assert callable(init) and callable(update)


def report_of(transform):
    params = variables()
    return apply_transform(transform, gradients(1.0), transform.init(params), params).report


def test_chain_reports_only_when_every_member_does():
    plain_update = lambda grads, state, variables: hvdclip.TransformResult(grads, state)  # noqa: E731
    unreported = hvdclip.clip_by_norm(1.0)._replace(update=plain_update)
    assert report_of(unreported) is None
    assert report_of(hvdclip.chain(hvdclip.clip_by_value(1.0), unreported)) is None
    assert report_of(hvdclip.chain(hvdclip.clip_by_value(1.0), hvdclip.clip_by_norm(1.0))) is not None
    assert report_of(hvdclip.zero_nonfinite(unreported)) is None
    assert report_of(hvdclip.zero_nonfinite(hvdclip.clip_by_norm(1.0))) is not None


def test_a_transform_without_a_report_is_measured_by_the_trainer():
    zeros = lambda grads, state, variables: hvdclip.TransformResult([None if g is None else tf.zeros_like(g) for g in grads], state)  # noqa: E731
    replaced = hvdclip.clip_by_global_norm(1.0)._replace(update=zeros)
    metrics = run(replaced, steps=1)[0]
    assert metrics["clipped_grad_norm"] == 0.0 and metrics["clip_active"] is True


def lying(report):
    def update(grads, state, variables):
        return hvdclip.TransformResult(list(grads), state, report)

    return hvdclip.GradientTransform(lambda variables: (), update)


@pytest.mark.parametrize(
    "report, shown",
    [
        ((1.0, True), r"\(1\.0, True\)"),
        (hvdclip.ClipReport(None, None), r"ClipReport\(norm=None, active=None\)"),
        (hvdclip.ClipReport(tf.constant([1.0, 2.0]), tf.constant(True)), r"ClipReport\(norm=<tf\.Tensor"),
    ],
    ids=["tuple", "active-none", "norm-vector"],
)
@pytest.mark.parametrize("in_chain", [False, True], ids=["alone", "in-chain"])
def test_a_malformed_report_is_refused_with_what_was_received(report, shown, in_chain):
    transform = lying(report)
    if in_chain:
        transform = hvdclip.chain(hvdclip.clip_by_value(1.0), transform)
    with pytest.raises(TypeError, match=r"`update` must return a TransformResult whose `report` is None or hvdclip\.ClipReport\(norm, active\), "
                       r"with `norm` a float32 scalar or None and `active` a bool scalar\. Received: report=" + shown):
        apply_transform(transform, gradients(1.0), transform.init([]), variables())


# ------------------------------------------------------------------------------- in the trainer


def run(clip, steps=12, sparse=False):
    if sparse:
        model, loss = make_embedding_model(seed=2), keras.losses.BinaryCrossentropy(from_logits=True)
        x, y = make_clicks(seed=5, n=steps * 8)
        y = (y > 3.0).astype("float32")
    else:
        model, loss = make_mlp(seed=2), keras.losses.MeanSquaredError()
        x, y = make_data(seed=5, n=steps * 8)
    trainer = hvdclip.HvdClipTrainer(model, keras.optimizers.SGD(0.05), loss, clip=clip)
    return [trainer.train_step(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(steps)]


# Thresholds at which each method clips some of run()'s steps and not others.
IN_THE_TRAINER = {
    "clip_by_global_norm": (hvdclip.clip_by_global_norm(15.0), False),
    "clip_by_norm": (hvdclip.clip_by_norm(10.0), False),
    "clip_by_value": (hvdclip.clip_by_value(5.0), False),
    "agc": (hvdclip.adaptive_grad_clip(100.0), False),
    "zclip": (hvdclip.zclip(alpha=0.9, z_threshold=1.0, warmup_steps=3), False),
    "chain": (hvdclip.chain(hvdclip.clip_by_value(8.0), hvdclip.clip_by_global_norm(15.0)), False),
    "zero_nonfinite": (hvdclip.zero_nonfinite(hvdclip.clip_by_global_norm(15.0)), False),
    "sparse_global_norm": (hvdclip.clip_by_global_norm(0.42), True),
    "sparse_agc": (hvdclip.adaptive_grad_clip(2.0, eps=0.1), True),
}


@pytest.mark.parametrize("name", sorted(IN_THE_TRAINER))
def test_trainer_metrics_from_the_report_equal_the_measured_ones(name):
    transform, sparse = IN_THE_TRAINER[name]
    plain_update = lambda grads, state, variables: transform.update(grads, state, variables)._replace(report=None)  # noqa: E731
    measured = run(hvdclip.GradientTransform(transform.init, plain_update), sparse=sparse)  # No report: measured.
    reported = run(transform, sparse=sparse)
    assert [m["clip_active"] for m in reported] == [m["clip_active"] for m in measured]
    for a, b in zip(reported, measured):
        assert a["clipped_grad_norm"] == pytest.approx(b["clipped_grad_norm"], rel=1e-5)
        assert a["loss"] == b["loss"]
    assert {m["clip_active"] for m in reported} == {True, False}


def test_trainer_logs_what_the_report_says():
    """The trainer takes the transform's word: a report that lies shows in the metrics."""
    metrics = run(lying(hvdclip.ClipReport(tf.constant(42.0), tf.constant(True))), steps=1)[0]
    assert metrics["clipped_grad_norm"] == 42.0 and metrics["clip_active"] is True


@pytest.mark.parametrize("reports", [True, False], ids=["reported", "measured"])
def test_a_non_finite_gradient_is_not_a_clip(reports):
    transform = hvdclip.clip_by_global_norm(1.0)
    if not reports:
        unreported = lambda grads, state, variables: hvdclip.clip_by_global_norm(1.0).update(grads, state, variables)._replace(report=None)  # noqa: E731
        transform = transform._replace(update=unreported)
    x, y = make_data(seed=5, n=8)
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=2), keras.optimizers.SGD(0.05), keras.losses.MeanSquaredError(), clip=transform)
    metrics = trainer.train_step(np.where(np.arange(8)[:, None] == 3, np.nan, x).astype("float32"), y)
    assert metrics["skipped"] is True and metrics["clip_active"] is False
