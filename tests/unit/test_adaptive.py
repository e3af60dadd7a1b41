"""Adaptive clipping (AGC, AutoClip, ZClip) and `zero_nonfinite` against NumPy references.

Every transform here runs as the trainer runs it: state in `tf.Variable`s, `update` inside a
`tf.function`, new state assigned back (`Compiled`). The references are NumPy transcriptions of
the papers' code: NFNets' `unitwise_norm`/`my_clip`, AutoClip's append-then-`np.percentile`
(with a bounded history), and the ZClip authors' `ZClip.step` in "zscore" mode.
"""

from collections import deque

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.gradients import global_norm
from hvdclip.transforms.adaptive import ZClipState
from hvdclip.transforms.base import apply_transform
from support import make_data, make_mlp

STEPS = 60
# Step -> factor on the gradient: a spike inside ZClip's warm-up (step 3), two in a row, one late.
SPIKES = {3: 20.0, 30: 30.0, 31: 30.0, 47: 50.0}
SHAPES = [(4, 3), (3,), (2,), (5, 2), (2, 2, 3, 4), (3, 2, 2)]  # kernel, bias, unused, embedding, HWIO, multi-head


def to_dense(grad):
    return None if grad is None else tf.convert_to_tensor(grad).numpy()


def sparse_rows(rows, indices=(1, 3, 1, 0), dense_shape=(5, 2)):
    # Row 1 twice, as after Horovod allgathers two ranks' embedding gradients.
    return tf.IndexedSlices(tf.constant(rows, tf.float32), tf.constant(indices), tf.constant(dense_shape))


def gradient_sequence(steps=STEPS, seed=0):
    """Gradients aligned with SHAPES (the third is None), about 2 per element, with SPIKES."""
    rng = np.random.default_rng(seed)
    sequence = []
    for step in range(steps):
        size = 2.0 * rng.lognormal(0.0, 0.3) * SPIKES.get(step, 1.0)
        draw = lambda shape: (rng.normal(size=shape) * size).astype("float32")  # noqa: E731
        sequence.append(
            [tf.constant(draw((4, 3))), tf.constant(draw((3,))), None, sparse_rows(draw((4, 2))),
             tf.constant(draw((2, 2, 3, 4))), tf.constant(draw((3, 2, 2)))]
        )
    return sequence


def np_global_norm(arrays):
    return float(np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays if a is not None)))


class Compiled:
    """A transform as the trainer runs it: state in tf.Variables, update in a tf.function."""

    def __init__(self, transform, variables=()):
        self.transform = transform
        self.variables = list(variables)
        self.state = tf.nest.map_structure(lambda t: tf.Variable(t, trainable=False), transform.init(self.variables))
        self._step = tf.function(self._update)

    def _update(self, grads):
        out, new_state, _ = apply_transform(self.transform, grads, self.state, self.variables)
        tf.nest.map_structure(lambda var, value: var.assign(value), self.state, new_state)
        return out

    def __call__(self, grads):
        return self._step(grads)

    def numpy_state(self):
        return tf.nest.map_structure(lambda var: var.numpy(), self.state)


# ----------------------------------------------------------------------------- references


def np_unitwise_norm(x):
    """NFNets' reference `unitwise_norm` (deepmind-research/nfnets), in NumPy."""
    if np.squeeze(x).ndim <= 1:
        return np.sqrt(np.sum(x**2))
    if x.ndim in (2, 3):
        return np.sqrt(np.sum(x**2, axis=0, keepdims=True))
    if x.ndim == 4:
        return np.sqrt(np.sum(x**2, axis=(0, 1, 2), keepdims=True))
    raise ValueError(x.shape)


def np_agc(grad, param, clipping, eps):
    """NFNets' reference AGC for one tensor: `my_clip` with max_norm = clipping * max(|w|, eps)."""
    grad, param = np.asarray(grad, np.float64), np.asarray(param, np.float64)
    g_norm = np_unitwise_norm(grad)
    max_norm = clipping * np.maximum(np_unitwise_norm(param), eps)
    return np.where(g_norm < max_norm, grad, grad * (max_norm / np.maximum(g_norm, 1e-6)))


def torch_style_clip(arrays, norm, max_norm):
    """torch.nn.utils.clip_grad_norm_, which both papers' code calls: coefficient max_norm / (norm + 1e-6)."""
    coefficient = min(1.0, max_norm / (norm + 1e-6))
    return [None if a is None else np.asarray(a, np.float64) * coefficient for a in arrays]


class NumpyAutoClip:
    """The AutoClip paper's code (append the norm, then np.percentile), history bounded."""

    def __init__(self, percentile, history):
        self.percentile = percentile
        self.history = deque(maxlen=history)

    def step(self, arrays):
        norm = np_global_norm(arrays)
        self.history.append(norm)
        threshold = float(np.percentile(list(self.history), self.percentile))
        return torch_style_clip(arrays, norm, threshold), threshold


class NumpyZClip:
    """bluorion-com/ZClip `ZClip.step`, mode="zscore", clip_option="adaptive_scaling", no max_grad_norm."""

    def __init__(self, alpha, z_thresh, warmup_steps, eps=1e-6):
        self.alpha, self.z_thresh, self.warmup_steps, self.eps = alpha, z_thresh, warmup_steps, eps
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def step(self, arrays):
        norm = np_global_norm(arrays)
        if not self.initialized:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized, self.buffer = True, []
            return [None if a is None else np.asarray(a, np.float64) for a in arrays], None
        std = self.var**0.5
        z = (norm - self.mean) / (std + self.eps)
        clip_val = None
        if z > self.z_thresh:
            eta = z / self.z_thresh
            clip_val = self.mean + (self.z_thresh * std) / eta
        out = torch_style_clip(arrays, norm, clip_val if clip_val is not None else norm)
        effective = clip_val if clip_val is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        return out, clip_val


def assert_grads_close(got, want, rtol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(to_dense(g), w, rtol=rtol, atol=1e-6)


# ------------------------------------------------------------------------------------ AGC


def agc_variables(seed=1, scale=3.0):
    rng = np.random.default_rng(seed)
    return [tf.Variable((rng.normal(size=shape) * scale).astype("float32"), name=f"w{i}") for i, shape in enumerate(SHAPES)]


def test_agc_matches_the_nfnets_reference_step_by_step():
    variables = agc_variables()
    clipping, eps = 0.5, 1e-3
    agc = Compiled(hvdclip.adaptive_grad_clip(clipping, eps), variables)
    clipped_units = kept_units = 0
    for grads in gradient_sequence():
        dense = [to_dense(g) for g in grads]
        want = [None if d is None else np_agc(d, v.numpy(), clipping, eps) for d, v in zip(dense, variables)]
        got = agc(grads)
        assert_grads_close(got, want)
        assert isinstance(got[3], tf.IndexedSlices)
        for d, w in zip(dense, want):
            if d is not None:
                changed = np.any(~np.isclose(w, d), axis=0) if d.ndim > 1 else np.any(~np.isclose(w, d))
                clipped_units += int(np.sum(changed))
                kept_units += int(np.sum(~changed))
    assert clipped_units > 100 and kept_units > 100, (clipped_units, kept_units)


UNIT_AXES = {(7,): None, (): None, (1, 6): None, (6, 1): None, (5, 3): (0,), (3, 4, 2): (0,),
             (3, 3, 2, 4): (0, 1, 2), (2, 2, 2, 3, 4): (0, 1, 2, 3)}  # fmt: skip


@pytest.mark.parametrize("shape", list(UNIT_AXES))
def test_agc_bounds_every_units_ratio_and_clipping_twice_changes_nothing(shape):
    rng = np.random.default_rng(len(shape))
    clipping, eps = 0.05, 1e-3
    weight = tf.Variable((rng.normal(size=shape)).astype("float32"))
    grad = tf.constant((rng.normal(size=shape) * 10).astype("float32"))
    agc = hvdclip.adaptive_grad_clip(clipping, eps)
    once = apply_transform(agc, [grad], (), [weight]).grads
    twice = apply_transform(agc, once, (), [weight]).grads
    axes = UNIT_AXES[shape]
    unit = lambda x: np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=axes))  # noqa: E731
    ratio = unit(once[0]) / np.maximum(unit(weight.numpy()), eps)
    assert np.all(ratio <= clipping * (1 + 1e-5)), ratio
    assert np.all(ratio >= clipping * (1 - 1e-5)), "every unit of a 10x gradient should be clipped to the bound"
    np.testing.assert_allclose(twice[0].numpy(), once[0].numpy(), rtol=1e-5)


def test_agc_on_repeated_sparse_rows_equals_agc_on_the_dense_gradient():
    table = tf.Variable(np.random.default_rng(3).normal(size=(5, 2)).astype("float32"))
    sparse = sparse_rows(np.random.default_rng(4).normal(size=(4, 2)) * 5)
    dense = tf.convert_to_tensor(sparse)
    agc = Compiled(hvdclip.adaptive_grad_clip(0.1), [table])
    from_sparse = agc([sparse])[0]
    from_dense = agc([dense])[0]
    assert isinstance(from_sparse, tf.IndexedSlices)
    assert sorted(from_sparse.indices.numpy().tolist()) == [0, 1, 3], "repeated rows are merged"
    np.testing.assert_allclose(to_dense(from_sparse), from_dense.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(from_dense.numpy(), np_agc(dense.numpy(), table.numpy(), 0.1, 1e-3), rtol=1e-5)


def test_agc_excludes_variables_by_keras_path_and_passes_none_through():
    inputs = keras.Input((4,))
    features = keras.layers.Dense(3, name="features")(inputs)
    logits = keras.layers.Dense(2, name="logits")(features)
    model = keras.Model(inputs, logits, name="net")
    variables = model.trainable_variables
    assert [v.path for v in variables] == ["features/kernel", "features/bias", "logits/kernel", "logits/bias"]
    grads = [tf.ones(v.shape) * 100.0 for v in variables]
    grads[1] = None
    out = Compiled(hvdclip.adaptive_grad_clip(0.01, exclude=("^logits/",)), variables)(grads)
    assert out[1] is None
    assert np.max(np.abs(out[0].numpy())) < 100.0, "features/kernel is clipped"
    for i in (2, 3):
        assert np.array_equal(out[i].numpy(), grads[i].numpy()), "excluded variables are left bit-identical"


def test_agc_needs_the_variables():
    with pytest.raises(ValueError, match=r"Received: 1 gradients, 0 variables"):
        apply_transform(hvdclip.adaptive_grad_clip(), [tf.ones(3)], (), [])


# ------------------------------------------------------------------------------- AutoClip


@pytest.mark.parametrize("percentile, history", [(10, 16), (62.5, 7), (100, 1000)])
def test_autoclip_matches_the_papers_code_step_by_step(percentile, history):
    autoclip = Compiled(hvdclip.autoclip(percentile, history))
    reference = NumpyAutoClip(percentile, history)
    clipped, norms_seen = 0, []
    for step, grads in enumerate(gradient_sequence()):
        dense = [to_dense(g) for g in grads]
        want, threshold = reference.step(dense)
        got = autoclip(grads)
        assert_grads_close(got, want)
        norm_after = float(global_norm(got))
        assert norm_after <= threshold * (1 + 1e-5), (step, norm_after, threshold)
        clipped += norm_after < np_global_norm(dense) * (1 - 1e-5)
        norms_seen.append(np_global_norm(dense))
        ring = np.zeros(history)
        for position, norm in enumerate(norms_seen):  # slot i % history holds the i-th norm
            ring[position % history] = norm
        state = autoclip.numpy_state()
        assert state.count == step + 1
        np.testing.assert_allclose(state.norms, ring, rtol=1e-5)
    if percentile == 100:
        assert clipped == 0
    else:
        assert clipped >= STEPS // 3, f"AutoClip clipped only {clipped} of {STEPS} steps"


def test_autoclip_leaves_an_unclipped_gradient_bit_identical():
    grads = gradient_sequence(steps=1)[0]
    out = Compiled(hvdclip.autoclip(100, 4))(grads)
    for g, o in zip(grads, out):
        assert (g is None and o is None) or np.array_equal(to_dense(g), to_dense(o))


def test_autoclip_threshold_of_zero_norms_gives_zeros_not_nan():
    autoclip = Compiled(hvdclip.autoclip(10, 4))
    autoclip([tf.zeros(3)])
    autoclip([tf.zeros(3)])
    out = autoclip([tf.ones(3)])  # the 10th percentile of [0, 0, sqrt(3)] is 0
    np.testing.assert_array_equal(out[0].numpy(), np.zeros(3))


# ---------------------------------------------------------------------------------- ZClip


@pytest.mark.parametrize("alpha, z_threshold, warmup_steps", [(0.97, 2.5, 25), (0.9, 1.5, 10), (0.5, 2.0, 1)])
def test_zclip_matches_the_reference_implementation_step_by_step(alpha, z_threshold, warmup_steps):
    zclip = Compiled(hvdclip.zclip(alpha, z_threshold, warmup_steps))
    reference = NumpyZClip(alpha, z_threshold, warmup_steps)
    spikes = []
    for step, grads in enumerate(gradient_sequence()):
        dense = [to_dense(g) for g in grads]
        before = (reference.mean, reference.var)
        want, clip_val = reference.step(dense)
        got = zclip(grads)
        assert_grads_close(got, want)
        if clip_val is None:
            for g, d in zip(got, dense):  # warm-up and non-spike steps: bit-identical
                assert (g is None and d is None) or np.array_equal(to_dense(g), d)
        else:
            spikes.append(step)
            # The reciprocal threshold lies below the spike boundary mean + z * std.
            assert float(global_norm(got)) <= before[0] + z_threshold * np.sqrt(before[1]) * (1 + 1e-5)
        state = zclip.numpy_state()
        assert state.count == step + 1
        if reference.initialized:
            np.testing.assert_allclose([state.mean, state.var], [reference.mean, reference.var], rtol=2e-5)
    assert spikes and all(step >= warmup_steps for step in spikes)
    assert {30, 47} <= set(spikes), f"the injected spikes should be clipped; clipped steps: {spikes}"
    if warmup_steps > 3:
        assert 3 not in spikes, "a spike during warm-up is collected, not clipped"


def test_zclip_spike_gets_the_reciprocal_threshold_and_feeds_it_to_the_ema():
    # The authors' test numbers: mean 1, std 0.5, z_thresh 2, norm 3 -> z = 4, threshold 1 + 1/2.
    zclip = Compiled(hvdclip.zclip(alpha=0.97, z_threshold=2.0, warmup_steps=5))
    for var, value in zip(zclip.state, ZClipState(1.0, 0.25, np.zeros(5, "float32"), 5)):
        var.assign(value)
    out = zclip([tf.constant([3.0, 0.0])])
    assert float(out[0][0]) == pytest.approx(1.5, rel=1e-5)
    state = zclip.numpy_state()
    mean = 0.97 * 1.0 + 0.03 * 1.5  # the clipped norm feeds the EMA, not 3.0
    assert state.mean == pytest.approx(mean, rel=1e-6)
    assert state.var == pytest.approx(0.97 * 0.25 + 0.03 * (1.5 - mean) ** 2, rel=1e-5)


# -------------------------------------------------------------------------- zero_nonfinite


def poisoned(grads, value):
    first = grads[0].numpy().copy()
    first[0, 0] = value
    return [tf.constant(first)] + grads[1:]


def test_zero_nonfinite_keeps_autoclip_history_clean():
    bad_steps = {5: np.nan, 6: np.inf, 20: -np.inf}
    wrapped = Compiled(hvdclip.zero_nonfinite(hvdclip.autoclip(25, 8)))
    reference = NumpyAutoClip(25, 8)  # sees only the finite steps
    for step, grads in enumerate(gradient_sequence(steps=30)):
        if step in bad_steps:
            out = wrapped(poisoned(grads, bad_steps[step]))
            assert out[2] is None
            assert isinstance(out[3], tf.IndexedSlices)
            for o in out:
                assert o is None or not np.any(to_dense(o)), "a non-finite gradient comes back as zeros"
        else:
            want, _ = reference.step([to_dense(g) for g in grads])
            assert_grads_close(wrapped(grads), want)
        state = wrapped.numpy_state()
        assert state.inner.count == step + 1 - sum(bad <= step for bad in bad_steps), "only finite steps are counted"
        assert np.all(np.isfinite(state.inner.norms))
        assert state.consecutive == (2 if step == 6 else 1 if step in (5, 20) else 0)
    assert state.skipped == 3


def test_zero_nonfinite_lets_a_nonfinite_gradient_through_after_max_consecutive_skips():
    wrapped = Compiled(hvdclip.zero_nonfinite(hvdclip.zclip(warmup_steps=2), max_consecutive_skips=2))
    nan = [tf.constant([np.nan, 1.0])]
    for _ in range(2):
        assert np.array_equal(wrapped(nan)[0].numpy(), [0.0, 0.0])
    assert wrapped.numpy_state().inner.count == 0
    out = wrapped(nan)  # the third in a row goes through
    state = wrapped.numpy_state()
    assert np.isnan(out[0].numpy()[0])
    assert (state.skipped, state.consecutive, state.inner.count) == (2, 3, 1)
    wrapped([tf.constant([1.0, 1.0])])
    state = wrapped.numpy_state()
    assert (state.skipped, state.consecutive, state.inner.count) == (2, 0, 2)


def test_zero_nonfinite_treats_an_overflowing_norm_as_nonfinite():
    wrapped = Compiled(hvdclip.zero_nonfinite(hvdclip.clip_by_global_norm(1.0)))
    out = wrapped([tf.constant([1e20, 1.0])])  # finite values, squared norm overflows float32 as in the trainer
    assert np.array_equal(out[0].numpy(), [0.0, 0.0])
    assert wrapped.numpy_state().skipped == 1


def test_zero_nonfinite_is_transparent_on_finite_gradients():
    grads = gradient_sequence(steps=1)[0]
    variables = agc_variables()
    plain = Compiled(hvdclip.adaptive_grad_clip(0.5), variables)(grads)
    wrapped = Compiled(hvdclip.zero_nonfinite(hvdclip.adaptive_grad_clip(0.5)), variables)(grads)
    for a, b in zip(plain, wrapped):
        assert (a is None and b is None) or np.array_equal(to_dense(a), to_dense(b))


# ----------------------------------------------------------------------- with the trainer


@pytest.mark.parametrize(
    "make_clip",
    [
        lambda model: hvdclip.adaptive_grad_clip(0.01, exclude=(f"/{model.layers[-1].name}/",)),
        lambda model: hvdclip.autoclip(10, history=4),
        lambda model: hvdclip.zclip(warmup_steps=3, z_threshold=0.5),
        lambda model: hvdclip.zero_nonfinite(hvdclip.autoclip(10, history=4)),
    ],
    ids=["agc", "autoclip", "zclip", "zero_nonfinite"],
)
def test_each_method_trains_in_the_trainer_with_state_in_variables(make_clip):
    model = make_mlp(seed=2)
    trainer = hvdclip.HvdClipTrainer(model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=make_clip(model))
    x, y = make_data(seed=0, n=8 * 8)
    metrics = [trainer.train_step(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(8)]
    state = tf.nest.flatten(trainer.clip_state)
    assert all(isinstance(v, tf.Variable) for v in state)
    counts = [int(v.numpy()) for v in state if v.dtype == tf.int64 and v.shape == ()]
    if counts:
        assert counts[0] == 8, "the step count in the clip state advanced once per step"
    # Not `clip_active` alone, which an ulp of difference between the trainer's two norms can set.
    assert any(m["clipped_grad_norm"] < m["grad_norm"] * (1 - 1e-4) for m in metrics), "the clip should engage"


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "factory, kwargs, error, message",
    [
        (hvdclip.autoclip, {"percentile": 0}, ValueError, r"`percentile` must be a number > 0 and <= 100\. Received: percentile=0$"),
        (hvdclip.autoclip, {"percentile": 100.5}, ValueError, r"`percentile` must be a number > 0 and <= 100\. Received: percentile=100\.5$"),
        (hvdclip.autoclip, {"percentile": "10"}, TypeError, r"`percentile` must be a number > 0 and <= 100\. Received: percentile='10'$"),
        (hvdclip.autoclip, {"history": 0}, ValueError, r"`history` must be an integer >= 1\. Received: history=0$"),
        (hvdclip.autoclip, {"history": 10.0}, TypeError, r"`history` must be an integer >= 1\. Received: history=10\.0$"),
        (hvdclip.zclip, {"alpha": 1.0}, ValueError, r"`alpha` must be a number > 0 and < 1\. Received: alpha=1\.0$"),
        (hvdclip.zclip, {"alpha": 0}, ValueError, r"`alpha` must be a number > 0 and < 1\. Received: alpha=0$"),
        (hvdclip.zclip, {"z_threshold": -1}, ValueError, r"`z_threshold` must be a number > 0\. Received: z_threshold=-1$"),
        (hvdclip.zclip, {"warmup_steps": 0}, ValueError, r"`warmup_steps` must be an integer >= 1\. Received: warmup_steps=0$"),
        (hvdclip.adaptive_grad_clip, {"clipping": 0}, ValueError, r"`clipping` must be a number > 0\. Received: clipping=0$"),
        (hvdclip.adaptive_grad_clip, {"eps": -1e-3}, ValueError, r"`eps` must be a number > 0\. Received: eps=-0\.001$"),
        (hvdclip.adaptive_grad_clip, {"exclude": "logits"}, TypeError,
         r"`exclude` must be a tuple or list of str \(regular expressions\)\. Received: exclude='logits'$"),
        (hvdclip.adaptive_grad_clip, {"exclude": ("logits", 3)}, TypeError, r"Received: exclude=\('logits', 3\)$"),
        (hvdclip.adaptive_grad_clip, {"exclude": ["dense_(1"]}, ValueError,
         r"`exclude` must be a tuple or list of str \(regular expressions\); exclude\[0\] is not one .*Received: exclude=\['dense_\(1'\]$"),
        (hvdclip.zero_nonfinite, {"inner": 1.0}, TypeError, r"`inner` must be a GradientTransform .*Received: inner=1\.0$"),
        (lambda **kw: hvdclip.zero_nonfinite(hvdclip.autoclip(), **kw), {"max_consecutive_skips": 0}, ValueError,
         r"`max_consecutive_skips` must be an integer >= 1\. Received: max_consecutive_skips=0$"),
    ],
)  # fmt: skip
def test_bad_arguments_are_rejected_with_their_name_and_value(factory, kwargs, error, message):
    with pytest.raises(error, match=message):
        factory(**kwargs)
