"""One rank of the cluster tests' training jobs (or, with `reference`, the single process they must equal).

    job.py steps OUT MARKER       4 ranks, batch B each: 30 train_step calls on rows [4B*s + rank*B, ...)
    job.py reference OUT          1 process, the combined 4B batch, the same clipping, Adam: weights
    job.py fit OUT MARKER EPOCHS [--resume]   fit with a checkpoint per epoch (rank 0 saves, on its host)
    job.py hang OUT MARKER DOOR   train until killed (for the host-loss and partition tests), through
                                  DOOR: "trainer", "fit" (Keras fit) or "own loop" (a tf.function loop)

Rank 0 writes OUT/final.npz and OUT/checksums.npy (every rank's weight checksum, allgathered). Each rank
writes OUT/host.<rank> (its host name) when it starts training and OUT/step.<rank> as it goes. MARKER only
tags the command line so the test can find the job's processes on every host.
"""

import os
import socket
import sys
import time

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from support import allgather, checksum, make_data, make_mlp  # noqa: E402

import hvdclip  # noqa: E402
import hvdclip.keras  # noqa: E402

BATCH, STEPS, RANKS, MAX_NORM = 8, 30, 4, 1.0


def weights(model):
    return [v.numpy() for v in model.trainable_variables]


def save(out, model):
    np.savez(os.path.join(out, "final.npz"), *weights(model))


def reference(out):
    x, y = make_data(seed=11, n=STEPS * RANKS * BATCH)
    model, optimizer, loss_fn = make_mlp(seed=3), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError()
    for step in range(STEPS):
        rows = slice(step * RANKS * BATCH, (step + 1) * RANKS * BATCH)
        with tf.GradientTape() as tape:
            loss = loss_fn(y[rows], model(x[rows], training=True))
        grads, _ = tf.clip_by_global_norm(tape.gradient(loss, model.trainable_variables), MAX_NORM)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    save(out, model)


def trainer():
    return hvdclip.HvdClipTrainer(
        make_mlp(seed=3), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(MAX_NORM),
    )  # fmt: skip


def announce(out):
    with open(os.path.join(out, f"host.{hvdclip.rank()}"), "w") as f:
        f.write(socket.gethostname())


def finish(out, job):
    rows = allgather(checksum(job.model.trainable_variables))
    if hvdclip.rank() == 0:
        np.save(os.path.join(out, "checksums.npy"), rows)
        save(out, job.model)


def steps(out):
    assert hvdclip.size() == RANKS, hvdclip.size()
    x, y = make_data(seed=11, n=STEPS * RANKS * BATCH)
    job = trainer()
    announce(out)
    for step in range(STEPS):
        start = step * RANKS * BATCH + hvdclip.rank() * BATCH
        job.train_step(x[start : start + BATCH], y[start : start + BATCH])
    finish(out, job)


def fit(out, epochs, resume):
    x, y = make_data(seed=90, n=128)
    job = trainer()
    checkpoints = os.path.join(out, "ckpts")
    if resume:
        job.restore(checkpoints)
    announce(out)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    job.fit(dataset, epochs=epochs, callbacks=[hvdclip.CheckpointSaver(checkpoints)], verbose=0)
    finish(out, job)


def hang(out, door):
    x, y = make_data(seed=5, n=64)
    announce(out)
    progress = {"step": 0}

    def stepped():
        progress["step"] += 1
        with open(os.path.join(out, f"step.{hvdclip.rank()}"), "w") as f:
            f.write(f"{progress['step']} {time.time()!r}")
        time.sleep(0.05)

    if door == "trainer":
        job = trainer()
        while True:  # ended by the test: a lost host, a cut link, the watchdog
            job.train_step(x[:BATCH], y[:BATCH])
            stepped()
    batches = tf.data.Dataset.from_tensor_slices((x[:BATCH], y[:BATCH])).batch(BATCH).repeat()
    if door == "fit":
        model = make_mlp(seed=3)
        model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.Adam(1e-2)), loss="mse")
        hook = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: stepped())
        model.fit(batches, steps_per_epoch=10**9, verbose=0,
                  callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0), hook])  # fmt: skip
    elif door == "own loop":
        model = make_mlp(seed=3)
        clipper = hvdclip.Clipper(keras.optimizers.Adam(1e-2), hvdclip.clip_by_global_norm(MAX_NORM))
        clipper.broadcast_initial_state(model)

        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(yb, model(xb, training=True))
            tape = hvdclip.DistributedGradientTape(tape, clipper)
            return tape.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

        for xb, yb in batches:
            step(xb, yb)
            stepped()
    raise SystemExit(f"job.py: unknown door {door!r}")


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "reference":
        return reference(out)
    hvdclip.init()
    if mode == "steps":
        steps(out)
    elif mode == "fit":
        fit(out, int(sys.argv[4]), "--resume" in sys.argv)
    elif mode == "hang":
        hang(out, sys.argv[4] if len(sys.argv) > 4 else "trainer")
    else:
        raise SystemExit(f"job.py: unknown mode {mode!r}")


if __name__ == "__main__":
    main()
