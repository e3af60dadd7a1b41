"""The benchmark models and their synthetic data: every variant trains exactly these.

`small` and `medium` are MLP classifiers; `embedding` looks up token embeddings, so its largest
gradient is a `tf.IndexedSlices` (sparse rows), which Horovod allgathers instead of allreducing.
Data is random and fixed per rank (a few distinct batches, repeated), so the input pipeline costs
next to nothing and every variant sees the same batches.

Keras, TensorFlow and NumPy are imported when a model or dataset is built, so that the runner,
which only needs the names, starts no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["MODELS", "ModelSpec", "dataset_for"]

NUM_CLASSES = 10
DISTINCT_BATCHES = 8


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: how to build it and what a batch of its input looks like."""

    name: str
    description: str
    build: Callable[[], keras.Model]
    input_shape: tuple[int, ...]
    vocab_size: int | None = None  # integer token ids below this, instead of float features


def _mlp(features: int, hidden: int) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        import keras

        return keras.Sequential(
            [
                keras.Input((features,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(NUM_CLASSES),
            ]
        )

    return build


def _embedding(vocab: int, dim: int, length: int) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        import keras

        return keras.Sequential(
            [
                keras.Input((length,), dtype="int32"),
                keras.layers.Embedding(vocab, dim),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(NUM_CLASSES),
            ]
        )

    return build


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("small", "MLP 128-256-256-10 (0.10 M params)", _mlp(128, 256), (128,)),
        ModelSpec("medium", "MLP 256-1024-1024-10 (1.32 M params)", _mlp(256, 1024), (256,)),
        ModelSpec(
            "embedding",
            "Embedding 50k x 32 (sparse gradient) + MLP 32-64-10 (1.60 M params)",
            _embedding(50_000, 32, 16),
            (16,),
            vocab_size=50_000,
        ),
    )
}


def dataset_for(spec: ModelSpec, batch_size: int, seed: int) -> tf.data.Dataset:
    """An endless dataset of this rank's `(x, y)` batches: a few fixed random batches, repeated."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shape = (DISTINCT_BATCHES, batch_size, *spec.input_shape)
    if spec.vocab_size is None:
        x = rng.standard_normal(shape, dtype=np.float32)
    else:
        x = rng.integers(0, spec.vocab_size, shape, dtype=np.int32)
    y = rng.integers(0, NUM_CLASSES, (DISTINCT_BATCHES, batch_size), dtype=np.int32)
    # Without autotuning: its background thread sometimes held up creating an iterator for 1-2.5 s
    # on one rank (the other then waits in the allreduce), swamping the step being measured.
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().with_options(options)
