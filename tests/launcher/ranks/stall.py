"""A 2-rank training job in which rank 1 freezes (SIGSTOP) before step 6, so rank 0 waits in that
step's allreduce for a peer that never comes: only rank 0's watchdog can end it.

    stall.py MARKER
"""

import os
import signal
import sys

import keras

import hvdclip

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from support import make_data, make_mlp  # noqa: E402

hvdclip.init()
x, y = make_data(seed=4, n=16)
trainer = hvdclip.HvdClipTrainer(make_mlp(seed=2), keras.optimizers.SGD(1e-2), keras.losses.MeanSquaredError())
for step in range(1, 100):
    if step == 6 and hvdclip.rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    trainer.train_step(x[:8], y[:8])
print("stall.py: the stalled step finished", flush=True)
