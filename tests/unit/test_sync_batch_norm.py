"""SyncBatchNormalization and sync_batch_norm in one process (size 1): the same as BatchNormalization,
serialisable, and `sync_batch_norm` keeps weights and replaces every BatchNormalization. The statistics
math (`global_moments`) runs here too: at size 1 its allreduce returns its input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.distributed.batch_statistics import global_moments


def randomise(model, seed=0):
    """Gives every variable (moving statistics included) distinct values, so a lost weight shows."""
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        variable.assign(rng.uniform(0.5, 1.5, size=variable.shape).astype(variable.dtype))


def conv_block(name):
    return keras.Sequential(
        [keras.Input((4, 4, 4)), keras.layers.Conv2D(4, 1), keras.layers.BatchNormalization(momentum=0.7), keras.layers.ReLU()],
        name=name,
    )


def nested_model():
    """Functional model with a BatchNorm at the top, in a nested Sequential and in a nested functional model."""
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-2, name="top_bn")(x)
    x = conv_block("block")(x)
    inner_in = keras.Input((4, 4, 4))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(center=False)(keras.layers.Conv2D(4, 1)(inner_in)), name="inner")
    x = inner(x)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs, name="nested")


def all_layers(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


# ------------------------------------------------------------------ the layer at size 1


@pytest.mark.parametrize("masked", [False, True])
def test_at_size_1_it_is_exactly_batch_normalization(masked):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(3.0, 2.0, size=(5, 7, 4)).astype("float32"))
    mask = tf.constant(rng.uniform(size=(5, 7)) > 0.3) if masked else None
    synced = hvdclip.SyncBatchNormalization(momentum=0.5)
    plain = keras.layers.BatchNormalization(momentum=0.5)
    results = []
    for layer in (synced, plain):
        layer.build(x.shape)
        layer.set_weights([np.linspace(0.5, 2.0, 4, dtype="float32")] * 4)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(out * tf.range(4, dtype=tf.float32))
        results.append([out, *tape.gradient(loss, [x, layer.gamma, layer.beta]), *layer.non_trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inference_uses_the_moving_statistics():
    layer = hvdclip.SyncBatchNormalization()
    layer.build((None, 3))
    layer.set_weights([np.ones(3), np.zeros(3), np.array([1.0, 2.0, 3.0]), np.array([4.0, 4.0, 4.0])])
    out = layer(tf.constant([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]), training=False)
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], atol=1e-3)


def test_under_mixed_float16_it_is_exactly_batch_normalization():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = tf.constant(np.random.default_rng(2).normal(8.0, 1.0, size=(6, 5)).astype("float16"))
        synced, plain = hvdclip.SyncBatchNormalization(), keras.layers.BatchNormalization()
        outs = [layer(x, training=True) for layer in (synced, plain)]
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert outs[0].dtype == tf.float16 and synced.moving_mean.dtype == "float32"
    np.testing.assert_array_equal(outs[0].numpy(), outs[1].numpy())
    np.testing.assert_array_equal(synced.moving_variance.numpy(), plain.moving_variance.numpy())


def test_in_a_compiled_step_it_is_exactly_batch_normalization():
    x = tf.constant(np.random.default_rng(3).normal(size=(4, 3, 3, 2)).astype("float32"))
    outs = []
    for layer in (hvdclip.SyncBatchNormalization(), keras.layers.BatchNormalization()):
        layer.build(x.shape)
        outs.append(tf.function(lambda: layer(x, training=True))().numpy())  # noqa: B023 (called at once)
    np.testing.assert_array_equal(outs[0], outs[1])


# ------------------------------------------------------------------ the statistics math


def test_global_moments_keep_the_variance_where_sums_of_squares_lose_it():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(64, 5, 3)) * [0.5, 1.0, 2.0] + [1000.0, -300.0, 0.0]).astype("float32")
    mean, variance = global_moments(tf.constant(x), axes=[0, 1])
    exact = x.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), exact.mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(variance.numpy(), exact.var(axis=(0, 1)), rtol=1e-5)
    # The one-pass formula in float32 on the same data: what the layer must not do.
    naive = np.mean(x * x, axis=(0, 1), dtype=np.float32) - np.mean(x, axis=(0, 1), dtype=np.float32) ** 2
    assert abs(naive[0] - exact.var(axis=(0, 1))[0]) > 1e-2 * exact.var(axis=(0, 1))[0]


def test_global_moments_with_weights_count_only_the_weighted_examples():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, 3)).astype("float32")
    keep = rng.uniform(size=(10, 1)) > 0.4
    mean, variance = global_moments(tf.constant(x), axes=[0], weights=tf.constant(keep))
    kept = x[keep[:, 0]].astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), kept.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(variance.numpy(), kept.var(axis=0), rtol=1e-5)


def test_global_moments_of_no_examples_are_zero_not_nan():
    mean, variance = global_moments(tf.zeros((0, 4)), axes=[0])
    assert mean.numpy().tolist() == [0.0] * 4 and variance.numpy().tolist() == [0.0] * 4


def test_global_moments_gradient_is_the_moments_gradient():
    x = tf.constant(np.random.default_rng(6).normal(2.0, 3.0, size=(12, 3)).astype("float32"))
    grads = []
    for moments in (lambda t: global_moments(t, axes=[0]), lambda t: tf.nn.moments(t, axes=[0])):
        with tf.GradientTape() as tape:
            tape.watch(x)
            mean, variance = moments(x)
            loss = tf.reduce_sum(mean * [1.0, 2.0, 3.0] + variance * [3.0, -1.0, 0.5])
        grads.append(tape.gradient(loss, x).numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ serialisation


def test_get_config_round_trips_and_drops_tf_distribute_synchronisation():
    layer = hvdclip.SyncBatchNormalization(axis=1, momentum=0.9, epsilon=1e-4, center=False, synchronized=True, name="s")
    config = layer.get_config()
    copy = hvdclip.SyncBatchNormalization.from_config(config)
    assert (copy.axis, copy.momentum, copy.epsilon, copy.center, copy.name) == (1, 0.9, 1e-4, False, "s")
    assert config["synchronized"] is False


@pytest.mark.parametrize("custom_objects", [None, {"SyncBatchNormalization": hvdclip.SyncBatchNormalization}])
def test_a_saved_model_loads_with_its_weights(tmp_path, custom_objects):
    model = hvdclip.sync_batch_norm(nested_model())
    randomise(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects=custom_objects)
    kinds = [type(layer) for layer in all_layers(loaded) if isinstance(layer, keras.layers.BatchNormalization)]
    assert kinds == [hvdclip.SyncBatchNormalization] * 3
    for a, b in zip(model.variables, loaded.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------------ sync_batch_norm


def test_sync_batch_norm_replaces_every_batch_norm_and_keeps_every_weight():
    model = nested_model()
    randomise(model, seed=8)
    synced = hvdclip.sync_batch_norm(model)
    batch_norms = [layer for layer in all_layers(synced) if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batch_norms) == 3 and all(isinstance(layer, hvdclip.SyncBatchNormalization) for layer in batch_norms)
    assert not any(isinstance(layer, hvdclip.SyncBatchNormalization) for layer in all_layers(model)), "the original changed"
    assert [v.path for v in synced.variables] == [v.path for v in model.variables]
    for a, b in zip(model.variables, synced.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    top = next(layer for layer in batch_norms if layer.name == "top_bn")
    assert top.epsilon == 1e-2
    x = np.random.default_rng(9).normal(size=(3, 6, 6, 3)).astype("float32")
    np.testing.assert_array_equal(model(x, training=False).numpy(), synced(x, training=False).numpy())


def test_sync_batch_norm_converts_a_sequential_model_and_leaves_sync_layers_alone():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), hvdclip.SyncBatchNormalization()])
    randomise(model)
    synced = hvdclip.sync_batch_norm(model)
    assert [type(layer) for layer in synced.layers[1:]] == [hvdclip.SyncBatchNormalization] * 2
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), synced.get_weights()))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.norm = keras.layers.BatchNormalization()

    def call(self, x):
        return self.norm(x)


class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x):
        return self.norm(x)


class MyNorm(keras.layers.BatchNormalization):
    pass


def test_sync_batch_norm_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model \(Keras 3\). Received: model=.*Dense"):
        hvdclip.sync_batch_norm(keras.layers.Dense(3))


def test_sync_batch_norm_refuses_a_subclassed_model_and_says_what_to_do():
    with pytest.raises(ValueError, match=r"subclassed keras.Model \(Subclassed\).*hvdclip.SyncBatchNormalization in place of.*Received: model="):
        hvdclip.sync_batch_norm(Subclassed())


def test_sync_batch_norm_refuses_batch_norm_it_cannot_reach_inside_a_custom_layer():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, Block(name="block")(inputs))
    with pytest.raises(ValueError, match=r"cannot reach: \['batch_normalization.*'\].*inside a custom layer"):
        hvdclip.sync_batch_norm(model)


def test_sync_batch_norm_refuses_a_subclass_of_batch_norm():
    model = keras.Sequential([keras.Input((3,)), MyNorm(name="mine")])
    with pytest.raises(ValueError, match=r"layer 'mine' of class MyNorm, a subclass of BatchNormalization"):
        hvdclip.sync_batch_norm(model)
