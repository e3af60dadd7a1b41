"""hvdclip.tensorflow and hvdclip.keras in one process: the variable broadcasts' names, Horovod's
learning-rate callbacks on Keras 3 (formulas, momentum correction against Horovod's own rule run
eagerly), BestModelCheckpoint, load_model, and the elastic states and `run`.
(With 2 ranks and elastic launches: tests/horovod_api.)"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from horovod.common.exceptions import HorovodInternalError

import hvdclip
import hvdclip.keras
import hvdclip.tensorflow
from support import make_data, make_mlp

X, Y = make_data(seed=3, n=64)
BATCH = 16  # 4 steps per epoch


def compiled(optimizer, seed: int = 2, **kwargs) -> keras.Model:
    model = make_mlp(seed=seed)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False, **kwargs)
    return model


class Rates(keras.callbacks.Callback):
    """The learning rate each step ran with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append(float(self.model.optimizer.learning_rate))


def rates_under(callback, epochs: int = 4, optimizer=None) -> tuple[list[float], keras.callbacks.History]:
    model = compiled(optimizer or keras.optimizers.SGD(0.1))
    rates = Rates()
    history = model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback, rates])
    return rates.seen, history


# ------------------------------------------------------------------ broadcast_variables


def test_broadcasts_in_a_compiled_step_are_named_by_position_never_by_layer():
    model = make_mlp(seed=1, name="a_model_name")
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(first_batch):
        if first_batch:
            hvdclip.tensorflow.broadcast_variables(model.variables, root_rank=0)
            hvdclip.tensorflow.broadcast_variables(optimizer.variables, root_rank=0)
        return tf.constant(0)

    step(tf.constant(True))
    graph = step.get_concrete_function(tf.constant(True)).graph.as_graph_def()
    # The broadcasts sit in the branch function of the `if` (a tf.cond).
    names = [node.name for f in graph.library.function for node in f.node_def if node.op.startswith("Horovod")]
    count = len(model.variables) + len(optimizer.variables)
    assert len(names) == count + 2, names  # One structure allgather per group, one broadcast per variable.
    assert all(name.startswith("hvdclip_broadcast_variables") for name in names), names
    assert not any("dense" in name or "a_model_name" in name or "kernel" in name for name in names), names
    assert len(set(names)) == len(names), "two groups in one step must not share a name"


def test_broadcast_in_place_returns_the_values_and_keeps_them_in_a_world_of_one():
    variables = [tf.Variable([1.0, 2.0]), keras.Variable(np.full(3, 4.0, np.float32))]
    values = hvdclip.tensorflow.broadcast_(variables, root_rank=0)
    assert [v.numpy().tolist() for v in values] == [[1.0, 2.0], [4.0] * 3]


def test_horovods_variable_broadcast_breaks_on_keras_3_which_is_why_it_is_replaced():
    import horovod.tensorflow as hvd

    with pytest.raises(AttributeError, match="'SymbolicTensor' object has no attribute 'assign'"):
        hvd.broadcast_variables(make_mlp(seed=1).variables, root_rank=0)


# ------------------------------------------------------------------ learning-rate callbacks


def test_warmup_follows_horovods_formula_from_lr_over_size_to_lr(monkeypatch, capsys):
    monkeypatch.setattr("hvdclip.keras.callbacks.learning_rate_warmup.size", lambda: 4)
    warmup = hvdclip.keras.callbacks.LearningRateWarmupCallback(initial_lr=0.4, warmup_epochs=2, verbose=1)
    seen, history = rates_under(warmup, epochs=3)
    expected = [0.4 / 4 * ((e + (b + 1) / 4) * 3 / 2 + 1) for e in range(2) for b in range(4)] + [0.4] * 4
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    assert expected[-5] == pytest.approx(0.4), "the last batch of the warmup runs at initial_lr"
    np.testing.assert_allclose(history.history["lr"], [expected[3], 0.4, 0.4], rtol=1e-6)
    assert capsys.readouterr().out.count("Epoch 2: finished gradual learning rate warmup to 0.4.") == 1


def test_schedule_steps_at_epoch_starts_within_its_epochs_and_leaves_the_rate_alone_outside():
    schedule = hvdclip.keras.callbacks.LearningRateScheduleCallback(1.0, multiplier=0.5, start_epoch=1, end_epoch=3)
    seen, _ = rates_under(schedule, epochs=4)
    # Epoch 0: the optimizer's own 0.1; epochs 1, 2: 1.0 * 0.5 ** (epoch - 1); epoch 3: left at epoch 2's.
    np.testing.assert_allclose(seen, [0.1] * 4 + [1.0] * 4 + [0.5] * 4 + [0.5] * 4, rtol=1e-6)


def test_schedule_without_staircase_sets_the_rate_at_every_batch_from_the_fractional_epoch():
    schedule = hvdclip.keras.callbacks.LearningRateScheduleCallback(0.2, multiplier=lambda epoch: 1 + epoch, staircase=False)
    seen, _ = rates_under(schedule, epochs=2)
    np.testing.assert_allclose(seen, [0.2 * (1 + e + b / 4) for e in range(2) for b in range(4)], rtol=1e-6)


def horovods_rule_eagerly(optimizer, rates: list[float], seed: int = 2) -> list[np.ndarray]:
    """Horovod's momentum correction as Horovod runs it: the momentum times new/old rate for the step."""
    model = make_mlp(seed=seed)
    momentum, previous = optimizer.momentum, float(optimizer.learning_rate)
    for step, rate in enumerate(rates):
        optimizer.learning_rate = rate
        optimizer.momentum = momentum * rate / previous
        rows = slice(step % 4 * BATCH, (step % 4 + 1) * BATCH)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(Y[rows], model(X[rows], training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        optimizer.momentum, previous = momentum, rate
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda: keras.optimizers.RMSprop(0.01, momentum=0.5)],
    ids=["SGD", "RMSprop"],
)
def test_momentum_correction_equals_horovods_rule_on_a_compiled_step(make_optimizer):
    schedule = hvdclip.keras.callbacks.LearningRateScheduleCallback(
        0.05, multiplier=lambda epoch: 1.0 / (1.0 + epoch), staircase=False
    )
    model = compiled(make_optimizer())
    rates = Rates()
    model.fit(X, Y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[schedule, rates])
    corrected = horovods_rule_eagerly(make_optimizer(), rates.seen)
    got = [v.numpy() for v in model.trainable_variables]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, corrected)) <= 1e-6
    plain = compiled(make_optimizer())
    plain.fit(X, Y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[
        hvdclip.keras.callbacks.LearningRateScheduleCallback(0.05, lambda epoch: 1.0 / (1.0 + epoch), staircase=False,
                                                             momentum_correction=False)])  # fmt: skip
    assert max(float(np.max(np.abs(a.numpy() - b))) for a, b in zip(plain.trainable_variables, corrected)) > 1e-4


def test_momentum_correction_warns_where_it_cannot_act():
    class Heavy(keras.optimizers.Adam):  # An optimizer with a `momentum` whose buffers hvdclip does not know.
        momentum = 0.9

    schedule = hvdclip.keras.callbacks.LearningRateScheduleCallback(0.01, multiplier=0.5)
    with pytest.warns(UserWarning, match="momentum_correction=True has no effect with Heavy"):
        rates_under(schedule, epochs=2, optimizer=Heavy(0.01))


def test_schedules_refuse_an_optimizer_that_follows_a_learning_rate_schedule():
    optimizer = keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))
    with pytest.raises(ValueError, match="the optimizer follows a LearningRateSchedule \\(ExponentialDecay\\)"):
        rates_under(hvdclip.keras.callbacks.LearningRateWarmupCallback(0.1), optimizer=optimizer)


def test_warmup_needs_the_steps_per_epoch_of_a_dataset_of_unknown_length():
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH).filter(lambda x, y: True)  # Length unknown.
    model = compiled(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="Could not autodetect the number of steps per epoch"):
        model.fit(data, epochs=1, verbose=0, callbacks=[hvdclip.keras.callbacks.LearningRateWarmupCallback(0.1)])


# ------------------------------------------------------------------ BestModelCheckpoint


def test_best_model_checkpoint_keeps_the_best_epochs_model(tmp_path):
    checkpoint = hvdclip.keras.callbacks.BestModelCheckpoint(monitor="val_loss")  # Horovod's: the path comes later.
    checkpoint.filepath = str(tmp_path / "best.keras")

    class Weights(keras.callbacks.Callback):
        seen = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append([v.numpy() for v in self.model.variables])

    model = compiled(keras.optimizers.SGD(0.05))
    history = model.fit(X, Y, batch_size=BATCH, epochs=4, validation_data=(X[:16], -Y[:16]), verbose=0,
                        callbacks=[checkpoint, Weights()])  # fmt: skip
    best = int(np.argmin(history.history["val_loss"]))
    assert best < 3, "negated targets: the validation loss gets worse, so the best epoch is not the last"
    saved = keras.models.load_model(tmp_path / "best.keras")
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(saved.variables, Weights.seen[best]))


def test_best_model_checkpoint_needs_a_path_when_training_starts():
    model = compiled(keras.optimizers.SGD(0.05))
    with pytest.raises(ValueError, match="BestModelCheckpoint needs `filepath`"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[hvdclip.keras.callbacks.BestModelCheckpoint(monitor="loss")])


def test_best_model_checkpoint_writes_on_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.setattr("hvdclip.keras.callbacks.best_model_checkpoint.rank", lambda: 1)
    checkpoint = hvdclip.keras.callbacks.BestModelCheckpoint(monitor="loss", filepath=tmp_path / "best.keras")
    compiled(keras.optimizers.SGD(0.05)).fit(X, Y, epochs=2, verbose=0, callbacks=[checkpoint])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ load_model


def test_load_model_wraps_the_saved_optimizer_with_its_state(tmp_path):
    model = compiled(keras.optimizers.Adam(1e-2), metrics=["mae"])
    model.fit(X, Y, batch_size=BATCH, epochs=2, verbose=0)
    model.save(tmp_path / "plain.keras")
    loaded = hvdclip.keras.load_model(tmp_path / "plain.keras")
    assert isinstance(loaded.optimizer, hvdclip.keras.DistributedOptimizer)
    inner = loaded.optimizer.inner_optimizer
    assert isinstance(inner, keras.optimizers.Adam) and int(inner.iterations.numpy()) == 8
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(inner.variables, model.optimizer.variables))
    assert loaded.get_compile_config()["loss"] == "mse" and loaded.jit_compile is False
    # It trains on: fit's broadcast callback, then a step through hvdclip's optimizer.
    loaded.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    assert int(inner.iterations.numpy()) == 12


def test_horovods_load_model_leaves_the_optimizer_unwrapped_on_keras_3(tmp_path):
    import horovod.tensorflow.keras as hvd_keras

    model = compiled(keras.optimizers.Adam(1e-2))
    model.save(tmp_path / "plain.keras")
    assert type(hvd_keras.load_model(tmp_path / "plain.keras").optimizer) is keras.optimizers.Adam


def test_load_model_takes_custom_optimizers_and_rewraps_hvdclips_own(tmp_path):
    @keras.saving.register_keras_serializable(package="test_horovod_api")
    class Custom(keras.optimizers.SGD):
        pass

    compiled(Custom(0.1)).save(tmp_path / "custom.keras")
    assert isinstance(hvdclip.keras.load_model(tmp_path / "custom.keras", custom_optimizers=[Custom]).optimizer.inner_optimizer, Custom)
    wrapped = compiled(hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD(0.1), clip=hvdclip.clip_by_global_norm(1.0)))
    wrapped.save(tmp_path / "wrapped.keras")
    with pytest.warns(UserWarning, match="without a clip transform"):
        loaded = hvdclip.keras.load_model(tmp_path / "wrapped.keras", compression=hvdclip.keras.Compression.fp16)
    assert type(loaded.optimizer.inner_optimizer) is keras.optimizers.SGD


def test_load_model_returns_a_model_saved_without_an_optimizer_as_it_is(tmp_path):
    make_mlp(seed=1).save(tmp_path / "bare.keras")
    assert getattr(hvdclip.keras.load_model(tmp_path / "bare.keras"), "optimizer", None) is None


# ------------------------------------------------------------------ elastic


@pytest.fixture
def no_reset(monkeypatch):
    # In one process without a launcher Horovod runs over MPI, which cannot be initialised twice:
    # a reset keeps the world of one (tests/horovod_api runs real resets).
    resets = []
    monkeypatch.setattr("hvdclip.compat.elastic._reset", lambda: resets.append(1))
    return resets


def test_keras_state_builds_the_optimizer_saves_restores_and_syncs():
    model = compiled(hvdclip.keras.DistributedOptimizer(keras.optimizers.Adam(1e-2), clip=hvdclip.autoclip()))
    state = hvdclip.keras.elastic.KerasState(model, batch=0, epoch=0)
    assert model.optimizer.built and len(model.optimizer.variables) > len(model.optimizer.inner_optimizer.variables)
    before = [v.numpy() for v in model.variables + model.optimizer.variables]
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    state.batch = 3
    state.restore()
    after = [v.numpy() for v in model.variables + model.optimizer.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)) and state.batch == 0
    state.sync()
    assert model.optimizer.state_broadcast, "a sync sends rank 0's clip state: the optimizer may step"


def test_keras_state_needs_a_built_model():
    with pytest.raises(ValueError, match="must be built first"):
        hvdclip.keras.elastic.KerasState(keras.Sequential([keras.layers.Dense(1)], name="unbuilt"), optimizer=keras.optimizers.SGD())


def test_tensorflow_state_restores_its_variables_and_attributes():
    variables = [tf.Variable(1.0), keras.Variable(np.ones(2, np.float32))]
    state = hvdclip.tensorflow.elastic.TensorFlowState(variables, step=5)
    variables[0].assign(7.0)
    variables[1].assign([3.0, 3.0])
    state.step = 9
    state.restore()
    assert (float(variables[0].numpy()), variables[1].numpy().tolist(), state.step) == (1.0, [1.0, 1.0], 5)


def grouped_allreduce_failure() -> tf.errors.UnknownError:
    return tf.errors.UnknownError(None, None, "Graph execution error: ... node HorovodGroupedAllreduce_grads_0 ... Horovod has been shut down")


def test_run_resets_on_a_failed_grouped_allreduce_and_restores_the_last_commit(no_reset):
    variable = tf.Variable(0.0)
    state = hvdclip.tensorflow.elastic.TensorFlowState([variable], step=0)
    calls = []

    @hvdclip.tensorflow.elastic.run
    def train(state):
        calls.append(state.step)
        while state.step < 4:
            variable.assign_add(1.0)
            state.step += 1
            if state.step == 2:
                state.commit()
            if state.step == 3 and len(calls) == 1:
                raise grouped_allreduce_failure()
        return float(variable.numpy())

    assert train(state) == 4.0 and calls == [0, 2] and no_reset == [1]


def test_run_raises_every_other_error_where_horovods_returns_none(no_reset, monkeypatch):
    import horovod.tensorflow.elastic as horovod_elastic

    monkeypatch.setattr(horovod_elastic, "_reset", lambda: None)

    def train(state):
        raise tf.errors.UnknownError(None, None, "a custom op of the user's failed")

    state = hvdclip.tensorflow.elastic.TensorFlowState([tf.Variable(0.0)])
    assert horovod_elastic.run(train)(state) is None, "Horovod's run swallows it"
    with pytest.raises(tf.errors.UnknownError, match="a custom op of the user's failed"):
        hvdclip.tensorflow.elastic.run(train)(state)
    assert no_reset == []
