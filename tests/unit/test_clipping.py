"""The clipping math against NumPy references, on dense and sparse gradients."""

import numpy as np
import pytest
import tensorflow as tf

import keras

import hvdclip
from hvdclip.gradients import UniqueSlices, dedupe, global_norm, scale
from hvdclip.transforms.base import apply_transform
from support import make_clicks, make_embedding_model

RNG = np.random.default_rng(0)


def dense_list():
    return [tf.constant(RNG.normal(size=(4, 3)).astype("float32") * 5), tf.constant(RNG.normal(size=(3,)).astype("float32"))]


def sparse_grad():
    # Row 1 appears twice, as after Horovod's allgather of two ranks' embedding gradients.
    values = RNG.normal(size=(4, 2)).astype("float32") * 4
    return tf.IndexedSlices(tf.constant(values), tf.constant([1, 3, 1, 0]), tf.constant([5, 2]))


def to_dense(grad):
    return None if grad is None else tf.convert_to_tensor(grad).numpy()


def apply(transform, grads, variables=()):
    state = transform.init(list(variables))
    return apply_transform(transform, grads, state, list(variables)).grads


def np_global_norm(arrays):
    return np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays if a is not None))


def test_dedupe_sums_repeated_rows():
    grad = sparse_grad()
    merged = dedupe(grad)
    assert sorted(merged.indices.numpy().tolist()) == [0, 1, 3]
    np.testing.assert_allclose(to_dense(merged), to_dense(grad), rtol=1e-6)


def test_global_norm_of_sparse_equals_dense_norm():
    grad = sparse_grad()
    dense = to_dense(grad)
    assert float(global_norm([grad])) == pytest.approx(np_global_norm([dense]), rel=1e-6)
    # The naive norm of the rows with a repeated index is different: this is what dedupe fixes.
    naive = np.sqrt(np.sum(grad.values.numpy() ** 2))
    assert abs(naive - np_global_norm([dense])) > 1e-3


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_clip_by_global_norm_matches_numpy(max_norm):
    grads = dense_list() + [sparse_grad()]
    dense = [to_dense(g) for g in grads]
    norm = np_global_norm(dense)
    expected = [d * (max_norm / max(norm, max_norm)) for d in dense]
    out = apply(hvdclip.clip_by_global_norm(max_norm), grads)
    assert isinstance(out[-1], tf.IndexedSlices)
    for got, want in zip(out, expected):
        np.testing.assert_allclose(to_dense(got), want, rtol=1e-5, atol=1e-6)
    assert float(global_norm(out)) <= max_norm * (1 + 1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 2.0])
def test_clip_by_norm_clips_each_tensor_on_its_own(max_norm):
    grads = dense_list() + [sparse_grad()]
    out = apply(hvdclip.clip_by_norm(max_norm), grads)
    for got, grad in zip(out, grads):
        dense = to_dense(grad)
        norm = np_global_norm([dense])
        np.testing.assert_allclose(to_dense(got), dense * (max_norm / max(norm, max_norm)), rtol=1e-5, atol=1e-6)


def test_clip_by_value_clips_the_dense_gradient_of_sparse_rows():
    grad = sparse_grad()
    out = apply(hvdclip.clip_by_value(1.5), dense_list() + [grad])
    np.testing.assert_allclose(to_dense(out[-1]), np.clip(to_dense(grad), -1.5, 1.5), rtol=1e-6)
    for got, g in zip(out[:2], dense_list()):
        assert np.max(np.abs(to_dense(got))) <= 1.5


@pytest.mark.parametrize(
    "transform", [hvdclip.clip_by_value(1.0), hvdclip.clip_by_norm(1.0), hvdclip.clip_by_global_norm(1.0)]
)
def test_none_gradients_pass_through(transform):
    grads = [None] + dense_list() + [None]
    out = apply(transform, grads)
    assert out[0] is None and out[-1] is None
    assert all(g is not None for g in out[1:-1])


@pytest.mark.parametrize(
    "transform", [hvdclip.clip_by_value(0.7), hvdclip.clip_by_norm(0.7), hvdclip.clip_by_global_norm(0.7)]
)
def test_clipping_twice_changes_nothing(transform):
    once = apply(transform, dense_list() + [sparse_grad()])
    twice = apply(transform, once)
    for a, b in zip(once, twice):
        np.testing.assert_allclose(to_dense(a), to_dense(b), rtol=1e-6, atol=1e-7)


def test_inactive_global_norm_clip_is_bit_identical():
    grads = dense_list()
    out = apply(hvdclip.clip_by_global_norm(1e9), grads)
    for a, b in zip(grads, out):
        assert np.array_equal(a.numpy(), b.numpy())


def test_norm_after_clipping_is_bounded_on_random_inputs():
    for trial in range(20):
        rng = np.random.default_rng(trial)
        max_norm = float(rng.uniform(0.01, 10))
        grads = [tf.constant(rng.normal(size=(rng.integers(1, 9),)).astype("float32") * rng.uniform(0, 100)) for _ in range(3)]
        out = apply(hvdclip.clip_by_global_norm(max_norm), grads)
        assert float(global_norm(out)) <= max_norm * (1 + 1e-5)


@pytest.mark.parametrize("trial", range(10))
def test_global_norm_clip_properties_on_random_inputs(trial):
    """Norm after clipping <= max; clipping the output again changes nothing; under max, bit-identical."""
    rng = np.random.default_rng(100 + trial)
    max_norm = float(rng.uniform(0.01, 10))
    grads = [tf.constant(rng.normal(size=shape).astype("float32") * rng.uniform(0, 50)) for shape in [(3, 4), (5,), (1,)]]
    values = rng.normal(size=(4, 2)).astype("float32") * rng.uniform(0, 50)
    grads.append(tf.IndexedSlices(tf.constant(values), tf.constant(rng.integers(0, 3, size=4)), tf.constant([3, 2])))
    clip = hvdclip.clip_by_global_norm(max_norm)
    once = apply(clip, grads)
    twice = apply(clip, once)
    assert float(global_norm(once)) <= max_norm * (1 + 1e-5)
    for a, b in zip(once, twice):
        np.testing.assert_allclose(to_dense(b), to_dense(a), rtol=1e-5, atol=1e-7)
    if float(global_norm(grads)) <= max_norm:
        assert all(np.array_equal(to_dense(a), to_dense(b)) for a, b in zip(grads, once))


def test_chain_order_matters_as_documented():
    grads = [tf.constant([10.0, 0.1, -10.0])]
    value_then_norm = apply(hvdclip.chain(hvdclip.clip_by_value(0.5), hvdclip.clip_by_global_norm(1.0)), grads)
    norm_then_value = apply(hvdclip.chain(hvdclip.clip_by_global_norm(1.0), hvdclip.clip_by_value(0.5)), grads)
    # The numbers in chain's docstring.
    np.testing.assert_allclose(value_then_norm[0].numpy(), [0.5, 0.1, -0.5], rtol=1e-6)
    np.testing.assert_allclose(norm_then_value[0].numpy(), [0.5, 0.1 / np.sqrt(200.01), -0.5], rtol=1e-5)


@pytest.mark.parametrize(
    "factory, arg, name",
    [
        (hvdclip.clip_by_global_norm, 0, "max_norm"),
        (hvdclip.clip_by_global_norm, -1.0, "max_norm"),
        (hvdclip.clip_by_global_norm, float("nan"), "max_norm"),
        (hvdclip.clip_by_norm, -2, "max_norm"),
        (hvdclip.clip_by_value, 0.0, "clip_value"),
    ],
)
def test_out_of_range_thresholds_are_rejected(factory, arg, name):
    with pytest.raises(ValueError, match=rf"`{name}` must be a number > 0\. Received: {name}="):
        factory(arg)


@pytest.mark.parametrize(
    "factory, arg, name",
    [
        (hvdclip.clip_by_global_norm, "1.0", "max_norm"),
        (hvdclip.clip_by_norm, None, "max_norm"),
        (hvdclip.clip_by_value, True, "clip_value"),
    ],
)
def test_non_numeric_thresholds_are_rejected(factory, arg, name):
    with pytest.raises(TypeError, match=rf"`{name}` must be a number > 0\. Received: {name}={arg!r}"):
        factory(arg)


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match=r"Received: transforms\[1\]=1\.0"):
        hvdclip.chain(hvdclip.clip_by_norm(1.0), 1.0)


# ------------------------------------------------------------- the canonical (merged) sparse form


def test_dedupe_returns_the_canonical_form_and_keeps_it():
    merged = dedupe(sparse_grad())
    assert isinstance(merged, UniqueSlices) and isinstance(merged, tf.IndexedSlices)
    assert dedupe(merged) is merged, "a merged gradient has nothing left to merge"
    scaled = scale(merged, 0.5)
    assert isinstance(scaled, UniqueSlices), "scaling cannot create repeats, so it keeps the form"
    assert not isinstance(scale(sparse_grad(), 0.5), UniqueSlices), "an unmerged gradient stays unmerged"


def op_count(concrete_function, op_type):
    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node) + [node for function in graph_def.library.function for node in function.node_def]
    return sum(node.op == op_type for node in nodes)


@pytest.mark.parametrize(
    "clip",
    [hvdclip.clip_by_global_norm(1.0), hvdclip.clip_by_value(0.1), hvdclip.clip_by_norm(1.0), hvdclip.adaptive_grad_clip(0.01)],
    ids=["global_norm", "value", "norm", "agc"],
)
def test_the_step_merges_each_sparse_gradient_once(clip):
    """The trainer merges the allgathered rows once; the norm and every clip reuse that merge."""
    ids, clicks = make_clicks(seed=0, n=16)
    trainer = hvdclip.HvdClipTrainer(
        make_embedding_model(seed=0), keras.optimizers.Adam(1e-2), keras.losses.BinaryCrossentropy(), clip=clip
    )
    trainer.train_step(ids, clicks)
    step = trainer.engine._compiled.get_concrete_function(tf.constant(ids), tf.constant(clicks))
    assert op_count(step, "Unique") == 1


# ---------------------------------------------------------------------------------- the protocol


def halve():
    """A user's transform as the `GradientTransform` docstring shows it: no state, no report."""

    def update(grads, state, variables):
        del variables
        return hvdclip.TransformResult([None if g is None else scale(g, 0.5) for g in grads], state)

    return hvdclip.GradientTransform(lambda variables: (), update)


def test_a_custom_transform_without_a_report_runs_alone_and_in_a_chain():
    grads = [tf.constant([3.0, 4.0]), None]
    halved = apply_transform(halve(), grads, (), [])
    assert halved.report is None and halved.grads[1] is None
    np.testing.assert_array_equal(halved.grads[0].numpy(), [1.5, 2.0])

    clip = hvdclip.chain(halve(), hvdclip.clip_by_global_norm(1.0))
    state = clip.init([])
    assert state == ((), ())
    out, new_state, report = apply_transform(clip, grads, state, [])
    assert report is None, "a member without a report leaves the chain's output to be measured"
    assert new_state == ((), ())
    np.testing.assert_allclose(out[0].numpy(), [0.6, 0.8], rtol=1e-6)


def test_a_custom_transform_without_a_report_is_measured_in_the_trainer():
    ids, clicks = make_clicks(seed=0, n=8)
    trainer = hvdclip.HvdClipTrainer(
        make_embedding_model(seed=0), keras.optimizers.SGD(0.1), keras.losses.BinaryCrossentropy(),
        clip=hvdclip.chain(halve(), hvdclip.clip_by_global_norm(1e6)),
    )
    metrics = trainer.train_step(ids, clicks)
    assert metrics["clipped_grad_norm"] == pytest.approx(metrics["grad_norm"] / 2, rel=1e-5)
    assert metrics["clip_active"] is True


def test_chain_refuses_a_state_of_another_length():
    clip = hvdclip.chain(hvdclip.clip_by_value(1.0), hvdclip.autoclip(10, history=4), hvdclip.clip_by_global_norm(1.0))
    state = hvdclip.chain(hvdclip.clip_by_value(1.0), hvdclip.autoclip(10, history=4)).init([])
    with pytest.raises(ValueError, match=r"^`state` must have one entry per chained transform \(3\)\. Received: 2 entries; "
                       r"build the state with this chain's `init`$"):
        clip.update([tf.ones(2)], state, [])


def test_chain_refuses_a_state_that_is_not_a_tuple():
    with pytest.raises(TypeError, match=r"^`state` must be a tuple with one entry per chained transform \(1\), .*Received: state=None$"):
        hvdclip.chain(hvdclip.clip_by_value(1.0)).update([tf.ones(2)], None, [])


def test_an_optax_style_pair_from_update_is_refused_with_what_to_return():
    optax_style = hvdclip.GradientTransform(lambda variables: (), lambda grads, state, variables: (grads, state))
    message = (r"^`update` must return hvdclip\.TransformResult\(grads, state\), or TransformResult\(grads, state, report\) "
               r"with report=hvdclip\.ClipReport\(norm, active\)\. Received: a tuple of 2 items \(list, tuple\)$")
    with pytest.raises(TypeError, match=message):
        apply_transform(optax_style, [tf.ones(2)], (), [])
    with pytest.raises(TypeError, match=message):  # Inside a chain too: chain runs its members the same way.
        apply_transform(hvdclip.chain(hvdclip.clip_by_value(1.0), optax_style), [tf.ones(2)], ((), ()), [])


def test_an_update_that_drops_a_gradient_is_refused():
    first_only = hvdclip.GradientTransform(lambda variables: (), lambda grads, state, variables: hvdclip.TransformResult(grads[:1], state))
    with pytest.raises(ValueError, match=r"^`update` must return one gradient per input gradient .*Received: 1 gradients for 2$"):
        apply_transform(first_only, [tf.ones(2), None], (), [])


def test_transform_result_report_defaults_to_none():
    result = hvdclip.TransformResult([tf.ones(1)], ())
    assert result.report is None and result._fields == ("grads", "state", "report")
