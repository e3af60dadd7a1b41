"""One rank of the elastic tests' job, or one phase of the reference that replays its commits and sizes.

    elastic_job.py elastic OUT DISCOVERY_FILE KILL_HOST KILL_STEP GROW_HOST MARKER
        An elastic `fit` (commit every COMMIT_EVERY steps). The rank on KILL_HOST kills itself with
        SIGKILL after global step KILL_STEP. Once the job has shrunk, rank 0 adds GROW_HOST:1 to
        DISCOVERY_FILE and slows its steps (bounded) until the job has grown back.
    elastic_job.py phase OUT CKPTS [RESTORE_PREFIX OLD_SIZE]
        The same `fit` without elasticity, checkpointing every COMMIT_EVERY steps into CKPTS; with
        RESTORE_PREFIX it first restores that checkpoint and rescales the learning rate from OLD_SIZE
        ranks to this job's size, as an elastic reset does.

Every rank writes OUT/steps.<host>.<pid> (one line per global step: step, size, rank, weight checksum)
and at the end OUT/end.<host>.json (size, rank, checksum, broadcast count, reset log); rank 0 writes
OUT/final.npz. MARKER only tags the command line.
"""

import json
import os
import signal
import socket
import sys
import time

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from support import checksum, make_data, make_mlp  # noqa: E402

import hvdclip  # noqa: E402
from hvdclip.trainer.elastic import rescale_learning_rate  # noqa: E402

BATCH, EXAMPLES, EPOCHS, COMMIT_EVERY = 8, 528, 3, 4  # 22 steps per epoch on 3 ranks, 33 on 2
GROW_WAIT_S = 120  # Rank 0's bound on slowing down while the job waits to grow back.


def trainer():
    # AutoClip keeps a history of gradient norms: clip state that must survive every reset. The
    # consistency guard's allgather must run at the same steps on every rank, a joining one too.
    return hvdclip.HvdClipTrainer(
        make_mlp(seed=3), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.autoclip(percentile=50, history=64), check_consistency_every=3,
    )  # fmt: skip


def dataset():
    x, y = make_data(seed=21, n=EXAMPLES)
    return tf.data.Dataset.from_tensor_slices((x, y))


class Record(hvdclip.Callback):
    """Writes each step's world size, rank and weight checksum: the test compares ranks step by step."""

    def __init__(self, out):
        self.path = os.path.join(out, f"steps.{socket.gethostname()}.{os.getpid()}")

    def on_step_end(self, step, logs):
        digest = checksum(self.trainer.model.trainable_variables).tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps([step, hvdclip.size(), hvdclip.rank(), digest]) + "\n")


class Kill(hvdclip.Callback):
    def __init__(self, host, step):
        self.host, self.step = host, step

    def on_step_end(self, step, logs):
        if step == self.step and socket.gethostname() == self.host:
            os.kill(os.getpid(), signal.SIGKILL)  # No goodbye: as if the host lost power.


class Grow(hvdclip.Callback):
    """Once the job has shrunk, rank 0 adds a host to discovery and slows down until the job grows."""

    def __init__(self, discovery, host):
        self.discovery, self.host = discovery, host
        self.initial_size, self.added_at = None, None

    def on_train_begin(self, logs=None):  # Also after each reset, in an elastic job.
        if self.initial_size is None:
            self.initial_size = hvdclip.size()

    def on_step_end(self, step, logs):
        if hvdclip.rank() != 0 or hvdclip.size() >= self.initial_size:
            return
        if self.added_at is None:
            with open(self.discovery, "a") as f:
                f.write(f"{self.host}:1\n")
            self.added_at = time.monotonic()
        if time.monotonic() - self.added_at < GROW_WAIT_S:
            time.sleep(1.0)  # Leave the driver time to discover the host and start its worker (a busy machine takes 20 s).


def finish(out, job, extra):
    state = job.engine.elastic_state
    record = {
        "host": socket.gethostname(), "size": hvdclip.size(), "rank": hvdclip.rank(),
        "checksum": checksum(job.model.trainable_variables).tolist(), "broadcasts": job.broadcast_count,
        "global_step": int(job.global_step.numpy()),
        "resets": [] if state is None else [list(entry) for entry in state.reset_log],
        "commits": None if state is None else state.commits, **extra,
    }  # fmt: skip
    with open(os.path.join(out, f"end.{socket.gethostname()}.{os.getpid()}.json"), "w") as f:
        json.dump(record, f)
    if hvdclip.rank() == 0:
        np.savez(os.path.join(out, "final.npz"), *[v.numpy() for v in job.model.trainable_variables])


def elastic(out, discovery, kill_host, kill_step, grow_host):
    keras.utils.set_random_seed(7)
    job = trainer()
    callbacks = [Record(out), Kill(kill_host, int(kill_step)), Grow(discovery, grow_host)]
    history = job.fit(
        dataset(), epochs=EPOCHS, batch_size=BATCH, shuffle_buffer=64, callbacks=callbacks, verbose=0,
        elastic=hvdclip.Elastic(commit_every=COMMIT_EVERY),
    )  # fmt: skip
    finish(out, job, {"epochs": history.epochs, "loss": history.history["loss"]})


def phase(out, checkpoints, restore=None, old_size=None):
    keras.utils.set_random_seed(7)
    job = trainer()
    if restore is not None:
        job.restore(restore)
        x, _ = make_data(seed=21, n=BATCH)
        job.engine.start(x)  # The one broadcast, then the reset's learning-rate rule on every rank.
        if int(old_size) != hvdclip.size():
            rescale_learning_rate(job.optimizer, int(old_size), hvdclip.size())
    saver = hvdclip.CheckpointSaver(checkpoints, every_n_steps=COMMIT_EVERY, max_to_keep=1000)
    history = job.fit(
        dataset(), epochs=EPOCHS, batch_size=BATCH, shuffle_buffer=64, callbacks=[Record(out), saver], verbose=0,
    )  # fmt: skip
    finish(out, job, {"epochs": history.epochs})


def main():
    mode, out = sys.argv[1], sys.argv[2]
    hvdclip.init()
    if mode == "elastic":
        elastic(out, *sys.argv[3:7])
    elif mode == "phase":
        phase(out, *sys.argv[3:6])
    else:
        raise SystemExit(f"elastic_job.py: unknown mode {mode!r}")


if __name__ == "__main__":
    main()
