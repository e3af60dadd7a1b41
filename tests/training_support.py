"""Helpers for the fit/checkpoint tests: a model with dropout, a stateful clip, an interruption."""

from __future__ import annotations

import random

import keras
import numpy as np
import tensorflow as tf

import hvdclip
from hvdclip.gradients import global_norm, map_values


def dropout_mlp(seed: int, in_dim: int = 8, hidden: int = 16, name: str = "dropout_mlp") -> keras.Model:
    """A small MLP with a Dropout layer, whose seed state lives in `model.variables`."""
    init = lambda offset: keras.initializers.GlorotUniform(seed=seed * 100 + offset)  # noqa: E731
    return keras.Sequential(
        [
            keras.Input((in_dim,)),
            keras.layers.Dense(hidden, activation="tanh", kernel_initializer=init(1)),
            keras.layers.Dropout(0.25, seed=seed),
            keras.layers.Dense(1, kernel_initializer=init(2)),
        ],
        name=name,
    )


def shrinking_clip(max_norm: float) -> hvdclip.GradientTransform:
    """Global-norm clipping whose threshold shrinks with every applied step, so its state matters."""

    def init(variables):
        del variables
        return tf.zeros((), tf.float32)

    def update(grads, count, variables):
        del variables
        limit = max_norm / (1.0 + 0.1 * count)
        factor = limit / tf.maximum(global_norm(grads), limit)
        return hvdclip.TransformResult([map_values(lambda v: v * tf.cast(factor, v.dtype), g) for g in grads], count + 1.0)

    return hvdclip.GradientTransform(init, update)


def resumable_trainer(seed: int = 1, model_seed: int | None = None, rng_seed: int | None = None) -> hvdclip.HvdClipTrainer:
    """A trainer whose random choices (init, dropout, shuffle seeds) follow `seed`, the script's seed.

    `model_seed` and `rng_seed` make the weights (and dropout seeds) or the trainer's shuffle RNG
    differ, as in a fresh process, while the global seed stays the script's.
    """
    keras.utils.set_random_seed(seed)
    if rng_seed is not None:
        random.seed(rng_seed)  # Keras draws unseeded SeedGenerator states from Python's RNG.
    model = dropout_mlp(seed if model_seed is None else model_seed)
    return hvdclip.HvdClipTrainer(model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=shrinking_clip(2.0))


def id_dataset(n: int, in_dim: int = 8, seed: int = 0) -> tf.data.Dataset:
    """`n` regression examples whose first feature is the example's id (0..n-1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, in_dim)).astype("float32")
    x[:, 0] = np.arange(n)
    y = (np.sin(x[:, 1:2]) * 3 + x[:, 2:3] ** 2).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y))


class Interrupted(Exception):
    """What `InterruptAt` raises: stands for a crash."""


class InterruptAt(hvdclip.Callback):
    """Raises `Interrupted` after global step `step` (after earlier callbacks, such as a saver, ran)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step, logs):
        if step == self.step:
            raise Interrupted(f"interrupted after step {step}")


class StepLog(hvdclip.Callback):
    """Records each step's metrics as Python floats, by global step (reading them waits for the device)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_step_end(self, step, logs):
        self.steps[step] = {name: float(value) for name, value in logs.items() if name != "samples"}


def record_batches(trainer: hvdclip.HvdClipTrainer) -> list[list[int]]:
    """Makes `trainer` record the ids (first feature) of every batch it trains on."""
    seen: list[list[int]] = []
    run_step = trainer.engine.run_step

    def recording(x, y, **kwargs):
        seen.append([int(i) for i in np.asarray(x)[:, 0]])
        return run_step(x, y, **kwargs)

    trainer.engine.run_step = recording
    return seen


def state_values(trainer: hvdclip.HvdClipTrainer) -> list[np.ndarray]:
    """Every variable the trainer broadcasts and checkpoints, as arrays."""
    return [v.numpy().copy() for _, v in trainer.engine.named_state_variables()]


def same_values(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def batch_norm_cnn(seed: int, blocks: int = 6, name: str = "bn_cnn") -> keras.Model:
    """A small CNN with a BatchNormalization after each of `blocks` convolutions (ResNet's pattern)."""
    init = lambda offset: keras.initializers.HeNormal(seed=seed * 100 + offset)  # noqa: E731
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for block in range(blocks):
        x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, kernel_initializer=init(block))(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, kernel_initializer=init(99))(x)
    return keras.Model(inputs, outputs, name=name)


def images(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` random 8x8x3 images with a regression target; `seed` shifts the input's mean and scale."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 8, 8, 3)) * (1.0 + seed) + seed).astype("float32")
    y = x.mean(axis=(1, 2, 3))[:, None].astype("float32")
    return x, y


def write_records(directory: str, files: int, per_file: int) -> list[str]:
    """`files` TFRecord files of `per_file` records; record i of file f is the bytes 'f-i'."""
    import os

    names = []
    for f in range(files):
        name = os.path.join(directory, f"part-{f}.tfrecord")
        with tf.io.TFRecordWriter(name) as writer:
            for i in range(per_file):
                writer.write(f"{f}-{i}".encode())
        names.append(name)
    return names


def parsed_records(names: list[str]) -> tf.data.Dataset:
    """(x, y) examples from `write_records` files: x = [file, index, 0, ..., 0] (8 features), y = file + index."""

    def parse(record):
        parts = tf.strings.to_number(tf.strings.split(record, "-"), tf.float32)
        x = tf.concat([parts, tf.zeros([6])], axis=0)
        return x, tf.reshape(parts[0] + parts[1], [1])

    return tf.data.TFRecordDataset(names).map(parse)
