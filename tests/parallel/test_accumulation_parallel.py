"""Gradient accumulation on 2 ranks, in every door: k=4 micro-batches of B on each rank equal one
process on the combined 4*2*B batch under global-norm clipping (<= 1e-5), ranks bit-identical; the
micro-steps communicate nothing; a checkpoint taken inside a window resumes bit for bit (the
trainer's CheckpointSaver, which keeps every rank's sums; the fit door with one BackupAndRestore
directory per rank)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
import hvdclip.keras
from support import allgather, checksum, make_data, make_mlp, tape_step
from training_support import InterruptAt, Interrupted

K, B, WINDOWS, MAX_NORM = 4, 8, 3, 0.5


@pytest.fixture(scope="module")
def data():
    return make_data(seed=31, n=K * 2 * B * WINDOWS)


def rows(rank: int, window: int, micro: int) -> slice:
    """Rank r's micro-batch m of window w: the combined window is rank 0's k batches, then rank 1's."""
    start = window * K * 2 * B + rank * K * B + micro * B
    return slice(start, start + B)


def local_batches(x, y, rank):
    order = [rows(rank, w, m) for w in range(WINDOWS) for m in range(K)]
    return np.concatenate([x[r] for r in order]), np.concatenate([y[r] for r in order])


def one_process(x, y):
    model, optimizer = make_mlp(seed=6), keras.optimizers.Adam(1e-2)
    for window in range(WINDOWS):
        batch = slice(window * K * 2 * B, (window + 1) * K * 2 * B)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[batch], model(x[batch], training=True))
        grads, _ = tf.clip_by_global_norm(tape.gradient(loss, model.trainable_variables), MAX_NORM)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return [v.numpy() for v in model.trainable_variables]


def trainer_door(x, y):
    trainer = hvdclip.HvdClipTrainer(
        make_mlp(seed=6), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(MAX_NORM), accumulation_steps=K,
    )  # fmt: skip
    for start in range(0, len(x), B):
        trainer.train_step(x[start : start + B], y[start : start + B])
    return trainer.model


def own_loop_door(x, y):
    model = make_mlp(seed=6)
    clipper = hvdclip.Clipper(keras.optimizers.Adam(1e-2), hvdclip.clip_by_global_norm(MAX_NORM), accumulation_steps=K)
    clipper.broadcast_initial_state(model)
    step = tape_step(model, clipper)
    for (xb, yb), has_next in hvdclip.Lockstep(tf.data.Dataset.from_tensor_slices((x, y)).batch(B), clipper):
        step(xb, yb, has_next)
    return model


def fit_door(x, y, model=None, epochs=1, callbacks=()):
    model = model or make_mlp(seed=6)
    model.compile(
        optimizer=hvdclip.keras.DistributedOptimizer(
            keras.optimizers.Adam(1e-2), backward_passes_per_step=K, average_aggregated_gradients=True,
            clip=hvdclip.clip_by_global_norm(MAX_NORM),
        ),
        loss="mse",
    )  # fmt: skip
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(B), epochs=epochs, verbose=0,
              callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0), *callbacks])  # fmt: skip
    return model


@pytest.mark.parametrize("door", [trainer_door, own_loop_door, fit_door], ids=["trainer", "own loop", "fit"])
def test_k_micro_batches_on_two_ranks_equal_one_process_on_the_combined_window(world, data, door):
    rank, _ = world
    x, y = data
    model = door(*local_batches(x, y, rank))
    error = max(float(np.max(np.abs(a - b))) for a, b in zip([v.numpy() for v in model.trainable_variables], one_process(x, y)))
    errors = allgather(np.array([error]))
    sums = allgather(checksum(model.trainable_variables))
    assert (errors <= 1e-5).all(), f"{door.__name__} differs from one process on the combined window: {errors.ravel()}"
    assert (sums == sums[0]).all(), "ranks hold different weights"


def test_micro_steps_run_no_collective(world):
    """The reduction (and so every Horovod op of the step) sits in the branch only a window's last call takes."""
    model = make_mlp(seed=1)
    clipper = hvdclip.Clipper(keras.optimizers.SGD(), accumulation_steps=K)
    clipper.broadcast_initial_state(model)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        return clipper.step(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    x, y = np.zeros((4, 8), "float32"), np.zeros((4, 1), "float32")
    graph = step.get_concrete_function(tf.constant(x), tf.constant(y)).graph.as_graph_def()
    top = [node.op for node in graph.node]
    functions = {f.signature.name: [n.op for n in f.node_def] for f in graph.library.function}
    with_collectives = [name for name, ops in functions.items() if any(op.startswith("Horovod") for op in ops)]
    assert not any(op.startswith("Horovod") for op in top), "a collective outside the window's branch"
    assert with_collectives and all("cond_true" in name or "true" in name.lower() for name in with_collectives), with_collectives


def test_a_trainer_checkpoint_inside_a_window_resumes_bit_for_bit_on_two_ranks(world, data, shared_dir):
    rank, _ = world
    x, y = local_batches(*data, rank)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))

    def make():
        return hvdclip.HvdClipTrainer(
            make_mlp(seed=6), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
            clip=hvdclip.clip_by_global_norm(MAX_NORM), accumulation_steps=K,
        )  # fmt: skip

    fit = dict(batch_size=B, shard=False, verbose=0, epochs=1)
    whole = make()
    whole.fit(dataset, **fit)
    first = make()
    with pytest.raises(Interrupted):  # Both ranks stop after step 6, once its checkpoint is written.
        first.fit(dataset, callbacks=[hvdclip.CheckpointSaver(shared_dir, every_n_steps=1), InterruptAt(6)], **fit)
    in_window = int(first.engine.clipper.accumulation.micro_step.numpy())
    resumed = make()
    resumed.restore(shared_dir)
    resumed.fit(dataset, **fit)
    sums = allgather(np.concatenate([checksum(resumed.model.variables), checksum(whole.model.variables), [in_window]]))
    assert (sums[:, -1] == 2).all(), "the checkpoint must be taken inside a window (micro-step 2 of 4)"
    assert (sums[:, :4] == sums[:, 4:8]).all(), "the resumed run must end with the uninterrupted run's weights"
    assert (sums == sums[0]).all()


def test_the_fit_door_resumes_bit_for_bit_from_per_rank_backups_inside_a_window(world, data, shared_dir):
    rank, _ = world
    x, y = local_batches(*data, rank)
    x, y = x[: 6 * B], y[: 6 * B]  # 6 batches an epoch, windows of 4: the epoch-end backup is mid-window.
    backup = os.path.join(shared_dir, f"backup-{rank}")  # The sums are each rank's own: one directory each.

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise RuntimeError("crash after epoch 1")

    whole = fit_door(x, y, epochs=2)
    try:
        fit_door(x, y, epochs=2, callbacks=[keras.callbacks.BackupAndRestore(backup), Crash()])
        crashed = False
    except RuntimeError:
        crashed = True
    resumed = fit_door(x, y, model=make_mlp(seed=8), epochs=2, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    sums = allgather(np.concatenate([checksum(resumed.variables), checksum(whole.variables), [int(crashed)]]))
    assert (sums[:, -1] == 1).all()
    assert (sums[:, :4] == sums[:, 4:8]).all(), "resuming from the backups must give the uninterrupted run's weights"
    assert (sums == sums[0]).all()
