"""Elastic Keras `fit` in `horovod.tensorflow.keras`'s idiom, on Keras 3: `import hvdclip.keras as hvd`.

Launched elastically with one slot listed; at global batch GROW_AT rank 0 lists a second one
(grow.py). `fit` runs inside `hvd.elastic.run` with Horovod's state callbacks; the gradient is
clipped by AutoClip, whose history of norms lives in the optimizer's variables. The new rank
starts from weights of its own and an empty history, and gets rank 0's weights, optimizer state
and clip history, and the epoch, from `KerasState`'s sync: without the history it would clip
differently and the ranks would drift apart. They end bit-identical.

Usage: elastic_keras.py HOSTS_FILE
"""

import sys

import keras
import numpy as np

import hvdclip
import hvdclip.keras as hvd

hvd.init()

from grow import grow_now  # noqa: E402
from harness import checksum, gathered, make_data, report  # noqa: E402

HOSTS_FILE = sys.argv[1]
COMBINED = 32  # Rows per step, over all ranks.
STEPS_PER_EPOCH = 6
EPOCHS = 3
GROW_AT = 4  # Global batches (over epochs) after which rank 0 lists the second slot.
x, y = make_data(seed=71, n=STEPS_PER_EPOCH * COMBINED)

keras.utils.set_random_seed(500 + hvd.rank())
model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
)
# Horovod: scale the learning rate by the number of ranks.
opt = hvd.DistributedOptimizer(keras.optimizers.Adam(0.005 * hvd.size()), clip=hvdclip.autoclip(percentile=50))
model.compile(loss="mse", optimizer=opt, jit_compile=False)
start = [v.numpy() for v in model.variables]

state = hvd.elastic.KerasState(model, batch=0, epoch=0, global_batches=0, first_start=start)
resets = []


def on_state_reset():
    # Keras 3 spelling of Horovod's `tf.keras.backend.set_value(optimizer.lr, ...)`.
    state.model.optimizer.learning_rate = 0.005 * hvd.size()
    resets.append(hvd.size())


state.register_reset_callbacks([on_state_reset])


class Grow(keras.callbacks.Callback):
    """The test's lever (not Horovod's): counts batches into the state and grows the job once."""

    def on_train_batch_end(self, batch, logs=None):
        state.global_batches += 1
        if state.global_batches == GROW_AT:
            grow_now(hvd, state, HOSTS_FILE)


callbacks = [
    hvd.elastic.UpdateEpochStateCallback(state),
    hvd.elastic.UpdateBatchStateCallback(state),
    Grow(),
    hvd.elastic.CommitStateCallback(state),
    hvd.callbacks.MetricAverageCallback(),
]


@hvd.elastic.run
def train(state):
    # This rank's rows of every combined batch, in the current world.
    part = COMBINED // hvd.size()
    mine = np.concatenate([np.arange(s + hvd.rank() * part, s + (hvd.rank() + 1) * part) for s in range(0, len(x), COMBINED)])
    return state.model.fit(
        x[mine], y[mine], batch_size=part, shuffle=False, epochs=EPOCHS - state.epoch, callbacks=callbacks, verbose=0
    )


history = train(state)
sums = gathered(hvd, checksum(model.variables + model.optimizer.variables))
report(
    "elastic_keras",
    hvd.rank(),
    size=hvd.size(),
    epoch=state.epoch,
    global_batches=state.global_batches,
    resets=resets,
    joined=max(float(np.max(np.abs(a - b))) for a, b in zip(start, state.first_start)) > 0,
    identical=bool((sums == sums[0]).all()),
    logged=sorted(history.history),
    optimizer_variables=len(model.optimizer.variables),
)
