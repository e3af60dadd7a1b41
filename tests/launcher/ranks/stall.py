"""A 2-rank training job in which rank 1 freezes (SIGSTOP) before step 6, so rank 0 waits in that
step's allreduce for a peer that never comes: only rank 0's watchdog can end it.

    stall.py MARKER [DOOR]     DOOR: "trainer" (default), "fit" (Keras fit) or "own loop"
"""

import os
import signal
import sys

import keras
import tensorflow as tf

import hvdclip
import hvdclip.keras

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from support import make_data, make_mlp, tape_step  # noqa: E402

hvdclip.init()
door = sys.argv[2] if len(sys.argv) > 2 else "trainer"
x, y = make_data(seed=4, n=16)


def freeze_before(step: int) -> None:
    if step == 6 and hvdclip.rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)


if door == "trainer":
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=2), keras.optimizers.SGD(1e-2), keras.losses.MeanSquaredError())
    for step in range(1, 100):
        freeze_before(step)
        trainer.train_step(x[:8], y[:8])
elif door == "fit":
    model = make_mlp(seed=2)
    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD(1e-2)), loss="mse")
    freeze = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: freeze_before(batch + 1))
    batches = tf.data.Dataset.from_tensor_slices((x[:8], y[:8])).batch(8).repeat()
    model.fit(batches, steps_per_epoch=100, verbose=0, callbacks=[freeze])
elif door == "own loop":
    model = make_mlp(seed=2)
    clipper = hvdclip.Clipper(keras.optimizers.SGD(1e-2))
    clipper.broadcast_initial_state(model)
    step_fn = tape_step(model, clipper)
    for step in range(1, 100):
        freeze_before(step)
        step_fn(x[:8], y[:8])
print("stall.py: the stalled step finished", flush=True)
