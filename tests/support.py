"""Shared test helpers: deterministic models and data, and cross-rank comparisons."""

from __future__ import annotations

import hashlib

import keras
import numpy as np
import tensorflow as tf


def make_mlp(seed: int, in_dim: int = 8, hidden: int = 16, out: int = 1, name: str = "mlp") -> keras.Model:
    """A small built MLP whose initial weights depend only on `seed`."""
    init = lambda offset: keras.initializers.GlorotUniform(seed=seed * 100 + offset)  # noqa: E731
    model = keras.Sequential(
        [
            keras.Input((in_dim,)),
            keras.layers.Dense(hidden, activation="tanh", kernel_initializer=init(1)),
            keras.layers.Dense(hidden, activation="tanh", kernel_initializer=init(2)),
            keras.layers.Dense(out, kernel_initializer=init(3)),
        ],
        name=name,
    )
    return model


def make_data(seed: int, n: int, in_dim: int = 8, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Regression data with large targets, so gradients are big enough for clipping to bite."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, in_dim)).astype("float32")
    w = rng.normal(size=(in_dim, 1)).astype("float32")
    y = (scale * np.sin(x @ w) + scale * x[:, :1] ** 2).astype("float32")
    return x, y


def checksum(variables) -> np.ndarray:
    """A bit-exact fingerprint of variables' values as 4 int64s (sha256 of their bytes)."""
    digest = hashlib.sha256()
    for variable in variables:
        value = variable.numpy() if hasattr(variable, "numpy") else np.asarray(variable)
        digest.update(np.ascontiguousarray(value).tobytes())
    return np.frombuffer(digest.digest(), dtype=np.int64).copy()


def allgather(array) -> np.ndarray:
    """Stacks `array` from every rank: result[r] is rank r's value."""
    import horovod.tensorflow as hvd

    array = np.asarray(array)
    gathered = hvd.allgather(tf.constant(array[np.newaxis]))
    return gathered.numpy()


def same_on_all_ranks(array) -> bool:
    rows = allgather(array)
    return bool(all(np.array_equal(rows[0], row) for row in rows[1:]))


def make_embedding_model(seed: int, vocab: int = 40, dim: int = 6, ids: int = 5, name: str = "recsys") -> keras.Model:
    """Embedding -> Dense: its embedding gradient is a tf.IndexedSlices."""
    inputs = keras.Input((ids,), dtype="int32")
    embedded = keras.layers.Embedding(
        vocab, dim, embeddings_initializer=keras.initializers.RandomUniform(-0.5, 0.5, seed=seed)
    )(inputs)
    flat = keras.layers.Flatten()(embedded)
    output = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(flat)
    return keras.Model(inputs, output, name=name)


def make_clicks(seed: int, n: int, vocab: int = 40, ids: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Id sequences drawn from a small vocabulary, so ids repeat within and across batches."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab // 2, size=(n, ids)).astype("int32")
    y = (3.0 * np.cos(x.sum(axis=1, keepdims=True) / 7.0) + 2.0).astype("float32")
    return x, y


def tape_step(model: keras.Model, clipper, loss_fn=None):
    """Door 1 as the docs write it: a compiled step `(x, y, has_next) -> report` over `clipper`'s core step."""
    import hvdclip

    loss_fn = loss_fn or keras.losses.MeanSquaredError()

    @tf.function
    def step(x, y, has_next=None):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = hvdclip.DistributedGradientTape(tape, clipper, has_data=has_next)
        grads = tape.gradient(loss, model.trainable_variables)
        return tape.apply_gradients(zip(grads, model.trainable_variables))

    return step
