"""SyncBatchNormalization on 2 ranks equals BatchNormalization in one process on the combined batch:
statistics (uneven batches too), gradients, and a clipped CNN training run; plain BatchNormalization
on 2 ranks (local statistics) does not."""

import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.distributed.batch_statistics import global_moments
from support import allgather, checksum

BATCH = 8
STEPS = 12
MAX_NORM = 0.05
UNEVEN = (3, 5)  # examples on rank 0 and rank 1


def make_cnn(seed: int, name: str = "cnn") -> keras.Model:
    """Conv2D -> BatchNorm -> Conv2D -> BatchNorm -> Dense, initial weights fixed by `seed`."""
    init = lambda offset: keras.initializers.GlorotUniform(seed=seed * 100 + offset)  # noqa: E731
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(8, 3, use_bias=False, kernel_initializer=init(1)),  # A bias before BatchNorm has a zero gradient.
            keras.layers.BatchNormalization(momentum=0.8),
            keras.layers.Activation("relu"),
            keras.layers.Conv2D(8, 3, use_bias=False, kernel_initializer=init(2)),
            keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-2),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(1, kernel_initializer=init(3)),
        ],
        name=name,
    )


def image_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose channels have different means and spreads, so statistics matter."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 6, 6, 3)) * [1.0, 2.0, 0.5] + [2.0, -1.0, 4.0]).astype("float32")
    y = (3.0 * np.sin(x[:, :2, :2, 0].sum(axis=(1, 2)))[:, None] + x[:, 0, 0, 1:2]).astype("float32")
    return x, y


def batch_norm_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def moving_statistics(model):
    return [v.numpy().copy() for layer in batch_norm_layers(model) for v in (layer.moving_mean, layer.moving_variance)]


def trainable(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def own_rows(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def reference_run(x, y):
    """One process, combined 2B batch, plain BatchNormalization: tape, clip the full gradient, Adam."""
    model = make_cnn(seed=5, name="reference")
    optimizer = keras.optimizers.Adam(1e-2)
    norms = []
    for step in range(STEPS):
        rows = slice(step * 2 * BATCH, (step + 1) * 2 * BATCH)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[rows], model(x[rows], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        clipped, norm = tf.clip_by_global_norm(grads, MAX_NORM)
        optimizer.apply_gradients(zip(clipped, model.trainable_variables))
        norms.append(float(norm))
    return model, norms


def hvdclip_run(model, x, y, rank):
    trainer = hvdclip.HvdClipTrainer(
        model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(MAX_NORM)
    )
    active = 0
    for step in range(STEPS):
        start = step * 2 * BATCH + rank * BATCH
        active += trainer.train_step(x[start : start + BATCH], y[start : start + BATCH])["clip_active"]
    return active


def test_cnn_on_two_ranks_equals_one_process_on_the_combined_batch(world):
    rank, size = world
    assert size == 2
    x, y = image_data(seed=17, n=STEPS * 2 * BATCH)  # The same combined data on every rank.

    synced = hvdclip.sync_batch_norm(make_cnn(seed=5))
    active = hvdclip_run(synced, x, y, rank)
    local = make_cnn(seed=5, name="local")  # The control: plain BatchNormalization, rank-local statistics.
    hvdclip_run(local, x, y, rank)
    reference, norms = reference_run(x, y)

    errors = allgather(
        np.array(
            [
                max_difference(trainable(synced), trainable(reference)),
                max_difference(moving_statistics(synced), moving_statistics(reference)),
                max_difference(trainable(local), trainable(reference)),
                max_difference(moving_statistics(local), moving_statistics(reference)),
            ]
        )
    )
    sums = allgather(checksum(synced.variables))
    local_statistics = allgather(checksum([v for layer in batch_norm_layers(local) for v in layer.non_trainable_variables]))

    assert all(isinstance(layer, hvdclip.SyncBatchNormalization) for layer in batch_norm_layers(synced))
    assert active == STEPS and min(norms) > MAX_NORM, f"the clip must bite on every step: active {active}, norms {norms}"
    assert (sums == sums[0]).all(), "ranks differ: weights or moving statistics are not bit-identical"
    assert (errors[:, 0] <= 1e-5).all(), f"weights differ from the one-process reference: {errors[:, 0]}"
    assert (errors[:, 1] <= 1e-5).all(), f"moving statistics differ from the one-process reference: {errors[:, 1]}"
    # Plain BatchNormalization trains differently and lets the ranks' statistics drift apart.
    assert (errors[:, 2] > 1e-3).all() and (errors[:, 3] > 1e-3).all(), errors[:, 2:]
    assert not (local_statistics == local_statistics[0]).all()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_uneven_batches_give_the_combined_batch_statistics_and_gradients(world, compiled):
    rank, _ = world
    x, _ = image_data(seed=23, n=sum(UNEVEN))
    cotangent = np.random.default_rng(3).normal(size=x.shape).astype("float32")
    rows = own_rows(rank, UNEVEN)
    if rank == 1:
        hvdclip.SyncBatchNormalization()  # Shifts Keras' layer numbering: the ranks name the next layer differently.
    gamma = keras.initializers.RandomUniform(0.5, 1.5, seed=7)  # The same on every rank, without a broadcast.
    layer = hvdclip.SyncBatchNormalization(momentum=0.0, gamma_initializer=gamma, beta_initializer="ones")
    if rank == 0:
        hvdclip.SyncBatchNormalization()  # Realigns the numbering for later tests.
    names = allgather(np.array([zlib.crc32(layer.name.encode())], dtype=np.int64))
    layer.build(x.shape)
    reference = keras.layers.BatchNormalization.from_config(layer.get_config())
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())

    def forward_and_gradients(bn, inputs, upstream):
        inputs = tf.convert_to_tensor(inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = bn(inputs, training=True)
            loss = tf.reduce_sum(out * upstream)  # A sum over examples: the ranks' losses add up to the whole.
        return out, tape.gradient(loss, [inputs, bn.gamma, bn.beta])

    step = tf.function(forward_and_gradients) if compiled else forward_and_gradients
    out, (dx, dgamma, dbeta) = step(layer, x[rows], cotangent[rows])
    far = x + np.float32(300.0)  # Means near 300, spreads 0.5-2: E[x^2] - E[x]^2 in float32 keeps hardly a digit.
    mean, variance = (t.numpy() for t in global_moments(tf.constant(far[rows]), axes=[0, 1, 2]))
    gathered_out = allgather(np.pad(out.numpy(), [(0, max(UNEVEN) - UNEVEN[rank])] + [(0, 0)] * 3))
    gathered_dx = allgather(np.pad(dx.numpy(), [(0, max(UNEVEN) - UNEVEN[rank])] + [(0, 0)] * 3))
    summed = allgather(np.concatenate([dgamma.numpy(), dbeta.numpy()])).sum(axis=0)
    statistics = allgather(np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()]))

    ref_out, (ref_dx, ref_dgamma, ref_dbeta) = forward_and_gradients(reference, x, cotangent)
    combined = x.astype(np.float64)
    true_mean, true_variance = combined.mean(axis=(0, 1, 2)), combined.var(axis=(0, 1, 2))
    everyone_out = np.concatenate([gathered_out[r, : UNEVEN[r]] for r in range(2)])
    everyone_dx = np.concatenate([gathered_dx[r, : UNEVEN[r]] for r in range(2)])

    assert names[0] != names[1], "the ranks' layer names should differ here"
    far = far.astype(np.float64)
    np.testing.assert_allclose(mean, far.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(variance, far.var(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(statistics[0], statistics[1], rtol=0, atol=0)  # momentum 0: the batch statistics
    np.testing.assert_allclose(statistics[0], np.concatenate([true_mean, true_variance]), rtol=1e-5)
    np.testing.assert_allclose(everyone_out, ref_out.numpy(), atol=1e-5)
    np.testing.assert_allclose(everyone_dx, ref_dx.numpy(), atol=1e-5)
    # gamma's and beta's gradients are sums over 8 x 36 positions: float32 rounding alone is ~1e-6 relative.
    np.testing.assert_allclose(summed, np.concatenate([ref_dgamma.numpy(), ref_dbeta.numpy()]), rtol=1e-5, atol=1e-5)


def test_a_rank_with_no_examples_takes_the_other_ranks_statistics(world):
    rank, _ = world
    x, _ = image_data(seed=29, n=4)
    mine = x if rank == 1 else x[:0]
    mean, variance = global_moments(tf.constant(mine), axes=[0, 1, 2])
    gathered = allgather(np.concatenate([mean.numpy(), variance.numpy()]))
    expected = np.concatenate([x.astype(np.float64).mean(axis=(0, 1, 2)), x.astype(np.float64).var(axis=(0, 1, 2))])
    np.testing.assert_allclose(gathered, [expected, expected], rtol=1e-5)


def test_mixed_float16_statistics_are_the_combined_batch_statistics_and_ranks_stay_identical(world):
    rank, _ = world
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = image_data(seed=31, n=sum(UNEVEN))
        rows = own_rows(rank, UNEVEN)
        layer = hvdclip.SyncBatchNormalization(momentum=0.0)
        out = layer(tf.constant(x[rows], tf.float16), training=True)
        statistics = allgather(np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()]))
        dtypes = (out.dtype, layer.moving_mean.dtype)

        model = hvdclip.sync_batch_norm(make_cnn(seed=9, name="mixed"))
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2), initial_scale=2.0**4)
        trainer = hvdclip.HvdClipTrainer(model, optimizer, keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(MAX_NORM))
        data_x, data_y = image_data(seed=37, n=4 * 2 * BATCH)
        reports = []
        for step in range(4):
            start = step * 2 * BATCH + rank * BATCH
            reports.append(trainer.train_step(data_x[start : start + BATCH], data_y[start : start + BATCH]))
        sums = allgather(checksum(model.variables))
        finite = all(np.isfinite(v).all() for v in moving_statistics(model))
    finally:
        keras.mixed_precision.set_global_policy(previous)

    # The layer computes in float32 what the float16 inputs hold.
    combined = x.astype(np.float16).astype(np.float64)
    expected = np.concatenate([combined.mean(axis=(0, 1, 2)), combined.var(axis=(0, 1, 2))])
    assert dtypes == (tf.float16, "float32")
    np.testing.assert_allclose(statistics, [expected, expected], rtol=1e-5)
    assert (sums == sums[0]).all(), "ranks differ after mixed-precision steps"
    assert finite and not any(report["skipped"] for report in reports), reports
