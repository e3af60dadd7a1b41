"""Checkpoints in one process: full state round trip, exact resume, mismatches, crashes, export."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.trainer import checkpoint
from support import make_mlp
from training_support import (
    InterruptAt,
    Interrupted,
    id_dataset,
    resumable_trainer,
    same_values,
    state_values,
)

FIT = dict(epochs=3, batch_size=8, shuffle_buffer=48, verbose=0)


def test_restore_brings_back_every_variable_and_counter(tmp_path):
    trainer = resumable_trainer(seed=1)
    trainer.skipped_steps.assign(3)
    trainer.fit(id_dataset(48), callbacks=[hvdclip.CheckpointSaver(tmp_path)], **FIT)
    saved = state_values(trainer)

    other = resumable_trainer(seed=2)
    step = other.restore(tmp_path)

    assert step == 18 and int(other.global_step.numpy()) == 18
    assert same_values(state_values(other), saved)
    assert int(other.skipped_steps.numpy()) == 3
    assert float(other.clip_state.numpy()) == 18.0, "the clip transform's state must be restored"
    assert int(other.optimizer.iterations.numpy()) == 18


@pytest.mark.parametrize("crash_at", [6, 8, 13])  # An epoch end, mid-epoch, and the last epoch.
def test_resuming_after_a_crash_ends_with_the_uninterrupted_weights(tmp_path, crash_at):
    data = id_dataset(48)
    reference = resumable_trainer(seed=1)
    reference.fit(data, **FIT)

    interrupted = resumable_trainer(seed=1)
    saver = hvdclip.CheckpointSaver(tmp_path, every_n_steps=1)
    with pytest.raises(Interrupted):
        interrupted.fit(data, callbacks=[saver, InterruptAt(crash_at)], **FIT)
    resumed = resumable_trainer(seed=1, model_seed=9, rng_seed=9)  # Different weights and RNG until restored.
    assert resumed.restore(tmp_path) == crash_at
    history = resumed.fit(data, **FIT)

    assert same_values(state_values(resumed), state_values(reference))
    assert history.epochs == list(range((crash_at - 1) // 6, 3))


def test_restore_missing_checkpoint(tmp_path):
    with pytest.raises(hvdclip.CheckpointError, match=r"No checkpoint at '.*empty'.*missing_ok=True"):
        resumable_trainer().restore(tmp_path / "empty")
    trainer = resumable_trainer()
    assert trainer.restore(tmp_path / "empty", missing_ok=True) == 0
    trainer.fit(id_dataset(16), epochs=1, batch_size=8, verbose=0)
    assert int(trainer.global_step.numpy()) == 2


def saved_checkpoint(directory, model):
    trainer = hvdclip.HvdClipTrainer(model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError())
    trainer.fit(id_dataset(16), epochs=1, batch_size=8, verbose=0, callbacks=[hvdclip.CheckpointSaver(directory)])
    return directory


@pytest.mark.parametrize(
    "model, pattern",
    [
        (
            lambda: make_mlp(seed=1, hidden=32, name="wider"),
            r"does not fit this trainer: variable #0 is 'model/wider/dense_\d+/kernel' \(8, 32\) float32 here "
            r"but 'model/original/dense_\d+/kernel' \(8, 16\) float32 in the checkpoint",
        ),
        (
            lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)], name="shallow"),
            r"it has \d+ variables and this trainer \d+; variable #0 is 'model/shallow/dense_\d+/kernel' \(8, 1\)",
        ),
    ],
)
def test_restoring_a_different_model_names_the_first_mismatched_variable(tmp_path, model, pattern):
    saved_checkpoint(tmp_path, make_mlp(seed=1, name="original"))
    trainer = hvdclip.HvdClipTrainer(model(), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError())
    with pytest.raises(hvdclip.CheckpointError, match=pattern + r".*different model, optimizer or clip transform"):
        trainer.restore(tmp_path)


def test_restoring_with_a_different_optimizer_names_both_sides(tmp_path):
    saved_checkpoint(tmp_path, make_mlp(seed=1))  # Adam: two slots per weight.
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=1), keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError())
    with pytest.raises(
        hvdclip.CheckpointError,
        match=r"it has \d+ variables and this trainer \d+; variable #8 is 'counters/hvdclip_skipped_steps:0' \(\) int64 "
        r"here but 'optimizer/adam\w*/\w+_momentum' \(8, 16\) float32 in the checkpoint",
    ):
        trainer.restore(tmp_path)


def test_restore_after_training_started_is_refused(tmp_path):
    trainer = resumable_trainer()
    trainer.fit(id_dataset(16), epochs=1, batch_size=8, verbose=0, callbacks=[hvdclip.CheckpointSaver(tmp_path)])
    with pytest.raises(hvdclip.CheckpointError, match=r"restore\(\) must come before the first training step"):
        trainer.restore(tmp_path)


def test_an_unwritable_checkpoint_directory_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    trainer = resumable_trainer()
    with pytest.raises(hvdclip.OutputDirectoryError, match=r"`directory` is not a writable directory: '.*a_file/ckpts'"):
        trainer.fit(id_dataset(16), epochs=1, batch_size=8, verbose=0, callbacks=[hvdclip.CheckpointSaver(blocker / "ckpts")])
    assert int(trainer.global_step.numpy()) == 0


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"directory": 3}, TypeError, r"`directory` must be a path. Received: directory=3"),
        ({"every_n_steps": 0}, ValueError, r"`every_n_steps` must be an integer >= 1. Received: every_n_steps=0"),
        ({"max_to_keep": 0}, ValueError, r"`max_to_keep` must be an integer >= 1. Received: max_to_keep=0"),
    ],
)
def test_checkpoint_saver_rejects_bad_arguments(tmp_path, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        hvdclip.CheckpointSaver(**{"directory": tmp_path, **kwargs})


def test_restore_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"`path` must be a checkpoint directory or prefix. Received: path=None"):
        resumable_trainer().restore(None)
    with pytest.raises(TypeError, match=r"`missing_ok` must be True or False. Received: missing_ok=1"):
        resumable_trainer().restore("x", missing_ok=1)


def test_the_saver_keeps_the_newest_checkpoints_and_restore_takes_a_prefix(tmp_path):
    trainer = resumable_trainer()
    trainer.fit(id_dataset(16), epochs=4, batch_size=8, verbose=0, callbacks=[hvdclip.CheckpointSaver(tmp_path, max_to_keep=2)])
    assert sorted(p.name for p in tmp_path.glob("*.index")) == ["ckpt-6.index", "ckpt-8.index"]
    assert resumable_trainer().restore(tmp_path / "ckpt-6") == 6


# A process that saves checkpoints of 8 MB in a loop, each one holding a single value everywhere,
# and prints the value once the save has returned.
_SAVER = textwrap.dedent(
    """
    import sys
    import tensorflow as tf
    import hvdclip
    from hvdclip.trainer import checkpoint
    hvdclip.init()
    named = [(f"v{i}", tf.Variable(tf.zeros([512, 1024]))) for i in range(4)]
    manager = tf.train.CheckpointManager(checkpoint._checkpoint(named), sys.argv[1], max_to_keep=2)
    for value in range(1, 1000):
        for _, variable in named:
            variable.assign(tf.fill([512, 1024], float(value)))
        manager.save(checkpoint_number=value)
        print(value, flush=True)
    """
)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    directory = tmp_path / "ckpts"
    process = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(directory)], stdout=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    try:
        for _ in range(3):
            completed = int(process.stdout.readline())
        # TensorFlow writes a save's files under `<prefix>_temp` first: kill as soon as one appears.
        deadline = time.monotonic() + 60
        while not any("_temp" in name for name in os.listdir(directory)) and time.monotonic() < deadline:
            pass
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)

    named = [(f"v{i}", tf.Variable(tf.zeros([512, 1024]))) for i in range(4)]
    prefix = checkpoint.read(named, directory).prefix
    value = int(prefix.rsplit("-", 1)[1])
    assert value in (completed, completed + 1), "the latest checkpoint must be one whose save completed"
    assert all(np.all(v.numpy() == value) for _, v in named), "a checkpoint mixed values from two saves"


def test_save_writes_a_loadable_keras_model(tmp_path):
    trainer = resumable_trainer()
    trainer.fit(id_dataset(16), epochs=1, batch_size=8, verbose=0)
    trainer.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    x = np.ones((3, 8), "float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), trainer.model.predict(x, verbose=0))


def test_save_rejects_bad_paths(tmp_path):
    with pytest.raises(ValueError, match=r"`path` must be a file name ending in '.keras'. Received: path='model.h5'"):
        resumable_trainer().save("model.h5")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(hvdclip.OutputDirectoryError, match=r"`path` is not a writable directory: '.*a_file'"):
        resumable_trainer().save(blocker / "model.keras")
