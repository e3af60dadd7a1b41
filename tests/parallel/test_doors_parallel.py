"""The three doors on 2 ranks: your own loop (DistributedGradientTape), Keras `fit`
(keras.DistributedOptimizer) and HvdClipTrainer each equal one process on the combined batch
under global-norm clipping, with ranks bit-identical; Keras' own per-rank clipping does not."""

import csv

import horovod.tensorflow as hvd
import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
import hvdclip.keras
from support import allgather, checksum, make_clicks, make_data, make_embedding_model, make_mlp

BATCH = 16
STEPS = 12
MAX_NORM = 1.0


def max_abs_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def values(variables):
    return [v.numpy() for v in variables]


def rank_rows(step, rank):
    start = step * 2 * BATCH + rank * BATCH
    return slice(start, start + BATCH)


def reference(x, y, make_model, optimizer):
    """One process on the combined 2B batch: a plain tape, clip_by_global_norm, the optimizer."""
    model = make_model()
    for step in range(STEPS):
        rows = slice(step * 2 * BATCH, (step + 1) * 2 * BATCH)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[rows], model(x[rows], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(tf.clip_by_global_norm(grads, MAX_NORM)[0], model.trainable_variables))
    return values(model.trainable_variables) + values(optimizer.variables[1:])


@pytest.fixture(scope="module")
def data():
    return make_data(seed=21, n=STEPS * 2 * BATCH)


def own_loop(x, y, rank, make_model, optimizer):
    """The seed's loop, ported: three lines differ from Horovod's idiom."""
    model = make_model()
    clipper = hvdclip.Clipper(optimizer, hvdclip.clip_by_global_norm(MAX_NORM))
    clipper.broadcast_initial_state(model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(yb, model(xb, training=True))
        tape = hvdclip.DistributedGradientTape(tape, clipper)
        grads = tape.gradient(loss, model.trainable_variables)
        return tape.apply_gradients(zip(grads, model.trainable_variables))

    active = 0
    for step in range(STEPS):
        active += int(train_step(x[rank_rows(step, rank)], y[rank_rows(step, rank)])["clip_active"])
    return model, optimizer, clipper, active


def test_own_loop_door_equals_one_process_and_ranks_are_bit_identical(world, data):
    rank, _ = world
    x, y = data
    model, optimizer, clipper, active = own_loop(x, y, rank, lambda: make_mlp(seed=4), keras.optimizers.Adam(1e-2))
    expected = reference(x, y, lambda: make_mlp(seed=4, name="reference"), keras.optimizers.Adam(1e-2))
    error = max_abs_difference(values(model.trainable_variables) + values(optimizer.variables[1:]), expected)
    sums = allgather(checksum(list(model.variables) + list(optimizer.variables)))
    errors = allgather(np.array([error]))
    assert active >= STEPS * 0.8, f"clipping bit on {active}/{STEPS} steps; the comparison needs it to"
    assert (errors <= 1e-5).all(), f"own-loop door differs from one process on the combined batch: {errors.ravel()}"
    assert (sums == sums[0]).all(), "ranks hold different weights or optimizer state"
    assert clipper.broadcast_count == 1


def test_own_loop_door_with_sparse_gradients_keeps_ranks_identical(world):
    """Embedding gradients are allgathered under positional names; repeated rows are merged once."""
    rank, _ = world
    x, y = make_clicks(seed=2, n=STEPS * 2 * BATCH)
    model = make_embedding_model(seed=5)
    clipper = hvdclip.Clipper(keras.optimizers.Adam(1e-2), hvdclip.clip_by_global_norm(0.5))
    clipper.broadcast_initial_state(model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(yb - model(xb, training=True)))
        tape = hvdclip.DistributedGradientTape(tape, clipper)
        grads = tape.gradient(loss, model.trainable_variables)
        tape.apply_gradients(zip(grads, model.trainable_variables))
        return grads[0]

    for step in range(STEPS):
        first = train_step(x[rank_rows(step, rank)], y[rank_rows(step, rank)])
    sums = allgather(checksum(list(model.variables) + list(clipper.optimizer.variables)))
    assert isinstance(first, tf.IndexedSlices), "the embedding gradient should stay sparse"
    assert (sums == sums[0]).all(), "ranks drifted apart with sparse gradients"


def keras_fit(x, y, rank, optimizer, callbacks=(), epochs=1, **fit_kwargs):
    keras.utils.set_random_seed(7)
    model = make_mlp(seed=4)
    model.compile(
        optimizer=hvdclip.keras.DistributedOptimizer(optimizer, clip=hvdclip.clip_by_global_norm(MAX_NORM)),
        loss="mse",
        metrics=["mae"],
        jit_compile=False,
    )
    shard = np.concatenate([np.arange(rank_rows(step, rank).start, rank_rows(step, rank).stop) for step in range(STEPS)])
    history = model.fit(
        x[shard],
        y[shard],
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[
            hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0),
            hvdclip.keras.callbacks.MetricAverageCallback(),
            *callbacks,
        ],
        **fit_kwargs,
    )
    return model, history


def test_keras_fit_door_equals_one_process_and_keras_global_clipnorm_does_not(world, data):
    rank, _ = world
    x, y = data
    model, history = keras_fit(x, y, rank, keras.optimizers.Adam(1e-2))
    inner = model.optimizer.inner_optimizer
    expected = reference(x, y, lambda: make_mlp(seed=4, name="reference"), keras.optimizers.Adam(1e-2))
    error = max_abs_difference(values(model.trainable_variables) + values(inner.variables[1:]), expected)

    # Keras' own clipping in the same 2-rank job: each rank's optimizer clips the gradient it is
    # given, which is its local one; averaging after that is not clipping the global gradient.
    control = make_mlp(seed=4, name="control")
    control_optimizer = keras.optimizers.Adam(1e-2)
    for step in range(STEPS):
        rows = rank_rows(step, rank)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[rows], control(x[rows], training=True))
        local = tape.gradient(loss, [v.value for v in control.trainable_variables])
        # What Adam(global_clipnorm=MAX_NORM) does first to the gradient it is handed: here, the local one.
        local, _ = tf.clip_by_global_norm(local, MAX_NORM)
        averaged = [hvd.allreduce(g, op=hvd.Average, name=f"control_{step}_{i}") for i, g in enumerate(local)]
        control_optimizer.apply_gradients(zip(averaged, control.trainable_variables))
    control_error = max_abs_difference(values(control.trainable_variables), expected[: len(control.trainable_variables)])

    sums = allgather(checksum(list(model.variables) + list(model.optimizer.variables)))
    errors = allgather(np.array([error, control_error]))
    logs = allgather(np.array([history.history[name][0] for name in ("loss", "mae", "grad_norm", "clip_rate")]))
    assert (errors[:, 0] <= 1e-5).all(), f"fit door differs from one process on the combined batch: {errors[:, 0]}"
    assert (errors[:, 1] > 1e-3).all(), f"Keras' per-rank global_clipnorm unexpectedly matched: {errors[:, 1]}"
    assert (sums == sums[0]).all(), "ranks hold different weights or optimizer state"
    assert (logs == logs[0]).all(), f"epoch logs differ between ranks: {logs}"
    assert logs[0][3] >= 0.8 and logs[0][2] > MAX_NORM, f"clipping should bite: {logs[0]}"


def test_keras_fit_door_with_keras_callbacks_decides_the_same_on_every_rank(world, data, tmp_path):
    """ReduceLROnPlateau, EarlyStopping, CSVLogger (rank 0) and ModelCheckpoint (rank 0) as in plain Keras."""
    rank, _ = world
    x, y = data
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9),
        keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=1e9),
    ]
    if rank == 0:
        callbacks += [
            keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
            keras.callbacks.ModelCheckpoint(str(tmp_path / "model.keras")),
        ]
    model, history = keras_fit(x, y, rank, keras.optimizers.SGD(0.05), callbacks=callbacks, epochs=5)
    lr = float(model.optimizer.learning_rate.numpy())
    facts = allgather(np.array([len(history.history["loss"]), lr]))
    sums = allgather(checksum(list(model.variables)))
    assert (facts == facts[0]).all(), f"ranks decided differently (epochs run, learning rate): {facts}"
    assert facts[0][0] == 2, "EarlyStopping(patience=1) with an impossible min_delta stops after 2 epochs"
    assert facts[0][1] == pytest.approx(0.05 / 2), "ReduceLROnPlateau halves the rate once: epoch 1 improves on inf, epoch 2 cannot"
    assert (sums == sums[0]).all()
    if rank == 0:
        rows = list(csv.DictReader(open(tmp_path / "log.csv")))
        assert [int(row["epoch"]) for row in rows] == [0, 1] and "grad_norm" in rows[0] and "clip_rate" in rows[0]
        reloaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
        assert checksum(reloaded.variables).tolist() == checksum(model.variables).tolist()


def test_trainer_door_equals_the_own_loop_door_bit_for_bit(world, data):
    rank, _ = world
    x, y = data
    model, optimizer, _, _ = own_loop(x, y, rank, lambda: make_mlp(seed=4), keras.optimizers.Adam(1e-2))
    trainer = hvdclip.HvdClipTrainer(
        make_mlp(seed=4), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(MAX_NORM),
    )
    for step in range(STEPS):
        trainer.train_step(x[rank_rows(step, rank)], y[rank_rows(step, rank)])
    same = checksum(trainer.model.variables).tolist() == checksum(model.variables).tolist()
    flags = allgather(np.array([int(same)]))
    assert flags.all(), "HvdClipTrainer and the own-loop door run one core step, so they must agree exactly"


def test_the_start_up_broadcast_does_not_depend_on_keras_layer_numbering(world):
    """Rank 1 builds one more layer first, so Keras names its model's variables differently."""
    rank, _ = world
    if rank == 1:
        keras.layers.Dense(1)  # Takes the next auto-name: this rank's model gets other layer numbers.
    model = make_mlp(seed=10 + rank)  # Different weights too: the broadcast must make them equal.
    names = allgather(np.frombuffer(("|".join(v.path for v in model.variables)).encode().ljust(512)[:512], np.uint8))
    clipper = hvdclip.Clipper(keras.optimizers.SGD(0.1))
    clipper.broadcast_initial_state(model)
    sums = allgather(checksum(model.variables))
    if rank == 0:
        keras.layers.Dense(1)  # Numbering agrees again for the tests that follow (their own collectives use names).
    assert not (names == names[0]).all(), "the ranks' variable names should differ for this test to mean anything"
    assert (sums == sums[0]).all()
