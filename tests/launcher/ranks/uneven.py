"""One rank of the uneven-data job: every door, on per-rank data of different or unknown lengths.

    uneven.py OUT     rank 0 holds 10 batches, rank 1 holds 6; each scenario trains 2 epochs

Scenarios: each door (the trainer, Keras fit, your own loop with Lockstep) with data of unknown
length (a generator) and of known but different lengths (arrays), and Keras fit with gradient
accumulation (3 batches per step) on unknown-length data. Each rank writes OUT/result.<rank>.json:
per scenario, the steps each epoch ran and a checksum of the final weights. A rank whose loop did
not end with the others' waits in the next allreduce until the watchdog (--step-timeout) ends it.
"""

import json
import os
import sys

import keras
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from support import checksum, make_data, make_mlp, tape_step  # noqa: E402

import hvdclip  # noqa: E402
import hvdclip.keras  # noqa: E402

B, EPOCHS = 4, 2


def batches_of(rank: int, known: bool) -> tf.data.Dataset:
    count = 10 if rank == 0 else 6
    x, y = make_data(seed=70 + rank, n=count * B)
    if known:
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(B)

    def gen():
        for i in range(count):
            yield x[i * B : (i + 1) * B], y[i * B : (i + 1) * B]

    spec = (tf.TensorSpec((None, 8), tf.float32), tf.TensorSpec((None, 1), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=spec)


def trainer_door(data):
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=9), keras.optimizers.SGD(0.05), keras.losses.MeanSquaredError())
    steps = []

    class Count(hvdclip.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = int(trainer.global_step.numpy())

        def on_epoch_end(self, epoch, logs):
            steps.append(int(trainer.global_step.numpy()) - self.start)

    trainer.fit(data, epochs=EPOCHS, shard=False, verbose=0, callbacks=[Count()])
    return trainer.model, steps


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_epoch_begin(self, epoch, logs=None):
        self.steps.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.steps[-1] += 1


def fit_door(data, backward_passes_per_step=1):
    model = make_mlp(seed=9)
    model.compile(
        optimizer=hvdclip.keras.DistributedOptimizer(
            keras.optimizers.SGD(0.05), backward_passes_per_step=backward_passes_per_step,
            average_aggregated_gradients=True,
        ),
        loss="mse",
    )  # fmt: skip
    count = CountBatches()
    model.fit(data, epochs=EPOCHS, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0), count])
    return model, count.steps


def own_loop_door(data):
    model = make_mlp(seed=9)
    clipper = hvdclip.Clipper(keras.optimizers.SGD(0.05), hvdclip.clip_by_global_norm(1.0))
    clipper.broadcast_initial_state(model)
    step = tape_step(model, clipper)
    steps = []
    for _ in range(EPOCHS):
        steps.append(0)
        for (x, y), has_next in hvdclip.Lockstep(data, clipper):
            step(x, y, has_next)
            steps[-1] += 1
    return model, steps


SCENARIOS = {
    "trainer, unknown": lambda rank: trainer_door(batches_of(rank, known=False)),
    "trainer, known": lambda rank: trainer_door(batches_of(rank, known=True)),
    "fit, unknown": lambda rank: fit_door(batches_of(rank, known=False)),
    "fit, known": lambda rank: fit_door(batches_of(rank, known=True)),
    "fit, unknown, accumulation 3": lambda rank: fit_door(batches_of(rank, known=False), backward_passes_per_step=3),
    "own loop, unknown": lambda rank: own_loop_door(batches_of(rank, known=False)),
    "own loop, known": lambda rank: own_loop_door(batches_of(rank, known=True)),
}


def main():
    out = sys.argv[1]
    hvdclip.init()
    rank = hvdclip.rank()
    results = {}
    for name, run in SCENARIOS.items():
        model, steps = run(rank)
        results[name] = {"steps": steps, "checksum": checksum(model.variables).tolist()}
        print(f"rank {rank}: {name}: steps per epoch {steps}", flush=True)
    with open(os.path.join(out, f"result.{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
