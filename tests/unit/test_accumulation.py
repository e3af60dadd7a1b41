"""Gradient accumulation as the core's state, in every door, in one process: k micro-batches equal one
k-times-larger batch; the counter and the sums are variables; a checkpoint inside a window resumes
bit for bit (the trainer's CheckpointSaver, and Keras' BackupAndRestore for the fit door)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
import hvdclip.keras
from hvdclip.errors import CheckpointError
from support import checksum, make_data, make_mlp, tape_step
from training_support import InterruptAt, Interrupted, resumable_trainer, id_dataset

K, BATCH, WINDOWS = 4, 8, 3
X, Y = make_data(seed=12, n=K * BATCH * WINDOWS)
CLIP = 0.5


def weights(model):
    return [v.numpy() for v in model.trainable_variables]


def one_large_batch():
    """The reference: one process, Adam, the whole window as one batch, global-norm clipping."""
    model, optimizer = make_mlp(seed=2), keras.optimizers.Adam(1e-2)
    for window in range(WINDOWS):
        rows = slice(window * K * BATCH, (window + 1) * K * BATCH)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(Y[rows], model(X[rows], training=True))
        grads, _ = tf.clip_by_global_norm(tape.gradient(loss, model.trainable_variables), CLIP)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return model


def trainer_door():
    trainer = hvdclip.HvdClipTrainer(
        make_mlp(seed=2), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(CLIP), accumulation_steps=K,
    )  # fmt: skip
    for start in range(0, len(X), BATCH):
        trainer.train_step(X[start : start + BATCH], Y[start : start + BATCH])
    return trainer.model


def own_loop_door():
    model = make_mlp(seed=2)
    clipper = hvdclip.Clipper(keras.optimizers.Adam(1e-2), hvdclip.clip_by_global_norm(CLIP), accumulation_steps=K)
    clipper.broadcast_initial_state(model)
    step = tape_step(model, clipper)
    reports = [step(x, y, has_next) for (x, y), has_next in hvdclip.Lockstep(
        tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH), clipper)]  # fmt: skip
    assert [bool(r["synced"]) for r in reports] == ([False] * (K - 1) + [True]) * WINDOWS
    assert int(clipper.accumulation.micro_step.numpy()) == 0 and int(clipper.applier.iterations.numpy()) == WINDOWS
    return model


def fit_door(epochs=1, callbacks=(), model=None, batches=None):
    model = model or make_mlp(seed=2)
    optimizer = hvdclip.keras.DistributedOptimizer(
        keras.optimizers.Adam(1e-2), backward_passes_per_step=K, average_aggregated_gradients=True,
        clip=hvdclip.clip_by_global_norm(CLIP),
    )  # fmt: skip
    model.compile(optimizer=optimizer, loss="mse")
    data = batches if batches is not None else tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH)
    model.fit(data, epochs=epochs, verbose=0,
              callbacks=[hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0), *callbacks])  # fmt: skip
    return model


def test_k_micro_batches_in_every_door_equal_one_k_times_larger_batch():
    reference = weights(one_large_batch())
    doors = {"trainer": weights(trainer_door()), "own loop": weights(own_loop_door()), "fit": weights(fit_door())}
    for door, found in doors.items():
        difference = max(float(np.max(np.abs(a - b))) for a, b in zip(found, reference))
        assert difference <= 1e-5, (door, difference)
    assert [np.array_equal(a, b) for a, b in zip(doors["trainer"], doors["own loop"])] == [True] * len(reference)


def test_the_counter_is_shared_state_and_the_sums_are_rank_local():
    clipper = hvdclip.Clipper(keras.optimizers.SGD(), accumulation_steps=3)
    model = make_mlp(seed=1)
    clipper.broadcast_initial_state(model)
    shared = dict(clipper.named_variables())
    local = dict(clipper.local_variables())
    assert "accumulation/micro_step" in shared and not any(name.startswith("accumulation/sum") for name in shared)
    assert len([name for name in local if name.startswith("accumulation/sum")]) == len(model.trainable_variables)
    optimizer = hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD(), backward_passes_per_step=3)
    optimizer.build(model.trainable_variables)
    carried = {id(v) for v in optimizer.variables}
    assert all(id(v) in carried for _, v in optimizer.clipper.local_variables()), "Keras checkpoints carry the sums"


def test_horovods_default_sums_the_window_instead_of_averaging_it():
    def applied(average):
        model = make_mlp(seed=2)
        clipper = hvdclip.Clipper(keras.optimizers.SGD(1.0), accumulation_steps=2, average_accumulated=average)
        clipper.broadcast_initial_state(model)
        before = weights(model)
        for start in (0, BATCH):
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(Y[start : start + BATCH], model(X[start : start + BATCH]))
            tape = hvdclip.DistributedGradientTape(tape, clipper)
            tape.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return [b - a for a, b in zip(weights(model), before)]

    summed, averaged = applied(False), applied(True)
    for s, a in zip(summed, averaged):
        np.testing.assert_allclose(s, 2 * a, rtol=1e-5, atol=1e-7)


def test_lockstep_runs_whole_windows_of_unknown_length_data():
    model = make_mlp(seed=1)
    clipper = hvdclip.Clipper(keras.optimizers.SGD(0.01), accumulation_steps=2)
    clipper.broadcast_initial_state(model)
    step = tape_step(model, clipper)
    batches = tf.data.Dataset.from_tensor_slices((X[:40], Y[:40])).batch(BATCH)  # 5 batches.
    lockstep = hvdclip.Lockstep(batches, clipper)
    votes = [bool(step(x, y, has_next)["all_have_data"]) for (x, y), has_next in lockstep]
    # At the second window's end there is no whole third one, so the loop stops there.
    assert (votes, lockstep.ran_out, int(clipper.accumulation.micro_step.numpy())) == ([True, True, True, False], True, 0)


def test_a_checkpoint_inside_a_window_resumes_the_trainer_bit_for_bit(tmp_path):
    fit = dict(epochs=2, batch_size=8, verbose=0)
    data = id_dataset(40)  # 5 steps an epoch, windows of 3: windows cross the epoch boundary.

    def make(seed_offset=0):
        trainer = resumable_trainer(seed=1, model_seed=1 + seed_offset)
        return hvdclip.HvdClipTrainer(
            trainer.model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), accumulation_steps=3
        )

    whole = make()
    whole.fit(data, **fit)
    cut = make()
    with pytest.raises(Interrupted):
        cut.fit(data, callbacks=[hvdclip.CheckpointSaver(tmp_path, every_n_steps=1), InterruptAt(4)], **fit)
    assert int(cut.engine.clipper.accumulation.micro_step.numpy()) == 1, "the test must cut inside a window"
    resumed = make(seed_offset=5)
    assert resumed.restore(tmp_path) == 4
    resumed.fit(data, **fit)
    assert checksum(resumed.model.variables).tolist() == checksum(whole.model.variables).tolist()


def test_a_window_checkpoint_cannot_resume_on_another_number_of_ranks(tmp_path, monkeypatch):
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=1), keras.optimizers.SGD(), keras.losses.MeanSquaredError(), accumulation_steps=3)
    trainer.fit(id_dataset(16), batch_size=8, verbose=0, callbacks=[hvdclip.CheckpointSaver(tmp_path)])  # Ends at micro-step 2.
    restored = hvdclip.HvdClipTrainer(make_mlp(seed=1), keras.optimizers.SGD(), keras.losses.MeanSquaredError(), accumulation_steps=3)
    restored.restore(tmp_path)
    monkeypatch.setattr("hvdclip.distributed.runtime.size", lambda: 2)
    with pytest.raises(CheckpointError, match=r"inside a gradient-accumulation window on 1 ranks; .*Restore it on 1 ranks"):
        restored.train_step(X[:8], Y[:8])


def test_the_fit_door_resumes_bit_for_bit_from_an_epoch_end_backup_inside_a_window(tmp_path):
    data = tf.data.Dataset.from_tensor_slices((X[:48], Y[:48])).batch(BATCH)  # 6 batches: epochs end mid-window.

    class StopAfterEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise Interrupted("after epoch 1")

    whole = fit_door(epochs=2, batches=data)
    with pytest.raises(Interrupted):
        fit_door(epochs=2, batches=data, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path)), StopAfterEpoch()])
    fresh = make_mlp(seed=7)  # Other initial weights: the backup must bring the whole state back.
    resumed = fit_door(epochs=2, batches=data, model=fresh, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path))])
    assert int(resumed.optimizer.clipper.accumulation.micro_step.numpy()) == int(whole.optimizer.clipper.accumulation.micro_step.numpy())
    assert checksum(resumed.variables).tolist() == checksum(whole.variables).tolist()
