"""An elastic training loop of one's own in `horovod.tensorflow`'s idiom, on Keras 3: `import hvdclip.tensorflow as hvd`.

Launched elastically with one slot listed; at step GROW_AT rank 0 lists a second one (grow.py).
The new rank starts from its own random weights and gets rank 0's model and optimizer variables,
and the step counter, from the state's sync (Horovod's own `TensorFlowState` broadcasts when it
is made and never at a sync under TensorFlow 2). Every step averages over the same combined batch
whatever the world size (one rank takes all of it, two take half each), so the run equals one
process on that batch under global-norm clipping, and the ranks end bit-identical.

Usage: elastic_own_loop.py HOSTS_FILE
"""

import sys

import keras
import tensorflow as tf

import hvdclip
import hvdclip.tensorflow as hvd

hvd.init()

from grow import grow_now  # noqa: E402
from harness import checksum, gathered, make_data, max_abs_difference, report  # noqa: E402

HOSTS_FILE = sys.argv[1]
COMBINED = 32  # Rows per step, over all ranks.
STEPS = 16
GROW_AT = 5
MAX_NORM = 1.0
LR = 1e-2
x, y = make_data(seed=61, n=STEPS * COMBINED)
loss_fn = keras.losses.MeanSquaredError()


def rows(step: int) -> slice:
    """This rank's part of step `step`'s combined batch, in the current world."""
    part = COMBINED // hvd.size()
    start = step * COMBINED + hvd.rank() * part
    return slice(start, start + part)


def make_model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )


def averaged_and_clipped(tape: tf.GradientTape, loss, variables) -> list:
    # Horovod's idiom plus one argument: the gradient averaged over ranks, then clipped.
    return hvd.DistributedGradientTape(tape, clip=hvdclip.clip_by_global_norm(MAX_NORM)).gradient(loss, variables)


keras.utils.set_random_seed(400 + hvd.rank())  # A joining rank starts from weights of its own.
model = make_model()
opt = keras.optimizers.Adam(LR)
# Keras 3 creates the optimizer's variables when it is built; Horovod's example runs one step
# without the allreduce instead, before making the state.
opt.build(model.trainable_variables)
start = [v.numpy() for v in model.variables]


@tf.function
def training_step(images, labels):
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    grads = averaged_and_clipped(tape, loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss


@hvd.elastic.run
def train(state):
    while state.batch < STEPS:
        training_step(x[rows(state.batch)], y[rows(state.batch)])
        state.batch += 1
        state.commit()
        if state.batch == GROW_AT:
            grow_now(hvd, state, HOSTS_FILE)
    return state.batch


resets = []
state = hvd.elastic.TensorFlowState(model.variables + opt.variables, batch=0, first_start=start)
state.register_reset_callbacks([lambda: resets.append(hvd.size())])
finished_at = train(state)

# One process on the combined batch from where the job's rank 0 started (its first start, synced to all).
reference = make_model()
reference.set_weights(state.first_start)
reference_opt = keras.optimizers.Adam(LR)
for step in range(STEPS):
    combined = slice(step * COMBINED, (step + 1) * COMBINED)
    with tf.GradientTape() as tape:
        loss = loss_fn(y[combined], reference(x[combined], training=True))
    grads = tape.gradient(loss, reference.trainable_variables)
    reference_opt.apply_gradients(zip(tf.clip_by_global_norm(grads, MAX_NORM)[0], reference.trainable_variables))
error = max_abs_difference(
    [v.numpy() for v in model.variables + opt.variables], [v.numpy() for v in reference.variables + reference_opt.variables]
)
sums = gathered(hvd, checksum(model.variables + opt.variables))
report(
    "elastic_own_loop",
    hvd.rank(),
    size=hvd.size(),
    finished_at=finished_at,
    resets=resets,
    joined=max_abs_difference(start, state.first_start) > 0,
    error=error,
    identical=bool((sums == sums[0]).all()),
)
