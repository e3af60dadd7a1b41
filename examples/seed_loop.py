"""The forum answer's Horovod loop (its Example 3), ported to hvdclip: door 1, your own loop.

    hvdclip-run -np 2 -- python examples/seed_loop.py

What changed against the forum's loop, and why:
  - no MultiWorkerMirroredStrategy: Horovod alone distributes (two mechanisms would each average);
  - `hvdclip.Clipper` holds the optimizer and the clip, made once outside the step;
  - `clipper.broadcast_initial_state(model)` once before the loop replaces the
    `hvd.broadcast_variables` that the forum calls inside every step;
  - `hvdclip.DistributedGradientTape(tape, clipper)` averages the gradient over ranks and then
    clips its *global* norm, instead of each rank clipping each tensor by its own norm;
  - `tape.apply_gradients` skips a NaN/Inf step on every rank;
  - `hvd.learning_rate_schedule` does not exist; the rate is a plain number here.
Every rank prints its final weights' checksum: they are equal because the clip ran after the
reduction, on the same numbers everywhere.
"""

import hashlib

import keras
import numpy as np
import tensorflow as tf

import hvdclip

hvdclip.init()
rank, size = hvdclip.rank(), hvdclip.size()

keras.utils.set_random_seed(0)  # The same initial weights and data on every rank.
model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
optimizer = keras.optimizers.Adam(learning_rate=0.01)


def loss_fn(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_true - y_pred))  # MSE loss


clipper = hvdclip.Clipper(optimizer, hvdclip.clip_by_global_norm(5.0))  # was: clip_by_norm(grad, 5.0) per tensor
clipper.broadcast_initial_state(model)  # was: hvd.broadcast_variables(model.variables) in every step


@tf.function
def distributed_train_step(x, y, has_next):
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = loss_fn(y, y_pred)
    tape = hvdclip.DistributedGradientTape(tape, clipper, has_data=has_next)  # was: no reduction at all
    gradients = tape.gradient(loss, model.trainable_variables)  # averaged over ranks, then clipped
    report = tape.apply_gradients(zip(gradients, model.trainable_variables))  # was: optimizer.apply_gradients
    return loss, report  # grad_norm, clip_active, skipped, ...


rng = np.random.default_rng(1)
x = rng.normal(size=(4096, 10)).astype("float32")
y = (x @ rng.normal(size=(10, 1)) * 20.0).astype("float32")  # Large targets: the clip bites early on.
shard = slice(rank, None, size)  # Each rank trains on its own examples.
dataset = tf.data.Dataset.from_tensor_slices((x[shard], y[shard])).batch(32, drop_remainder=True)

clipped = steps = 0
for epoch in range(3):
    for (xb, yb), has_next in hvdclip.Lockstep(dataset, clipper):  # every rank stops at the same step
        loss, metrics = distributed_train_step(xb, yb, has_next)
        clipped += int(metrics["clip_active"])
        steps += 1
    if rank == 0:
        print(f"epoch {epoch + 1}: loss {float(loss):.4f}, clipped {clipped} of {steps} steps so far", flush=True)

digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.variables)).hexdigest()[:16]
print(f"rank {rank}: weights {digest}", flush=True)
