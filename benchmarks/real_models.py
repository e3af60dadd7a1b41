"""What the real-model choices of `HvdClipTrainer.fit` cost, measured side by side in one run (2 ranks).

    horovodrun -np 2 --gloo python -m benchmarks.real_models        # or mpirun -np 2 ...

* has-data flag: `fit` on the small benchmark model, the same pipeline declared with its length
  (no flag) and with unknown length (each step carries the has-data flag), alternated A/B.
* BatchNorm averaging: one `average_local_statistics()` (12 BatchNorm layers) against one training
  step of that CNN; it runs before each checkpoint, validation, `save` and `evaluate`.
* sharding: reading an epoch of 8 TFRecord files on each rank, by file and by element.

Prints a Markdown table on rank 0 (median of the repeats; ratios are of medians).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import hvdclip
from benchmarks.models import MODELS
from hvdclip.trainer.data import InputPlan

REPEATS = 7
STEPS = 200
BATCH = 64


def small_dataset(rank: int, known: bool) -> tf.data.Dataset:
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((STEPS * BATCH, 128), dtype=np.float32)
    y = rng.integers(0, 10, STEPS * BATCH).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).filter(lambda x, y: True)  # Length now unknown.
    return data.apply(tf.data.experimental.assert_cardinality(STEPS)) if known else data


def time_fit(trainer: hvdclip.HvdClipTrainer, data: tf.data.Dataset) -> float:
    hvd.allreduce(tf.constant(0.0), name="bench_barrier")
    start = time.perf_counter()
    trainer.fit(data, epochs=1, shard=False, verbose=0)
    return (time.perf_counter() - start) / STEPS


def flag_overhead() -> tuple[float, float]:
    keras.utils.set_random_seed(0)
    trainer = hvdclip.HvdClipTrainer(
        MODELS["small"].build(), keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), clip=hvdclip.clip_by_global_norm(1.0),
    )
    known, unknown = small_dataset(hvd.rank(), True), small_dataset(hvd.rank(), False)
    time_fit(trainer, known), time_fit(trainer, unknown)  # Warm-up: trace both variants.
    a, b = [], []
    for _ in range(REPEATS):
        a.append(time_fit(trainer, known))
        b.append(time_fit(trainer, unknown))
    return statistics.median(a), statistics.median(b)


def _cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for _ in range(12):
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def averaging_cost() -> tuple[float, float]:
    keras.utils.set_random_seed(0)
    trainer = hvdclip.HvdClipTrainer(_cnn(), keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError())
    x = np.random.default_rng(hvd.rank()).standard_normal((32, 8, 8, 3)).astype("float32")
    y = x.mean(axis=(1, 2, 3))[:, None]
    trainer.train_step(x, y)
    trainer.engine.average_local_statistics()
    steps, averages = [], []
    for _ in range(REPEATS * 3):
        start = time.perf_counter()
        trainer.train_step(x, y)
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.engine.average_local_statistics()
        averages.append(time.perf_counter() - start)
    return statistics.median(steps), statistics.median(averages)


def sharding_cost(directory: str) -> tuple[float, float]:
    names = []
    for f in range(8):
        name = os.path.join(directory, f"part-{f}.tfrecord")
        if hvd.rank() == 0:
            with tf.io.TFRecordWriter(name) as writer:
                payload = np.random.default_rng(f).bytes(4096)
                for _ in range(2000):
                    writer.write(payload)
        names.append(name)
    hvd.allreduce(tf.constant(0.0), name="bench_files_written")

    def parsed() -> tf.data.Dataset:
        def parse(record):
            bytes_ = tf.io.decode_raw(record, tf.uint8)
            return tf.cast(bytes_[:8], tf.float32), tf.reduce_sum(tf.cast(bytes_, tf.float32))

        return tf.data.TFRecordDataset(names).map(parse)

    def read(shard: str) -> float:
        dataset = InputPlan(parsed(), hvd.rank(), hvd.size(), shard=shard).for_epoch()
        hvd.allreduce(tf.constant(0.0), name=f"bench_read_{shard}")
        start = time.perf_counter()
        for _ in dataset:
            pass
        return time.perf_counter() - start

    read("files"), read("elements")
    files, elements = [], []
    for _ in range(REPEATS):
        files.append(read("files"))
        elements.append(read("elements"))
    return statistics.median(files), statistics.median(elements)


def main() -> None:
    hvdclip.init()
    directory = tempfile.mkdtemp(prefix="hvdclip-bench-") if hvd.rank() == 0 else None
    directory = hvd.broadcast_object(directory, root_rank=0, name="bench_dir")
    known, unknown = flag_overhead()
    step, average = averaging_cost()
    files, elements = sharding_cost(directory)
    hvd.allreduce(tf.constant(0.0), name="bench_done")  # Every rank has finished reading before rank 0 deletes.
    if hvd.rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
        print(f"| measurement (2 ranks, {hvd.size()} processes, CPU) | A | B | B / A |")
        print("|---|---|---|---|")
        print(f"| small model, `fit` step: known length (A) vs unknown length with has-data flag (B) | "
              f"{known * 1e3:.3f} ms | {unknown * 1e3:.3f} ms | {unknown / known:.3f} |")
        print(f"| BN CNN (12 BatchNorm): one training step (A) vs one `average_local_statistics()` (B) | "
              f"{step * 1e3:.3f} ms | {average * 1e3:.3f} ms | {average / step:.3f} |")
        print(f"| reading an epoch of 8 TFRecord files (64 MB) per rank: by file (A) vs by element (B) | "
              f"{files * 1e3:.1f} ms | {elements * 1e3:.1f} ms | {elements / files:.2f} |")


if __name__ == "__main__":
    main()
