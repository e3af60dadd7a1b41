"""Keras `fit` in `horovod.tensorflow.keras`'s idiom, on Keras 3: `import hvdclip.keras as hvd`.

Two ranks, each starting from its own random weights. `fit` with Horovod's callbacks (broadcast,
metric average, learning-rate warmup then a step schedule, with SGD's momentum correction) and
the best-model checkpoint, under global-norm clipping: equals one process on the combined batch
that follows Horovod's schedule by its formulas. Then `load_model` of the best checkpoint, with
fp16 compression, and one more epoch: ranks bit-identical.

Usage: keras_fit.py OUT_DIR (a directory both ranks see).
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import hvdclip
import hvdclip.keras as hvd
import hvdclip.tensorflow as hvd_tf  # For the test's reference only: horovod.tensorflow.keras has no broadcast_object.

hvd.init()

from harness import checksum, gathered, make_data, max_abs_difference, report  # noqa: E402

OUT = sys.argv[1]
BATCH = 16
STEPS_PER_EPOCH = 4
EPOCHS = 4
WARMUP_EPOCHS = 2
MAX_NORM = 1.0
MOMENTUM = 0.9
r, n = hvd.rank(), hvd.size()
scaled_lr = 0.02 * n  # Horovod: scale the learning rate by the number of ranks.

x, y = make_data(seed=41, n=STEPS_PER_EPOCH * n * BATCH)
x_val, y_val = make_data(seed=42, n=n * BATCH)
y_val = -y_val  # Training makes this validation loss worse at some point: the best epoch is not the last.


def my_rows(total: int) -> np.ndarray:
    """This rank's rows: its BATCH-sized part of each combined batch of n * BATCH."""
    return np.concatenate([np.arange(s + r * BATCH, s + (r + 1) * BATCH) for s in range(0, total, n * BATCH)])


def make_model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )


class Recorder(keras.callbacks.Callback):
    """The rate each step ran with, and the weights at each epoch's end (the test's, not Horovod's)."""

    def __init__(self):
        super().__init__()
        self.rates, self.weights = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([v.numpy() for v in self.model.variables])


keras.utils.set_random_seed(300 + r)
model = make_model()
started_apart = len({tuple(row) for row in gathered(hvd, checksum(model.variables))}) == n
rank0_start = hvd_tf.broadcast_object([v.numpy() for v in model.variables], root_rank=0)  # For the reference only.

opt = keras.optimizers.SGD(scaled_lr, momentum=MOMENTUM)
opt = hvd.DistributedOptimizer(opt, clip=hvdclip.clip_by_global_norm(MAX_NORM))
model.compile(loss="mse", optimizer=opt, jit_compile=False)

recorder = Recorder()
callbacks = [
    hvd.callbacks.BroadcastGlobalVariablesCallback(0),
    hvd.callbacks.MetricAverageCallback(),
    hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=WARMUP_EPOCHS, verbose=1),
    hvd.callbacks.LearningRateScheduleCallback(initial_lr=scaled_lr, multiplier=0.5, start_epoch=WARMUP_EPOCHS),
    # On every rank, each with its own path: only rank 0's file may appear.
    hvd.callbacks.BestModelCheckpoint(monitor="val_loss", filepath=f"{OUT}/best-rank{r}.keras"),
    recorder,
]
rows, val_rows = my_rows(len(x)), my_rows(len(x_val))
history = model.fit(
    x[rows], y[rows], batch_size=BATCH, epochs=EPOCHS, shuffle=False, validation_data=(x_val[val_rows], y_val[val_rows]),
    callbacks=callbacks, verbose=0,
)
trained = gathered(hvd, checksum(model.variables + model.optimizer.variables))  # Also: rank 0's file is written.


def horovod_rate(epoch: int, batch: int) -> float:
    """Horovod's schedule by its formulas: the warmup's, then the step schedule's."""
    if epoch < WARMUP_EPOCHS:
        fractional = epoch + (batch + 1) / STEPS_PER_EPOCH
        return scaled_lr / n * (fractional * (n - 1) / WARMUP_EPOCHS + 1)
    return scaled_lr * 0.5 ** (epoch - WARMUP_EPOCHS)


def one_process(momentum_correction: bool) -> list:
    """One process on the combined batch, eagerly, at Horovod's rate for each step, with Horovod's
    momentum correction (the momentum times new/old rate for the step after a change) or without."""
    reference = make_model()
    reference.set_weights(rank0_start)
    reference_opt = keras.optimizers.SGD(scaled_lr, momentum=MOMENTUM)
    previous = scaled_lr
    for epoch in range(EPOCHS):
        for batch in range(STEPS_PER_EPOCH):
            rate = horovod_rate(epoch, batch)
            reference_opt.learning_rate = rate
            reference_opt.momentum = MOMENTUM * (rate / previous if momentum_correction else 1.0)
            combined = slice(batch * n * BATCH, (batch + 1) * n * BATCH)
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(y[combined], reference(x[combined], training=True))
            grads = tape.gradient(loss, reference.trainable_variables)
            reference_opt.apply_gradients(zip(tf.clip_by_global_norm(grads, MAX_NORM)[0], reference.trainable_variables))
            reference_opt.momentum = MOMENTUM
            previous = rate
    return [v.numpy() for v in reference.variables] + [v.numpy() for v in reference_opt.variables]


trained_values = [v.numpy() for v in model.variables] + [v.numpy() for v in model.optimizer.inner_optimizer.variables]
error = max_abs_difference(trained_values, one_process(momentum_correction=True))
uncorrected_error = max_abs_difference(trained_values, one_process(momentum_correction=False))
expected_rates = [horovod_rate(e, b) for e in range(EPOCHS) for b in range(STEPS_PER_EPOCH)]

# The best checkpoint (rank 0's file), loaded on every rank with fp16 gradient compression.
best_epoch = int(np.argmin(history.history["val_loss"]))
loaded = hvd.load_model(f"{OUT}/best-rank0.keras", compression=hvd.Compression.fp16)
loaded_is_best = max_abs_difference([v.numpy() for v in loaded.variables], recorder.weights[best_epoch]) == 0.0
loaded_iterations = int(loaded.optimizer.iterations.numpy())
loaded.fit(
    x[rows], y[rows], batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
    callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()],
)
resumed = gathered(hvd, checksum(loaded.variables + loaded.optimizer.variables))

# Horovod's accumulation, on a model that fit builds from its first batch (no keras.Input), with
# fp16 compression: 2 batches per step on each rank equal one process on the combined 2-batch window.
keras.utils.set_random_seed(500 + r)
built_by_fit = keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
built_by_fit.compile(
    loss="mse",
    optimizer=hvd.DistributedOptimizer(
        keras.optimizers.SGD(0.05), backward_passes_per_step=2, average_aggregated_gradients=True,
        compression=hvd.Compression.none, clip=hvdclip.clip_by_global_norm(MAX_NORM),
    ),
)  # fmt: skip
built_by_fit.fit(x[rows], y[rows], batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                 callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])  # fmt: skip


def one_process_windows(start: list) -> list:
    reference = keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    reference.build((None, 8))
    reference.set_weights(start)
    reference_opt = keras.optimizers.SGD(0.05)
    for window in range(STEPS_PER_EPOCH // 2):
        combined = slice(window * 2 * n * BATCH, (window + 1) * 2 * n * BATCH)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[combined], reference(x[combined], training=True))
        grads = tape.gradient(loss, reference.trainable_variables)
        reference_opt.apply_gradients(zip(tf.clip_by_global_norm(grads, MAX_NORM)[0], reference.trainable_variables))
    return [v.numpy() for v in reference.variables]


keras.utils.set_random_seed(500)  # Rank 0's seed: its initial weights, which the broadcast sent to every rank.
rank0_model = keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
rank0_model.build((None, 8))
accumulated_error = max_abs_difference([v.numpy() for v in built_by_fit.variables], one_process_windows(rank0_model.get_weights()))
accumulated = gathered(hvd, checksum(built_by_fit.variables))
accumulated_steps = int(built_by_fit.optimizer.iterations.numpy())

# Horovod's value collectives, answers known.
checks = {
    "allreduce": float(hvd.allreduce(r + 1.0, op=hvd.Sum)) == n * (n + 1) / 2,
    "allreduce_average": float(hvd.allreduce(r + 1.0)) == (n + 1) / 2,
    "allgather": np.asarray(hvd.allgather([r])).tolist() == list(range(n)),
    "broadcast": int(hvd.broadcast(r, root_rank=n - 1)) == n - 1,
    "reducescatter": np.asarray(hvd.reducescatter(np.ones((n, 1), np.float32) * (r + 1), op=hvd.Sum)).tolist()
    == [[n * (n + 1) / 2]],
    "queries": (hvd.is_initialized(), hvd.local_rank(), hvd.local_size(), hvd.cross_size(), hvd.cross_rank())
    == (True, r, n, 1, 0) and hvd.gloo_enabled() and hvd.global_process_set.size() == n,
}
try:
    hvd.broadcast_global_variables(0)
    checks["broadcast_global_variables_refuses"] = False
except RuntimeError as refusal:
    checks["broadcast_global_variables_refuses"] = "broadcast_variables" in str(refusal)

report(
    "keras_fit",
    r,
    started_apart=started_apart,
    error=error,
    uncorrected_error=uncorrected_error,
    trained_identical=bool((trained == trained[0]).all()),
    rate_error=max_abs_difference(recorder.rates, expected_rates),
    steps=len(recorder.rates),
    logged=sorted(history.history),
    lr_logged=history.history["lr"],
    clip_rate=history.history["clip_rate"],
    best_epoch=best_epoch,
    val_loss=history.history["val_loss"],
    loaded_is_best=loaded_is_best,
    loaded_iterations=loaded_iterations,
    loaded_optimizer=type(loaded.optimizer).__name__,
    resumed_identical=bool((resumed == resumed[0]).all()),
    accumulated_error=accumulated_error,
    accumulated_identical=bool((accumulated == accumulated[0]).all()),
    accumulated_steps=accumulated_steps,
    checks=checks,
)
