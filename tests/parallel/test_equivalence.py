"""2 ranks with batch B equal 1 process with batch 2B under the same clipping; clipping per rank
before averaging (the seed's pattern) does not."""

import horovod.tensorflow as hvd
import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from support import allgather, make_data, make_mlp

BATCH = 16
STEPS = 30
MAX_NORM = 1.0


def weights(model):
    return [v.numpy() for v in model.trainable_variables]


def max_abs_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def reference_single_process(x, y, clip):
    """One process, combined 2B batch: plain tape, `clip` on the full gradient, Adam."""
    model = make_mlp(seed=3, name="reference")
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.MeanSquaredError()
    for step in range(STEPS):
        rows = slice(step * 2 * BATCH, (step + 1) * 2 * BATCH)
        with tf.GradientTape() as tape:
            loss = loss_fn(y[rows], model(x[rows], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(clip(grads), model.trainable_variables))
    return weights(model)


def seed_pattern(x, y, rank):
    """Each rank clips its own gradient, then the gradients are averaged: the order hvdclip avoids."""
    model = make_mlp(seed=3, name="seed_pattern")
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.MeanSquaredError()
    for step in range(STEPS):
        start = step * 2 * BATCH + rank * BATCH
        with tf.GradientTape() as tape:
            loss = loss_fn(y[start : start + BATCH], model(x[start : start + BATCH], training=True))
        grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
        grads, _ = tf.clip_by_global_norm(grads, MAX_NORM)
        grads = [hvd.allreduce(g, op=hvd.Average) for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return weights(model)


@pytest.fixture(scope="module")
def data():
    return make_data(seed=11, n=STEPS * 2 * BATCH)  # The same combined data on every rank.


def test_two_ranks_equal_one_process_on_the_combined_batch(world, data):
    rank, size = world
    assert size == 2
    x, y = data
    model = make_mlp(seed=3)
    trainer = hvdclip.HvdClipTrainer(
        model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(MAX_NORM)
    )
    active = 0
    for step in range(STEPS):
        start = step * 2 * BATCH + rank * BATCH
        active += trainer.train_step(x[start : start + BATCH], y[start : start + BATCH])["clip_active"]

    reference = reference_single_process(x, y, lambda g: tf.clip_by_global_norm(g, MAX_NORM)[0])
    control = seed_pattern(x, y, rank)
    hvdclip_error = max_abs_difference(weights(model), reference)
    control_error = max_abs_difference(control, reference)
    errors = allgather(np.array([hvdclip_error, control_error]))

    assert active >= STEPS * 0.8, f"clipping was active on {active}/{STEPS} steps; the comparison needs it to bite"
    assert (errors[:, 0] <= 1e-5).all(), f"hvdclip differs from the single-process reference: {errors[:, 0]}"
    assert (errors[:, 1] > 1e-3).all(), f"clip-before-average unexpectedly matched the reference: {errors[:, 1]}"
