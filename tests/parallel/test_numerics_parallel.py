"""2-rank numerics: sparse gradients, accumulation, a bad gradient on one rank only, compression."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.distributed import bridge as horovod_bridge
from support import allgather, checksum, make_clicks, make_data, make_embedding_model, make_mlp

MAX_NORM = 0.5


def weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def dense_reference(model, optimizer, batches):
    """One process on the combined batches, with every gradient made dense before clipping."""
    norms = []
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        clipped, norm = tf.clip_by_global_norm(grads, MAX_NORM)
        optimizer.apply_gradients(zip(clipped, model.trainable_variables))
        norms.append(float(norm))
    return norms


@pytest.mark.parametrize("sparse_as_dense", [False, True])
def test_sparse_gradients_match_the_dense_reference(world, sparse_as_dense):
    rank, size = world
    batch, steps = 8, 12
    x, y = make_clicks(seed=21, n=steps * size * batch)
    model = make_embedding_model(seed=4)
    trainer = hvdclip.HvdClipTrainer(
        model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(MAX_NORM), reduction=hvdclip.Reduction(sparse_as_dense=sparse_as_dense),
    )
    norms = []
    for step in range(steps):
        start = (step * size + rank) * batch
        norms.append(trainer.train_step(x[start : start + batch], y[start : start + batch])["grad_norm"])
    reference_model = make_embedding_model(seed=4, name="reference")
    combined = [(x[s * size * batch : (s + 1) * size * batch], y[s * size * batch : (s + 1) * size * batch]) for s in range(steps)]
    reference_norms = dense_reference(reference_model, keras.optimizers.Adam(1e-2), combined)
    sums = allgather(checksum(model.variables))
    error = allgather(np.array([max_difference(weights(model), weights(reference_model))]))

    assert (sums == sums[0]).all()
    np.testing.assert_allclose(norms, reference_norms, rtol=1e-5)
    assert sum(n > MAX_NORM for n in reference_norms) >= steps // 2, "the clip must bite for the comparison to mean anything"
    assert (error <= 1e-5).all(), error


def test_accumulation_on_two_ranks_equals_one_process_on_the_whole_window(world):
    rank, size = world
    k, batch, steps = 3, 8, 4
    x, y = make_data(seed=31, n=steps * k * size * batch)
    model = make_mlp(seed=6)
    trainer = hvdclip.HvdClipTrainer(
        model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(MAX_NORM), accumulation_steps=k,
    )
    for step in range(steps):
        for micro in range(k):
            # Window `step` holds k * size micro-batches; rank r takes micro-batches r, r + size, ...
            start = ((step * k + micro) * size + rank) * batch
            trainer.train_step(x[start : start + batch], y[start : start + batch])
    reference_model = make_mlp(seed=6, name="reference")
    window = k * size * batch
    dense_reference(reference_model, keras.optimizers.Adam(1e-2), [(x[s * window : (s + 1) * window], y[s * window : (s + 1) * window]) for s in range(steps)])
    sums = allgather(checksum(model.variables))
    error = allgather(np.array([max_difference(weights(model), weights(reference_model))]))
    assert (sums == sums[0]).all()
    assert int(trainer.optimizer.iterations.numpy()) == steps
    assert (error <= 1e-5).all(), error


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(world):
    rank, _ = world
    model = make_mlp(seed=8)
    trainer = hvdclip.HvdClipTrainer(model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0))
    x, y = make_data(seed=40 + rank, n=24)
    trainer.train_step(x[:8], y[:8])
    before = checksum(model.variables)
    bad = x[8:16].copy()
    if rank == 1:
        bad[3, 2] = np.nan
    skipped = trainer.train_step(bad, y[8:16])["skipped"]
    unchanged = np.array_equal(checksum(model.variables), before)
    resumed = trainer.train_step(x[16:], y[16:])["skipped"]
    rows = allgather(np.array([skipped, unchanged, resumed, int(trainer.skipped_steps.numpy())], dtype=np.int64))
    sums = allgather(checksum(model.variables))
    assert rows.tolist() == [[1, 1, 0, 1]] * len(rows)
    assert (sums == sums[0]).all()


def test_an_fp16_overflow_on_one_rank_is_skipped_everywhere(world):
    rank, _ = world
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_mlp(seed=8, name="mp")
        lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=2.0**8)
        trainer = hvdclip.HvdClipTrainer(model, lso, keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0))
        x, y = make_data(seed=50 + rank, n=16)
        trainer.train_step(x[:8], y[:8])
        before = checksum(model.variables)
        loud_y = y[8:].copy()
        if rank == 0:
            loud_y *= 6e4  # float16 tops out at 65504: this rank's scaled gradient overflows.
        skipped = trainer.train_step(x[8:], loud_y)["skipped"]
        unchanged = np.array_equal(checksum(model.variables), before)
        rows = allgather(np.array([skipped, unchanged, float(lso.dynamic_scale.numpy())]))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert rows.tolist() == [[1.0, 1.0, 2.0**7]] * len(rows)


def test_fp16_compression_stays_close_to_full_precision_and_identical_across_ranks(world):
    rank, _ = world
    x, y = make_data(seed=60 + rank, n=20 * 8)
    results = {}
    for compression in (None, "fp16"):
        model = make_mlp(seed=12, name=f"c_{compression}")
        trainer = hvdclip.HvdClipTrainer(
            model, keras.optimizers.SGD(0.02), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0), reduction=hvdclip.Reduction(compression=compression)
        )
        for step in range(20):
            trainer.train_step(x[step * 8 : (step + 1) * 8], y[step * 8 : (step + 1) * 8])
        results[compression] = weights(model)
        results[f"sum_{compression}"] = allgather(checksum(model.variables))
    error = max_difference(results[None], results["fp16"])
    errors = allgather(np.array([error]))
    assert (results["sum_fp16"] == results["sum_fp16"][0]).all()
    # fp16 keeps ~3 significant digits of each averaged gradient: updates drift by far less than 1e-2.
    assert (errors < 1e-2).all() and (errors > 0).all(), errors
