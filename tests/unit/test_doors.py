"""The three doors run one core step: on one process they give the trainer's weights bit for bit,
mixed precision included; Keras' own features (several outputs and losses, sample and class
weights, numpy or tf.data input) pass through the fit door untouched; misuse fails clearly."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
import hvdclip.keras
from hvdclip.errors import HvdClipError
from support import checksum, make_data, make_mlp

X, Y = make_data(seed=3, n=64)
BATCH = 16


def max_difference(a, b):
    return max(float(np.max(np.abs(x.numpy() - y.numpy()))) for x, y in zip(a.variables, b.variables))


def trainer_weights(optimizer, clip, model=None):
    trainer = hvdclip.HvdClipTrainer(model or make_mlp(seed=2), optimizer, keras.losses.MeanSquaredError(), clip=clip)
    for start in range(0, len(X), BATCH):
        trainer.train_step(X[start : start + BATCH], Y[start : start + BATCH])
    trainer_weights.last_model = trainer.model
    return checksum(trainer.model.variables).tolist()


def own_loop_weights(optimizer, clip):
    model = make_mlp(seed=2)
    clipper = hvdclip.Clipper(optimizer, clip)
    clipper.broadcast_initial_state(model)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.MeanSquaredError()(y, model(x, training=True)))
            scaled = clipper.scale_loss(loss)
        tape = hvdclip.DistributedGradientTape(tape, clipper)
        grads = tape.gradient(scaled, model.trainable_variables)
        return tape.apply_gradients(zip(grads, model.trainable_variables))

    metrics = [train_step(X[s : s + BATCH], Y[s : s + BATCH]) for s in range(0, len(X), BATCH)]
    return checksum(model.variables).tolist(), metrics


def fit_weights(optimizer, clip, **compile_kwargs):
    model = make_mlp(seed=2)
    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(optimizer, clip=clip), loss="mse", jit_compile=False, **compile_kwargs)
    history = model.fit(
        X, Y, batch_size=BATCH, shuffle=False, verbose=0,
        callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0), hvdclip.keras.callbacks.MetricAverageCallback()],
    )
    fit_weights.last_model = model
    return checksum(model.variables).tolist(), history


@pytest.mark.parametrize("clip", [None, hvdclip.clip_by_global_norm(0.5), hvdclip.autoclip(50)], ids=["none", "global", "autoclip"])
def test_the_three_doors_give_the_same_weights(clip):
    expected = trainer_weights(keras.optimizers.Adam(1e-2), clip)
    own, metrics = own_loop_weights(keras.optimizers.Adam(1e-2), clip)
    fitted, history = fit_weights(keras.optimizers.Adam(1e-2), clip)
    assert own == expected, "own loop"
    if clip is None or clip.init([]) == ():
        assert fitted == expected, "fit"
    else:
        # AutoClip's threshold is a percentile of past norms; a norm computed in Keras' differently
        # fused train function can differ in its last bit, and so can the step that clips on it.
        assert max_difference(fit_weights.last_model, trainer_weights.last_model) <= 1e-5
    clipped = [bool(m["clip_active"]) for m in metrics]
    assert history.history["clip_rate"] == [pytest.approx(sum(clipped) / len(clipped))]
    if clip is not None:
        assert any(clipped), "the comparison should see the clip bite"


def test_mixed_precision_unscales_before_the_clip_in_every_door():
    """Keras' defaults (auto_scale_loss left alone) with the documented LossScaleOptimizer, and with a
    plain optimizer that the door wraps itself, give the trainer's weights bit for bit."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        def lso(initial_scale=2.0**10):
            return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=initial_scale)

        clip = hvdclip.clip_by_global_norm(0.5)
        expected = trainer_weights(lso(), clip)
        own, metrics = own_loop_weights(lso(), clip)
        fitted, _ = fit_weights(lso(), clip)
        plain = trainer_weights(lso(initial_scale=2.0**15), clip)  # Keras' default scale, as the door's own wrapper.
        fitted_plain, _ = fit_weights(keras.optimizers.SGD(0.05), clip)
        assert hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD()).loss_scaling
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert own == expected and fitted == expected
    assert fitted_plain == plain
    # The norm the clip saw is the true (unscaled) one: clipped to 0.5, not to 0.5 * 2**10.
    assert all(float(m["clipped_grad_norm"]) <= 0.5 * (1 + 1e-3) for m in metrics)
    assert any(bool(m["clip_active"]) for m in metrics)


def test_the_fit_door_refuses_a_float16_model_whose_optimizer_scales_no_loss():
    optimizer = hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD())  # Made under float32.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_mlp(seed=2)
        model.compile(optimizer=optimizer, loss="mse")
        with pytest.raises(ValueError, match=r"computes in float16 .* make the DistributedOptimizer after .*Received:"):
            model.fit(X, Y, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_keras_features_pass_through_the_fit_door_untouched():
    """Two outputs with a dict of losses and loss weights, sample and class weights, tf.data input:
    with clip=None the fit door's update is Keras' own, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype("float32")
    labels = rng.integers(0, 3, size=(48,))
    targets = {"score": rng.normal(size=(48, 1)).astype("float32"), "label": labels}
    weights = rng.uniform(0.5, 2.0, size=(48,)).astype("float32")

    def run(wrap):
        keras.utils.set_random_seed(9)
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(16, activation="relu")(inputs)
        model = keras.Model(
            inputs, {"score": keras.layers.Dense(1, name="score")(hidden), "label": keras.layers.Dense(3, name="label")(hidden)}
        )
        optimizer = keras.optimizers.Adam(1e-2)
        model.compile(
            optimizer=hvdclip.keras.DistributedOptimizer(optimizer) if wrap else optimizer,
            loss={"score": "mse", "label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
            loss_weights={"score": 0.5, "label": 2.0},
            metrics={"label": ["accuracy"]},
            jit_compile=False,
        )
        data = tf.data.Dataset.from_tensor_slices((x, targets, weights)).batch(12)
        callbacks = [hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)] if wrap else []
        history = model.fit(data, epochs=2, verbose=0, callbacks=callbacks)
        return checksum(model.variables).tolist(), history.history

    wrapped, wrapped_logs = run(True)
    plain, plain_logs = run(False)
    assert wrapped == plain
    assert wrapped_logs["label_accuracy"] == plain_logs["label_accuracy"]


def test_class_weight_and_numpy_input_reach_the_loss():
    x = X[:32]
    labels = (Y[:32, 0] > np.median(Y[:32, 0])).astype("int32")

    def run(class_weight):
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
        model.compile(
            optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD(0.1), clip=hvdclip.clip_by_global_norm(10.0)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False,
        )
        model.fit(x, labels, batch_size=8, shuffle=False, verbose=0, class_weight=class_weight,
                  callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])
        return checksum(model.variables).tolist()

    assert run({0: 1.0, 1: 1.0}) != run({0: 1.0, 1: 5.0}), "class_weight must change the gradient the door reduces"


def test_the_fit_door_broadcasts_before_its_first_step_even_without_the_callback():
    model = make_mlp(seed=2)
    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD()), loss="mse")
    model.fit(X, Y, batch_size=BATCH, verbose=0)  # No BroadcastGlobalVariablesCallback.
    assert model.optimizer.clipper.broadcast_count == 1 and model.optimizer.state_broadcast
    model.fit(X, Y, batch_size=BATCH, verbose=0)
    assert model.optimizer.clipper.broadcast_count == 1, "a second fit sends nothing"


def test_a_step_outside_fit_before_the_broadcast_is_refused():
    model = make_mlp(seed=2)
    optimizer = hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD())
    with pytest.raises(HvdClipError, match=r"BroadcastGlobalVariablesCallback\(0\)"):
        optimizer.apply([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)


def test_a_model_that_fit_builds_on_its_first_batch_starts_from_rank_0s_weights():
    """Horovod's examples build Sequential models without an Input: Keras builds them while tracing the
    first step, after every callback's on_train_begin. The train function builds it first, then broadcasts."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    assert not model.built
    model.fit(X, Y, batch_size=BATCH, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    assert model.built and model.optimizer.clipper.broadcast_count == 1


def test_an_explicit_jit_compile_true_is_refused_before_any_step():
    model = make_mlp(seed=2)
    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD()), loss="mse", jit_compile=True)
    before = checksum(model.variables).tolist()
    with pytest.raises(ValueError, match=r"Compile with jit_compile=False .*Received: jit_compile=True"):
        model.fit(X, Y, batch_size=BATCH, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    assert checksum(model.variables).tolist() == before


def test_the_own_loop_door_under_xla_says_to_drop_jit_compile():
    model = make_mlp(seed=2)
    clipper = hvdclip.Clipper(keras.optimizers.SGD())
    clipper.broadcast_initial_state(model)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        tape = hvdclip.DistributedGradientTape(tape, clipper)
        return tape.gradient(loss, model.trainable_variables)

    with pytest.raises(HvdClipError, match=r"inside tf.function\(jit_compile=True\).*plain @tf.function"):
        step(X[:4], Y[:4])


def test_the_wrapper_delegates_learning_rate_and_iterations_and_saves_its_state(tmp_path):
    inner = keras.optimizers.SGD(0.1)
    optimizer = hvdclip.keras.DistributedOptimizer(inner, clip=hvdclip.autoclip(50))
    model = make_mlp(seed=2)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    model.fit(X, Y, batch_size=BATCH, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    optimizer.learning_rate = 0.01
    assert float(inner.learning_rate.numpy()) == pytest.approx(0.01)
    assert int(optimizer.iterations.numpy()) == int(inner.iterations.numpy()) == len(X) // BATCH
    clip_state = [v for _, v in optimizer.clipper.named_variables() if _.startswith("clip_state")]
    assert clip_state and all(any(v is w for w in optimizer.variables) for v in clip_state), "clip state is saved with the optimizer"
    model.save(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="without its clip transform"):
        reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(reloaded.optimizer, hvdclip.keras.DistributedOptimizer)


def test_the_tape_explains_a_missing_broadcast_and_a_missing_gradient():
    model = make_mlp(seed=2)
    clipper = hvdclip.Clipper(keras.optimizers.SGD())
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(X[:4]))
    with pytest.raises(HvdClipError, match=r"call `clipper.broadcast_initial_state\(model\)` once on every rank"):
        hvdclip.DistributedGradientTape(tape, clipper).gradient(loss, model.trainable_variables)
    clipper.broadcast_initial_state(model)
    with pytest.raises(HvdClipError, match=r"call `tape.gradient\(...\)` first"):
        hvdclip.DistributedGradientTape(tape, clipper).apply_gradients([])


def test_a_nan_step_is_skipped_by_the_own_loop_door():
    model = make_mlp(seed=2)
    clipper = hvdclip.Clipper(keras.optimizers.SGD(0.1), hvdclip.clip_by_global_norm(1.0))
    clipper.broadcast_initial_state(model)
    before = checksum(model.variables).tolist()
    x = X[:8].copy()
    x[0, 0] = np.nan
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - Y[:8]))
    tape = hvdclip.DistributedGradientTape(tape, clipper)
    grads = tape.gradient(loss, model.trainable_variables)
    report = tape.apply_gradients(zip(grads, model.trainable_variables))
    assert bool(report["skipped"]) and checksum(model.variables).tolist() == before
    assert int(clipper.skipped_steps.numpy()) == 1


def test_the_fit_doors_epoch_metrics_leave_skipped_steps_out():
    x = X.copy()
    x[16, 0] = np.nan  # The second batch's gradient is NaN: that step is skipped.
    model = make_mlp(seed=2)
    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss="mse", jit_compile=False)
    history = model.fit(
        x, Y, batch_size=BATCH, shuffle=False, verbose=0,
        callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0), hvdclip.keras.callbacks.MetricAverageCallback()],
    )
    assert history.history["skipped"] == [1.0]
    assert np.isfinite(history.history["grad_norm"][0]) and np.isfinite(history.history["clipped_grad_norm"][0])


def test_the_fit_door_ends_an_epoch_whose_trusted_count_is_longer_than_its_data():
    """A `steps_per_epoch` beyond the data (Keras trusts it, and so does the door once the ranks agree
    on it) ends the epoch where the data does, as Keras' own train function does, with the same
    weights as the steps the data held; later steps take their batch inside the compiled step."""
    batches = len(X) // BATCH
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH)

    def fitted(**fit_kwargs):
        model = make_mlp(seed=2)
        model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.Adam(1e-2), clip=hvdclip.clip_by_global_norm(0.5)),
                      loss="mse", jit_compile=False)  # fmt: skip
        model.fit(dataset, verbose=0, callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)], **fit_kwargs)
        return model

    long = fitted(steps_per_epoch=batches + 3)
    exact = fitted()
    assert int(long.optimizer.iterations.numpy()) == int(exact.optimizer.iterations.numpy()) == batches
    assert checksum(long.variables).tolist() == checksum(exact.variables).tolist()
    assert checksum(exact.variables).tolist() == trainer_weights(keras.optimizers.Adam(1e-2), hvdclip.clip_by_global_norm(0.5))
