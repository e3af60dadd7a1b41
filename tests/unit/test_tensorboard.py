"""`hvdclip.TensorBoard`: which scalars it writes, at which steps, with which values."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

import hvdclip
from support import make_mlp
from training_support import id_dataset


def read_scalars(log_dir):
    """{tag: {step: value}} from every event file under `log_dir`."""
    scalars = {}
    for path in tf.io.gfile.glob(f"{log_dir}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars" or value.tag in scalars
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


def test_writes_window_means_every_n_steps_and_epoch_logs(tmp_path):
    trainer = hvdclip.HvdClipTrainer(
        make_mlp(seed=1), keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0)
    )
    losses = []
    run_step = trainer.engine.run_step
    trainer.engine.run_step = lambda x, y, **kwargs: losses.append(float((metrics := run_step(x, y, **kwargs))["loss"])) or metrics

    data = id_dataset(48)
    trainer.fit(data, epochs=2, batch_size=8, validation_data=data, callbacks=[hvdclip.TensorBoard(tmp_path, every_n_steps=4)], verbose=0)
    scalars = read_scalars(tmp_path)

    step_tags = {"loss", "grad_norm", "clipped_grad_norm", "clip_rate", "skip_rate", "skipped_steps", "learning_rate", "samples_per_second"}
    assert {f"train/{tag}" for tag in step_tags} <= set(scalars)
    assert sorted(scalars["train/loss"]) == [4, 8, 12]
    assert scalars["train/loss"][8] == pytest.approx(np.mean(losses[4:8]), rel=1e-5)
    assert scalars["train/learning_rate"][4] == pytest.approx(0.01)
    assert scalars["train/skipped_steps"][12] == 0 and scalars["train/samples_per_second"][4] > 0
    assert set(scalars["train/clip_rate"].values()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert sorted(scalars["epoch/val_loss"]) == [6, 12] and "epoch/loss" in scalars


def test_an_unwritable_log_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=1), keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError())
    with pytest.raises(hvdclip.OutputDirectoryError, match=r"`log_dir` is not a writable directory: '.*a_file/logs'"):
        trainer.fit(id_dataset(16), batch_size=8, callbacks=[hvdclip.TensorBoard(blocker / "logs")], verbose=0)
    assert int(trainer.global_step.numpy()) == 0
