"""Training numerics in one process: gradient accumulation and mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from support import make_data, make_mlp


def weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda: keras.optimizers.Adam(1e-2)])
def test_k_micro_batches_equal_one_k_times_larger_batch(optimizer):
    k, batch, steps = 4, 8, 3
    x, y = make_data(seed=4, n=k * batch * steps)
    accumulated = hvdclip.HvdClipTrainer(
        make_mlp(seed=2), optimizer(), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(0.5), accumulation_steps=k,
    )
    large = hvdclip.HvdClipTrainer(
        make_mlp(seed=2, name="large"), optimizer(), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(0.5)
    )
    reported = []
    for step in range(steps):
        for micro in range(k):
            start = (step * k + micro) * batch
            reported.append(accumulated.train_step(x[start : start + batch], y[start : start + batch]))
        rows = slice(step * k * batch, (step + 1) * k * batch)
        reference = large.train_step(x[rows], y[rows])
        assert reported[-1]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        assert reported[-1]["clip_active"] is True
    # Only every k-th call reduces and steps the optimizer; the others report their micro-batch loss, no norm.
    assert [m["synced"] for m in reported] == ([False] * (k - 1) + [True]) * steps
    assert all(np.isnan(m["grad_norm"]) and not m["clip_active"] and not m["skipped"] for m in reported[: k - 1])
    assert int(accumulated.optimizer.iterations.numpy()) == steps
    for a, b in zip(weights(accumulated.model), weights(large.model)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_accumulation_steps_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"`accumulation_steps` must be an integer >= 1. Received: accumulation_steps=0"):
        hvdclip.HvdClipTrainer(make_mlp(seed=1), keras.optimizers.SGD(), keras.losses.MeanSquaredError(), accumulation_steps=0)
    with pytest.raises(TypeError, match=r"Received: accumulation_steps=2.0"):
        hvdclip.HvdClipTrainer(make_mlp(seed=1), keras.optimizers.SGD(), keras.losses.MeanSquaredError(), accumulation_steps=2.0)


@pytest.fixture
def mixed_float16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def one_update(model, optimizer, x, y, max_norm):
    trainer = hvdclip.HvdClipTrainer(model, optimizer, keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(max_norm))
    before = weights(model)
    metrics = trainer.train_step(x, y)
    return [a - b for a, b in zip(weights(model), before)], metrics, trainer


def test_mixed_precision_unscales_before_clipping(mixed_float16):
    x, y = make_data(seed=5, n=32)
    mp_model = make_mlp(seed=9, name="mp")
    assert mp_model.layers[0].compute_dtype == "float16"
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**10)
    mp_delta, mp_metrics, _ = one_update(mp_model, lso, x, y, max_norm=0.5)

    keras.mixed_precision.set_global_policy("float32")
    fp32_delta, fp32_metrics, _ = one_update(make_mlp(seed=9, name="fp32"), keras.optimizers.SGD(0.1), x, y, max_norm=0.5)

    # grad_norm is the unscaled norm (not 1024 times larger), and the clip bit on both runs.
    assert mp_metrics["grad_norm"] == pytest.approx(fp32_metrics["grad_norm"], rel=2e-2)
    assert mp_metrics["clip_active"] and fp32_metrics["clip_active"]
    assert mp_metrics["clipped_grad_norm"] == pytest.approx(0.5, rel=1e-3)
    for a, b in zip(mp_delta, fp32_delta):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-4)


def test_an_overflowing_mixed_precision_step_is_skipped_and_the_scale_halved(mixed_float16):
    x, y = make_data(seed=5, n=32)
    model = make_mlp(seed=9, name="overflow")
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**120)
    # Even with skip_nonfinite=False an overflow must not reach the weights.
    trainer = hvdclip.HvdClipTrainer(model, lso, keras.losses.MeanSquaredError(), skip_nonfinite=False)
    before = weights(model)
    metrics = trainer.train_step(x, y)
    assert metrics["skipped"] is True
    assert all(np.array_equal(a, b) for a, b in zip(weights(model), before))
    assert float(lso.dynamic_scale.numpy()) == 2.0**119
    assert int(lso.iterations.numpy()) == 0


def test_the_loss_scale_grows_after_dynamic_growth_steps_finite_steps(mixed_float16):
    x, y = make_data(seed=5, n=32)
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**4, dynamic_growth_steps=3)
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=9, name="grow"), lso, keras.losses.MeanSquaredError())
    scales = []
    for _ in range(4):
        trainer.train_step(x, y)
        scales.append(float(lso.dynamic_scale.numpy()))
    assert scales == [16.0, 16.0, 32.0, 32.0]


def test_a_loss_scale_optimizer_that_clips_is_rejected():
    with pytest.raises(ValueError, match=r"clipnorm=1.0"):
        hvdclip.HvdClipTrainer(
            make_mlp(seed=1), keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(clipnorm=1.0)), keras.losses.MeanSquaredError()
        )
