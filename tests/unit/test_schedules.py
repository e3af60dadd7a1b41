"""`ScaledWarmup`: the linear scaling rule with gradual warmup, and its serialisation."""

import keras
import numpy as np
import pytest

import hvdclip


def rates(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


def test_warms_up_linearly_from_the_base_rate_to_size_times_it():
    schedule = hvdclip.ScaledWarmup(0.1, steps_per_epoch=10, warmup_epochs=5, size=8)  # 50 warmup steps.
    np.testing.assert_allclose(rates(schedule, [0, 25, 50, 51, 10_000]), [0.1, 0.45, 0.8, 0.8, 0.8], rtol=1e-6)
    warmup = rates(schedule, range(51))
    assert np.all(np.diff(warmup) > 0) and np.allclose(np.diff(warmup), 0.7 / 50, rtol=1e-4)


def test_defaults_to_five_epochs_and_the_world_size():
    schedule = hvdclip.ScaledWarmup(0.1, steps_per_epoch=7)
    assert schedule.warmup_steps == 35 and schedule.size == hvdclip.size()


def test_no_warmup_scales_from_the_first_step():
    np.testing.assert_allclose(rates(hvdclip.ScaledWarmup(0.1, 10, warmup_epochs=0, size=4), [0, 1]), [0.4, 0.4], rtol=1e-6)


def test_scales_a_decaying_base_schedule():
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    schedule = hvdclip.ScaledWarmup(decay, steps_per_epoch=2, warmup_epochs=5, size=3)
    np.testing.assert_allclose(rates(schedule, [0, 5, 20]), [0.1, 0.1 * 0.5**0.5 * 2, 0.1 * 0.25 * 3], rtol=1e-5)


@pytest.mark.parametrize(
    "base_lr", [0.05, keras.optimizers.schedules.PiecewiseConstantDecay([10], [0.1, 0.01])], ids=["number", "schedule"]
)
def test_round_trips_through_keras_serialisation(base_lr):
    schedule = hvdclip.ScaledWarmup(base_lr, steps_per_epoch=4, warmup_epochs=2.5, size=2)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(restored, hvdclip.ScaledWarmup) and restored.get_config() == schedule.get_config()
    np.testing.assert_allclose(rates(restored, range(0, 30, 3)), rates(schedule, range(0, 30, 3)))
    optimizer = keras.optimizers.SGD.from_config(keras.optimizers.SGD(schedule).get_config())
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(0)))


def test_drives_an_optimizer_in_the_trainer():
    from support import make_data, make_mlp

    optimizer = keras.optimizers.SGD(hvdclip.ScaledWarmup(0.01, steps_per_epoch=2, warmup_epochs=1, size=4))
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=1), optimizer, keras.losses.MeanSquaredError())
    x, y = make_data(seed=0, n=8)
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    for _ in range(3):
        trainer.train_step(x, y)
    assert float(optimizer.learning_rate) == pytest.approx(0.04)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"base_lr": 0}, ValueError, r"`base_lr` must be a number > 0. Received: base_lr=0"),
        ({"base_lr": "fast"}, TypeError, r"`base_lr` must be a number > 0. Received: base_lr='fast'"),
        ({"steps_per_epoch": 0}, ValueError, r"`steps_per_epoch` must be an integer >= 1. Received: steps_per_epoch=0"),
        ({"warmup_epochs": -1}, ValueError, r"`warmup_epochs` must be a number >= 0. Received: warmup_epochs=-1"),
        ({"size": 0}, ValueError, r"`size` must be an integer >= 1. Received: size=0"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        hvdclip.ScaledWarmup(**{"base_lr": 0.1, "steps_per_epoch": 10, **kwargs})
