"""A 2-rank training job that checkpoints every 5 steps and, if told, SIGKILLs one rank mid-training.

    train_and_die.py OUT_DIR MARKER [--die-rank R --die-at-step S] [--resume]

Rank 0 writes OUT_DIR/final.npz (the final weights) when training completes. The dying rank
writes OUT_DIR/killed_at (a wall-clock time) just before it kills itself. MARKER only tags the
command line so the test can find leftover processes.
"""

import argparse
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import hvdclip

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from support import make_data, make_mlp  # noqa: E402


class DieAt(hvdclip.Callback):
    def __init__(self, rank: int, step: int, out_dir: str):
        self.rank, self.step, self.out_dir = rank, step, out_dir

    def on_step_end(self, step, logs):
        if step == self.step and hvdclip.rank() == self.rank:
            with open(os.path.join(self.out_dir, "killed_at"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("marker")
    parser.add_argument("--die-rank", type=int)
    parser.add_argument("--die-at-step", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    hvdclip.init()
    # 64 examples, sharded by fit: 4 steps of 8 per rank and epoch, 20 steps in all. Checkpoints land
    # at epoch ends (steps 4, 8, 12, ...) and every 5 steps, so a death at step 13 resumes from step 12.
    x, y = make_data(seed=90, n=64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    trainer = hvdclip.HvdClipTrainer(
        make_mlp(seed=21), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(0.5)
    )
    checkpoints = os.path.join(args.out_dir, "ckpts")
    if args.resume:
        trainer.restore(checkpoints)
    callbacks = [hvdclip.CheckpointSaver(checkpoints, every_n_steps=5)]
    if args.die_rank is not None:
        callbacks.append(DieAt(args.die_rank, args.die_at_step, args.out_dir))
    trainer.fit(dataset, epochs=5, callbacks=callbacks, verbose=0)
    if hvdclip.rank() == 0:
        np.savez(os.path.join(args.out_dir, "final.npz"), *[v.numpy() for v in trainer.model.trainable_variables])


if __name__ == "__main__":
    main()
