"""Keras' defaults as a GPU node resolves them, on 2 ranks of this CPU machine: TensorFlow is made to
list a stand-in GPU while `compile` runs, which is what Keras reads to resolve `jit_compile="auto"`
(and so, on every GPU node, a default `compile` asks for XLA). The fit door then trains without XLA,
ranks bit-identical, rank 0 saying so once; an explicit `jit_compile=True` is refused before any step."""

import contextlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
import hvdclip.keras
from support import allgather, checksum, make_data, make_mlp

X, Y = make_data(seed=44, n=64)


@contextlib.contextmanager
def a_gpu_is_visible():
    """TensorFlow lists one GPU more than this machine has, as `Trainer._resolve_auto_jit_compile` asks."""
    real = tf.config.list_physical_devices
    stand_in = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")

    def listed(device_type=None):
        devices = real(device_type)
        return devices + [stand_in] if device_type in (None, "GPU") else devices

    tf.config.list_physical_devices = listed
    try:
        yield
    finally:
        tf.config.list_physical_devices = real


def compiled(**compile_kwargs):
    model = make_mlp(seed=5)
    with a_gpu_is_visible():
        model.compile(
            optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.Adam(1e-2), clip=hvdclip.clip_by_global_norm(1.0)),
            loss="mse", **compile_kwargs,
        )  # fmt: skip
    return model


def fit(model, epochs=1):
    rank = hvdclip.rank()
    return model.fit(X[rank::2], Y[rank::2], batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])  # fmt: skip


def test_keras_default_compile_on_a_gpu_node_trains_without_xla_and_says_so_once(world):
    rank, _ = world
    model = compiled()
    assert model.jit_compile is True, "with a GPU visible, Keras' default compile resolves to XLA"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model)
        fit(model)  # A second fit: no second note.
    notes = [str(w.message) for w in caught if "runs the training step without XLA" in str(w.message)]
    before_training = checksum(make_mlp(seed=5).variables)
    sums = allgather(np.concatenate([checksum(model.variables), [len(notes)]]))
    assert (sums[:, :4] == sums[0, :4]).all(), "ranks hold different weights"
    assert (sums[0, :4] != before_training).any(), "the model did not train"
    assert sums[:, 4].tolist() == [1, 0], "rank 0 notes it once; rank 1 says nothing"
    if rank == 0:
        assert "Pass jit_compile=False to model.compile to silence this" in notes[0]


def test_an_explicit_jit_compile_true_on_a_gpu_node_is_refused_before_any_step(world):
    model = compiled(jit_compile=True)
    before = checksum(model.variables)
    with pytest.raises(ValueError, match=r"`model` is compiled with jit_compile=True \(XLA\).*Received: jit_compile=True"):
        fit(model)
    sums = allgather(np.concatenate([checksum(model.variables), before]))
    assert (sums[:, :4] == sums[:, 4:]).all(), "no step ran"


def test_jit_compile_false_on_a_gpu_node_is_quiet(world):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(compiled(jit_compile=False))
    notes = allgather(np.array([sum("without XLA" in str(w.message) for w in caught)]))
    assert (notes == 0).all()
