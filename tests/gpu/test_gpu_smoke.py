"""Smoke test on real GPUs (untested here: the build machine has none). Launch with one rank per
GPU: `HVDCLIP_REQUIRE_GPU=1 horovodrun -np 2 python -m pytest -q tests/gpu`. Every rank runs the same
collectives in the same order, and asserts after them."""

import socket

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import hvdclip


def test_each_local_rank_has_its_own_gpu(gpu):
    # hvdclip.init pinned GPU local_rank % count; ranks on one host must not share one.
    physical = tf.config.list_physical_devices("GPU")
    index = physical.index(gpu)
    seen = hvd.allgather_object((socket.gethostname(), index), name="hvdclip_gpu_test_pinning")
    assert index == hvd.local_rank() % len(physical)
    assert len(set(seen)) == len(seen), f"two ranks share a GPU: {seen}"


def test_nccl_allreduce_of_gpu_tensors(gpu):
    with tf.device("/GPU:0"):
        x = tf.fill([1024], float(hvd.rank() + 1))
        summed = hvd.allreduce(x, op=hvd.Sum, name="hvdclip_gpu_test_sum")
    n = hvd.size()
    assert "GPU" in summed.device, summed.device
    np.testing.assert_allclose(summed.numpy(), np.full(1024, n * (n + 1) / 2))


def test_one_trainer_step_on_gpu(gpu):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    trainer = hvdclip.HvdClipTrainer(model, keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError(),
                                     clip=hvdclip.clip_by_global_norm(1.0))
    rng = np.random.default_rng(hvd.rank())
    x = rng.normal(size=(32, 8)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    metrics = trainer.train_step(x, y)
    weights = np.concatenate([w.numpy().ravel() for w in model.trainable_weights])
    every = hvd.allgather_object((metrics["grad_norm"], weights.tobytes()), name="hvdclip_gpu_test_step")
    devices = [w.value.device for w in model.trainable_weights]
    assert all("GPU" in device for device in devices), devices
    assert np.isfinite(metrics["grad_norm"]) and not metrics["skipped"]
    assert metrics["clipped_grad_norm"] <= 1.0 + 1e-5
    assert len(set(every)) == 1, "ranks disagree on the reduced gradient norm or the weights after the step"


def _fit_on_gpu(optimizer):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    import hvdclip.keras

    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(optimizer, clip=hvdclip.clip_by_global_norm(1.0)),
                  loss="mse")  # Keras' defaults: jit_compile="auto" (XLA on a GPU), auto_scale_loss=True.
    rng = np.random.default_rng(hvd.rank())
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                        callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0),
                                   hvdclip.keras.callbacks.MetricAverageCallback()])
    weights = np.concatenate([w.numpy().ravel().astype("float32") for w in model.trainable_weights])
    return model, history, hvd.allgather_object(weights.tobytes(), name=f"hvdclip_gpu_test_fit_{id(model)}")


def test_fit_with_keras_default_compile_on_gpu(gpu):
    model, history, every = _fit_on_gpu(keras.optimizers.SGD(0.05))
    assert model.jit_compile is True, "on a GPU node Keras' default compile resolves to XLA; hvdclip runs without it"
    assert all("GPU" in w.value.device for w in model.trainable_weights)
    assert np.isfinite(history.history["loss"]).all() and np.isfinite(history.history["grad_norm"]).all()
    assert len(set(every)) == 1, "ranks hold different weights after fit"


def test_fit_with_mixed_precision_and_keras_defaults_on_gpu(gpu):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, history, every = _fit_on_gpu(keras.optimizers.SGD(0.05))  # A plain optimizer: the door scales the loss.
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.optimizer.loss_scaling, "under mixed_float16 the fit door scales the loss itself"
    assert model.layers[0].compute_dtype == "float16"
    assert np.isfinite(history.history["loss"]).all()
    assert len(set(every)) == 1, "ranks hold different weights after a mixed-precision fit"
