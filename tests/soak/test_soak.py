"""1,000-step soak on 2 ranks with adaptive clipping: `make soak`.

Ranks must end bit-identical, and each rank's resident memory must stay flat once the step is
compiled. The growth is printed for the README either way.
"""

import os

import horovod.tensorflow as hvd
import keras
import numpy as np
import psutil
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.distributed import bridge as horovod_bridge
from support import allgather, checksum, make_data, make_mlp

STEPS = int(os.environ.get("HVDCLIP_SOAK_STEPS", "1000"))
WARMUP = 100
MAX_GROWTH_MB = 32.0


class MemoryProbe(hvdclip.Callback):
    """Records this process's resident memory after the warm-up step and at the end."""

    def __init__(self):
        self.rss = {}
        self.steps = 0

    def on_step_end(self, step, logs):
        self.steps += 1
        if self.steps in (WARMUP, STEPS):
            self.rss[self.steps] = psutil.Process().memory_info().rss / 2**20


@pytest.fixture(scope="module", autouse=True)
def world():
    hvdclip.init()
    if hvd.size() < 2:
        pytest.skip("soak: launch with 2 ranks (`make soak`)")


def test_a_thousand_steps_stay_bit_identical_with_flat_memory():
    rank = hvd.rank()
    x, y = make_data(seed=70 + rank, n=100 * 16)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = make_mlp(seed=13, hidden=64)
    clip = hvdclip.chain(hvdclip.adaptive_grad_clip(0.05), hvdclip.zclip())
    trainer = hvdclip.HvdClipTrainer(model, keras.optimizers.Adam(3e-3), keras.losses.MeanSquaredError(), clip=clip)
    probe = MemoryProbe()
    history = trainer.fit(dataset, epochs=STEPS // 100, callbacks=[probe], shard=False, verbose=0)

    state = horovod_bridge.as_tf_variables(model.variables) + horovod_bridge.as_tf_variables(trainer.optimizer.variables)
    sums = allgather(checksum(state + tf.nest.flatten(trainer.clip_state)))
    growth = probe.rss[STEPS] - probe.rss[WARMUP]
    growths = allgather(np.array([growth]))
    if rank == 0:
        print(
            f"\nsoak: {probe.steps} steps on {hvd.size()} ranks; resident memory growth from step {WARMUP} to "
            f"{STEPS}: " + ", ".join(f"rank {r} {g[0]:+.1f} MiB" for r, g in enumerate(growths))
            + f"; loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}"
        )
    assert probe.steps == STEPS
    assert (sums == sums[0]).all(), "ranks drifted apart during the soak"
    assert (growths < MAX_GROWTH_MB).all(), f"memory grew by {growths.ravel()} MiB over {STEPS - WARMUP} steps"
    assert history.history["loss"][-1] < history.history["loss"][0]
