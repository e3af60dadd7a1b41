"""HvdClipTrainer in one process: the step's math, None gradients, non-finite skips, fit, errors."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from support import make_data, make_mlp


def mse():
    return keras.losses.MeanSquaredError()


def trainer_for(model=None, clip=None, **kwargs):
    model = model or make_mlp(seed=1)
    return hvdclip.HvdClipTrainer(model, keras.optimizers.Adam(1e-2), mse(), clip=clip, **kwargs)


def test_step_equals_a_hand_written_clipped_step():
    x, y = make_data(seed=0, n=64)
    trainer = trainer_for(clip=hvdclip.clip_by_global_norm(0.5))
    reference = make_mlp(seed=1, name="reference")
    optimizer = keras.optimizers.Adam(1e-2)

    @tf.function  # Compiled like the trainer's step, so both see the same graph-level numerics.
    def reference_step(x, y):
        with tf.GradientTape() as tape:
            loss = mse()(y, reference(x, training=True))
        grads = tape.gradient(loss, reference.trainable_variables)
        clipped, norm = tf.clip_by_global_norm(grads, 0.5)
        optimizer.apply_gradients(zip(clipped, reference.trainable_variables))
        return loss, norm

    for step in range(5):
        rows = slice(step * 8, (step + 1) * 8)
        metrics = trainer.train_step(x[rows], y[rows])
        loss, norm = reference_step(x[rows], y[rows])
        assert metrics["loss"] == pytest.approx(float(loss), rel=1e-6)
        assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
        assert metrics["clip_active"] is True
        assert metrics["clipped_grad_norm"] == pytest.approx(0.5, rel=1e-5)
    for a, b in zip(trainer.model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_metrics_report_an_inactive_clip():
    x, y = make_data(seed=0, n=8)
    metrics = trainer_for(clip=hvdclip.clip_by_global_norm(1e6)).train_step(x, y)
    assert metrics["clip_active"] is False
    assert metrics["clipped_grad_norm"] == metrics["grad_norm"]
    assert metrics["skipped"] is False


class UnusedBranch(keras.Model):
    """A model with a layer the loss never reaches, so its gradients are None."""

    def __init__(self):
        super().__init__()
        self.used = keras.layers.Dense(1)
        self.unused = keras.layers.Dense(1)

    def build(self, input_shape):
        self.used.build(input_shape)
        self.unused.build(input_shape)

    def call(self, x):
        return self.used(x)


@pytest.mark.parametrize("clip", [hvdclip.clip_by_value(0.1), hvdclip.clip_by_norm(0.1), hvdclip.clip_by_global_norm(0.1)])
def test_none_gradients_leave_their_variables_alone(clip):
    model = UnusedBranch()
    model.build((None, 8))
    before = [v.numpy().copy() for v in model.unused.trainable_variables]
    used_before = model.used.kernel.numpy().copy()
    x, y = make_data(seed=0, n=8)
    trainer_for(model=model, clip=clip).train_step(x, y)
    for v, b in zip(model.unused.trainable_variables, before):
        assert np.array_equal(v.numpy(), b)
    assert not np.array_equal(model.used.kernel.numpy(), used_before)


class Lazy(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)


def test_an_unbuilt_subclassed_model_is_built_on_the_first_batch():
    x, y = make_data(seed=0, n=8)
    trainer = trainer_for(model=Lazy())
    metrics = trainer.train_step(x, y)
    assert np.isfinite(metrics["loss"]) and trainer.broadcast_count == 1


def test_a_nan_gradient_skips_the_step_and_changes_nothing():
    x, y = make_data(seed=0, n=16)
    trainer = trainer_for(clip=hvdclip.clip_by_global_norm(1.0))
    trainer.train_step(x[:8], y[:8])
    weights = [v.numpy().copy() for v in trainer.model.variables]
    slots = [v.numpy().copy() for v in trainer.optimizer.variables]
    bad = x[8:].copy()
    bad[0, 0] = np.nan
    metrics = trainer.train_step(bad, y[8:])
    assert metrics["skipped"] is True and not np.isfinite(metrics["grad_norm"])
    assert all(np.array_equal(v.numpy(), w) for v, w in zip(trainer.model.variables, weights))
    assert all(np.array_equal(v.numpy(), s) for v, s in zip(trainer.optimizer.variables, slots))
    assert int(trainer.skipped_steps.numpy()) == 1
    assert trainer.train_step(x[8:], y[8:])["skipped"] is False
    assert int(trainer.optimizer.iterations.numpy()) == 2


def test_consecutive_skips_abort_with_a_clear_error():
    x, y = make_data(seed=0, n=8)
    x[0, 0] = np.inf
    trainer = trainer_for(abort_after_skips=2)
    trainer.train_step(x, y)
    with pytest.raises(hvdclip.NonFiniteGradientError, match=r"NaN/Inf on 2 consecutive steps"):
        trainer.train_step(x, y)


def test_without_skip_nonfinite_a_nan_reaches_the_weights():
    x, y = make_data(seed=0, n=8)
    x[0, 0] = np.nan
    trainer = trainer_for(skip_nonfinite=False)
    trainer.train_step(x, y)
    assert not np.isfinite(trainer.model.trainable_variables[0].numpy()).all()


def test_fit_runs_the_agreed_steps_and_averages_metrics_per_epoch():
    x, y = make_data(seed=0, n=80)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    trainer = trainer_for(clip=hvdclip.clip_by_global_norm(1.0))
    history = trainer.fit(dataset, epochs=2, steps_per_epoch=4)
    assert int(trainer.optimizer.iterations.numpy()) == 8
    assert set(history.history) >= {"loss", "grad_norm", "clipped_grad_norm", "clip_active", "skipped"}
    assert len(history.history["loss"]) == 2
    assert history.history["loss"][1] < history.history["loss"][0]
    full = trainer_for().fit(dataset, epochs=1)
    assert len(full.history["loss"]) == 1


# ---------------------------------------------------------------- bad input


# Bad arguments of the constructor and of fit: tests/unit/test_bad_input.py, one table per surface.


def test_fit_needs_steps_per_epoch_for_an_infinite_dataset():
    dataset = tf.data.Dataset.from_tensor_slices(make_data(seed=0, n=8)).batch(4).repeat()
    with pytest.raises(ValueError, match=r"`dataset` is infinite \(it repeats\), so an epoch would never end\. Pass `steps_per_epoch`.*Received: cardinality=-1$"):
        trainer_for().fit(dataset)


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_using_the_trainer_before_init_says_how_to_launch():
    result = run_python(
        "import keras, hvdclip\n"
        "m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
        "try:\n"
        "    hvdclip.HvdClipTrainer(m, keras.optimizers.Adam(), keras.losses.MeanSquaredError())\n"
        "except hvdclip.NotInitializedError as e:\n"
        "    print('ERR', e)\n"
    )
    assert "ERR Horovod is not initialised" in result.stdout, result.stderr
    assert "hvdclip-run -np 2" in result.stdout and "hvdclip.init()" in result.stdout


def test_importing_hvdclip_loads_and_initialises_nothing():
    result = run_python(
        "import sys, hvdclip, hvdclip.errors\n"
        "print(sorted(m for m in ('tensorflow', 'horovod', 'keras') if m in sys.modules))\n"
        "import horovod.tensorflow as hvd\n"
        "print(hvd.is_initialized())\n"
        "print(all(getattr(hvdclip, name) is not None for name in hvdclip.__all__))\n"
    )
    assert result.stdout.split() == ["[]", "False", "True"], result.stderr


@pytest.mark.parametrize("clip", [None, hvdclip.clip_by_global_norm(1e9), hvdclip.clip_by_value(1e9), hvdclip.clip_by_norm(1e9)])
def test_clip_active_is_false_on_every_step_when_nothing_is_clipped(clip):
    x, y = make_data(seed=3, n=25 * 8)
    trainer = trainer_for(clip=clip)
    active = [trainer.train_step(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8])["clip_active"] for i in range(25)]
    assert active == [False] * 25
