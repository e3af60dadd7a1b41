"""TensorBoard scalars from rank 0, written with `tf.summary` every n steps.

Between writes, step metrics are summed as tensors on the device, so a write every n steps costs
no host sync on the other n - 1 steps; the written value is the mean over those n steps.

Scalars are written with `tf.summary.write` and the scalar plugin's metadata, which is what
`tf.summary.scalar` writes: TensorFlow 2.21 no longer installs the `tensorboard` package that
`tf.summary.scalar` imports, and training should not need it (only viewing does).
"""

from __future__ import annotations

import os
import time

from hvdclip.distributed import runtime
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from hvdclip.trainer.callbacks import Callback
from hvdclip.distributed.rank_zero import is_rank_zero, on_rank_zero, writable_directory
from hvdclip.trainer.step_logs import RunningMeans, display_name
from hvdclip.validation import check_int, check_path

__all__ = ["TensorBoard"]

_SCALAR = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
)


def _scalar(tag: str, value) -> None:
    """One scalar for TensorBoard's scalar dashboard, at the default writer's step."""
    tf.summary.write(tag, tf.cast(value, tf.float32), metadata=_SCALAR)


class TensorBoard(Callback):
    """Writes training scalars for TensorBoard, on rank 0 only.

    Every `every_n_steps` steps, under `train/`: the means over those steps of `loss` (rank 0's),
    `grad_norm` and `clipped_grad_norm` (the reduced gradient's norm before and after clipping),
    `clip_rate` and `skip_rate` (fractions of steps), plus `skipped_steps` (the trainer's running
    count), `learning_rate` and `samples_per_second` (examples per second over all ranks,
    assuming every rank's batch is as large as rank 0's). At the end of each epoch, under
    `epoch/`: the epoch logs (means over ranks, and `val_*` metrics). The x-axis is the
    trainer's global step.

    Args:
        log_dir: directory for the event files; rank 0 creates it, and every rank raises
            `OutputDirectoryError` if it cannot.
        every_n_steps: write step scalars every this many steps.

    Example:
        >>> trainer.fit(dataset, epochs=5, callbacks=[hvdclip.TensorBoard("logs", every_n_steps=10)])
        $ tensorboard --logdir logs
    """

    def __init__(self, log_dir: str | os.PathLike, every_n_steps: int = 1) -> None:
        self.log_dir = check_path("log_dir", log_dir)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, ge=1)
        self._writer = None

    def on_train_begin(self, logs=None):
        on_rank_zero(lambda: writable_directory(self.log_dir, "log_dir"), name="tensorboard_log_dir")
        if is_rank_zero():
            self._writer = tf.summary.create_file_writer(self.log_dir)
        self._window = RunningMeans()
        self._samples = 0
        self._window_start = time.perf_counter()

    def on_step_end(self, step, logs):
        if self._writer is None:
            return
        self._window.add(logs)
        self._samples += logs.get("samples", 0)
        if step % self.every_n_steps == 0:
            self._write_window(step)

    def _write_window(self, step: int) -> None:
        now = time.perf_counter()
        elapsed = now - self._window_start
        with self._writer.as_default(step=step):
            for name, mean in self._window.tensors().items():
                _scalar(f"train/{display_name(name)}", mean)
            _scalar("train/skipped_steps", self.trainer.skipped_steps)
            _scalar("train/learning_rate", self.trainer.optimizer.learning_rate)
            if elapsed > 0:
                _scalar("train/samples_per_second", self._samples * runtime.size() / elapsed)
        self._window.reset()
        self._samples = 0
        self._window_start = now

    def on_epoch_end(self, epoch, logs):
        if self._writer is None:
            return
        step = int(self.trainer.global_step.numpy())
        with self._writer.as_default(step=step):
            for name, value in logs.items():
                _scalar(f"epoch/{display_name(name)}", value)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
