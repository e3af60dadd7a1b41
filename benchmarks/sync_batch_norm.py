"""What SyncBatchNormalization costs: the same CNN with plain and with synchronised BatchNorm, side by side.

    make bench-syncbn        # = hvdclip-run -np 2 --gloo -- python -m benchmarks.sync_batch_norm

Both models train in the same processes with `HvdClipTrainer.fit` and global-norm clipping; their
timed windows alternate (plain, sync, plain, sync, ...) so that other load on the machine hits both
alike. Rank 0 prints the median step time of each and their ratio, and writes
benchmarks/results/sync_batch_norm.json. Not part of `make bench`, whose variants all run on every
benchmark model (MLPs, which have no BatchNorm).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import hvdclip

RESULTS = Path(__file__).resolve().parent / "results" / "sync_batch_norm.json"
NUM_CLASSES = 10


def build_cnn() -> keras.Model:
    """A small image classifier: three Conv2D + BatchNorm blocks, pooling, Dense on 16x16 images (0.057 M params)."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((16, 16, 3))]
    for filters, stride in ((32, 1), (64, 2), (64, 2)):
        layers += [
            keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(NUM_CLASSES)]
    return keras.Sequential(layers, name="bench_cnn")


def dataset(batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless batches of this rank's random images: 8 fixed batches, repeated."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, batch_size, 16, 16, 3), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, (8, batch_size), dtype=np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat()


def trainer_for(model: keras.Model) -> hvdclip.HvdClipTrainer:
    return hvdclip.HvdClipTrainer(
        model,
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip=hvdclip.clip_by_global_norm(1.0),
    )


def timed_window(trainer: hvdclip.HvdClipTrainer, data: tf.data.Dataset, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds per step over `steps` steps, the ranks starting together.

    CPU time (all threads of this process, mean over ranks) is less sensitive than wall time to
    other work on a shared machine, though it counts Horovod's busy waiting too.
    """
    hvd.allreduce(tf.constant(0.0), name="bench_syncbn_barrier")
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(data, epochs=1, steps_per_epoch=steps, shard=False, verbose=0)
    wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
    mean_cpu = hvd.allreduce(tf.constant(cpu, tf.float64), op=hvd.Average, name="bench_syncbn_cpu")
    return wall, float(mean_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="examples per rank per step")
    parser.add_argument("--steps", type=int, default=40, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=7, help="timed windows per model")
    args = parser.parse_args()

    hvdclip.init()
    data = dataset(args.batch_size, seed=hvd.rank())
    trainers = {
        "BatchNormalization": trainer_for(build_cnn()),
        "SyncBatchNormalization": trainer_for(hvdclip.sync_batch_norm(build_cnn())),
    }
    for trainer in trainers.values():
        timed_window(trainer, data, 5)  # Build, broadcast and trace outside the timing.
    times: dict[str, list[float]] = {name: [] for name in trainers}
    cpu_times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            wall, cpu = timed_window(trainer, data, args.steps)
            times[name].append(wall)
            cpu_times[name].append(cpu)

    if hvd.rank() != 0:
        return
    summary = {}
    for label, measured in (("wall", times), ("cpu", cpu_times)):
        for stat, reduce in (("median", statistics.median), ("min", min)):
            values = {name: reduce(v) for name, v in measured.items()}
            summary[f"{label}_{stat}_ms_per_step"] = {name: round(v * 1e3, 3) for name, v in values.items()}
            summary[f"{label}_{stat}_sync_over_plain"] = round(values["SyncBatchNormalization"] / values["BatchNormalization"], 4)
    result = {
        "ranks": hvd.size(),
        "batch_size_per_rank": args.batch_size,
        "steps_per_window": args.steps,
        "repeats": args.repeats,
        "wall_ms_per_step": {name: [round(v * 1e3, 3) for v in values] for name, values in times.items()},
        "cpu_ms_per_step": {name: [round(v * 1e3, 3) for v in values] for name, values in cpu_times.items()},
        **summary,
    }
    print(f"{hvd.size()} ranks, batch {args.batch_size} per rank, {args.repeats} windows of {args.steps} steps each:")
    print(f"  {'':24s} {'wall median':>12s} {'wall min':>9s} {'CPU median':>11s}   (ms/step)")
    for name in trainers:
        print(
            f"  {name:24s} {summary['wall_median_ms_per_step'][name]:12.2f} {summary['wall_min_ms_per_step'][name]:9.2f}"
            f" {summary['cpu_median_ms_per_step'][name]:11.2f}"
        )
    print(
        f"  Sync / plain: wall median {summary['wall_median_sync_over_plain']:.3f}, wall min "
        f"{summary['wall_min_sync_over_plain']:.3f}, CPU median {summary['cpu_median_sync_over_plain']:.3f}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
