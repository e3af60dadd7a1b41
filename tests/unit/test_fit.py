"""`fit` and `evaluate` in one process: input plans, shuffling, validation, callbacks, progress, errors."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.core.lockstep import EpochLength
from hvdclip.core.step_sums import StepSums
from hvdclip.trainer.callbacks import ProgressBar
from hvdclip.trainer.data import InputPlan
from support import make_data, make_mlp
# Op callbacks see every op TensorFlow runs eagerly (and builds in a graph); tfdbg uses them too.
from tensorflow.python.framework import op_callbacks

from training_support import InterruptAt, Interrupted, StepLog, id_dataset, record_batches, resumable_trainer


def trainer_for(model=None, lr=1e-2, **kwargs):
    return hvdclip.HvdClipTrainer(
        model or make_mlp(seed=1), keras.optimizers.SGD(lr), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0), **kwargs
    )


# ---------------------------------------------------------------- input


@pytest.mark.parametrize("shuffle_buffer", [None, 10])
def test_shards_are_disjoint_and_cover_the_data_every_epoch(shuffle_buffer):
    ids = tf.data.Dataset.range(40)
    for seed in (1, 2):
        shards = [list(InputPlan(ids, rank, 4, shuffle_buffer=shuffle_buffer).for_epoch(seed).as_numpy_iterator()) for rank in range(4)]
        flat = [i for shard in shards for i in shard]
        assert sorted(flat) == list(range(40)) and all(len(shard) == 10 for shard in shards)


def test_uneven_known_counts_warn_with_each_ranks_count():
    with pytest.warns(UserWarning, match=r"different numbers of batches \(rank 0: 6, rank 1: 5\)\. Every rank runs 5 steps"):
        EpochLength(5, watch=False, counts=[6, 5]).warn_if_uneven()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EpochLength(5, watch=False, counts=[5, 5]).warn_if_uneven()
        EpochLength(None, watch=True, counts=[-2, 5]).warn_if_uneven()  # Unknown: the loop warns when one runs out.


def write_records(directory, files, per_file):
    names = []
    for f in range(files):
        name = str(directory / f"part-{f}.tfrecord")
        with tf.io.TFRecordWriter(name) as writer:
            for i in range(per_file):
                writer.write(f"{f}-{i}".encode())
        names.append(name)
    return names


def test_shard_by_files_gives_each_rank_its_own_files(tmp_path):
    names = write_records(tmp_path, files=3, per_file=2)
    data = tf.data.TFRecordDataset(names).map(lambda r: (r, r))
    parts = [[x.decode() for x, _ in InputPlan(data, rank, 2, shard="files").for_epoch().as_numpy_iterator()] for rank in range(2)]
    assert parts == [["0-0", "0-1", "2-0", "2-1"], ["1-0", "1-1"]]
    elements = [[x.decode() for x, _ in InputPlan(data, rank, 2, shard="elements").for_epoch().as_numpy_iterator()] for rank in range(2)]
    assert elements == [["0-0", "1-0", "2-0"], ["0-1", "1-1", "2-1"]]


@pytest.mark.parametrize("given, expected", [("auto", "auto"), ("files", "files"), ("elements", "elements"), (True, "elements"), (False, False)])
def test_shard_modes_and_the_old_true(given, expected):
    plan = InputPlan.checked("dataset", id_dataset(4), rank=0, size=1, shard=given)
    assert plan.shard == expected and plan.resolved() is plan  # One rank: nothing to decide.


def test_batch_size_batches_examples_and_drops_the_short_last_batch():
    trainer = resumable_trainer()
    seen = record_batches(trainer)
    trainer.fit(id_dataset(20), epochs=2, batch_size=8, verbose=0)
    assert [len(batch) for batch in seen] == [8, 8, 8, 8]
    assert int(trainer.global_step.numpy()) == 4


def test_shuffle_buffer_reorders_each_epoch_and_without_it_the_order_stays():
    shuffled = resumable_trainer()
    seen = record_batches(shuffled)
    shuffled.fit(id_dataset(32), epochs=2, batch_size=8, shuffle_buffer=32, verbose=0)
    first, second = sum(seen[:4], []), sum(seen[4:], [])
    assert sorted(first) == sorted(second) == list(range(32)) and first != second

    plain = resumable_trainer()
    seen = record_batches(plain)
    plain.fit(id_dataset(32), epochs=2, batch_size=8, verbose=0)
    assert sum(seen[:4], []) == sum(seen[4:], []) == list(range(32))


def test_the_shuffle_follows_keras_global_seed():
    orders = []
    for seed in (5, 5, 6):
        trainer = resumable_trainer(seed=seed)
        seen = record_batches(trainer)
        trainer.fit(id_dataset(32), epochs=1, batch_size=8, shuffle_buffer=32, verbose=0)
        orders.append(seen)
    assert orders[0] == orders[1] and orders[0] != orders[2]


# ---------------------------------------------------------------- validation and evaluate


def test_evaluate_is_the_exact_mean_over_examples_with_a_short_last_batch():
    x, y = make_data(seed=3, n=37)
    trainer = trainer_for()
    mae = keras.metrics.MeanAbsoluteError()
    results = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)), batch_size=16, metrics=[mae])
    errors = trainer.model.predict(x, verbose=0) - y
    assert results["loss"] == pytest.approx(float(np.mean(errors**2)), rel=1e-5)
    assert results["mean_absolute_error"] == pytest.approx(float(np.mean(np.abs(errors))), rel=1e-5)


def test_validation_metrics_are_logged_each_epoch():
    x, y = make_data(seed=3, n=32)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    trainer = trainer_for()
    history = trainer.fit(
        data, epochs=2, batch_size=8, validation_data=data, validation_metrics=[keras.metrics.MeanAbsoluteError()], verbose=0
    )
    assert len(history.history["val_loss"]) == len(history.history["val_mean_absolute_error"]) == 2
    final = trainer.evaluate(data, batch_size=8)
    assert history.history["val_loss"][-1] == pytest.approx(final["loss"], rel=1e-6)


# ---------------------------------------------------------------- callbacks


class Recorder(hvdclip.Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", self.params["epochs"], self.params["steps"]))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch, logs["first_step"]))

    def on_step_end(self, step, logs):
        assert isinstance(logs["loss"], tf.Tensor) and logs["samples"] == 8
        self.calls.append(("step", step))

    def on_epoch_end(self, epoch, logs):
        assert set(logs) >= {"loss", "grad_norm", "clipped_grad_norm", "clip_active", "skipped", "val_loss"}
        assert all(isinstance(value, float) for value in logs.values())
        self.calls.append(("epoch_end", epoch))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end",))


def test_callback_hooks_run_in_order_with_global_steps():
    recorder = Recorder()
    data = id_dataset(16)
    trainer_for().fit(data, epochs=2, batch_size=8, validation_data=data, callbacks=[recorder], verbose=0)
    assert recorder.calls == [
        ("train_begin", 2, 2),
        ("epoch_begin", 0, 0), ("step", 1), ("step", 2), ("epoch_end", 0),
        ("epoch_begin", 1, 0), ("step", 3), ("step", 4), ("epoch_end", 1),
        ("train_end",),
    ]  # fmt: skip


def test_keras_early_stopping_stops_when_the_monitored_metric_stalls():
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1)
    trainer = trainer_for(lr=0.0)  # Nothing changes, so the loss never improves after epoch 0.
    history = trainer.fit(id_dataset(16), epochs=10, batch_size=8, callbacks=[stop], verbose=0)
    # Keras' rule: epoch 0 improves on inf, epoch 1 does not, and patience=1 stops there.
    assert history.epochs == [0, 1] and stop.stopped_epoch == 1 and trainer.stop_training


def test_keras_callbacks_see_the_trainers_model_logs_and_learning_rate(tmp_path):
    seen = []
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1)),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append((batch, sorted(logs)))),
    ]
    trainer = trainer_for()
    history = trainer.fit(id_dataset(16), epochs=2, batch_size=8, callbacks=callbacks, verbose=0)
    step_logs = ["all_have_data", "clip_active", "clipped_grad_norm", "grad_norm", "loss", "samples", "skipped", "synced"]
    assert seen == [(0, step_logs), (1, step_logs)] * 2
    assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(0.05 / 2)  # Scheduled 0.05, then halved.
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "grad_norm" in rows[0] and len(rows) == 3
    assert history.history["learning_rate"] == [pytest.approx(0.1), pytest.approx(0.05)]  # The rate each epoch ran at.


def test_training_metrics_sample_weights_and_class_weights():
    x = np.arange(32, dtype="float32").reshape(16, 2) / 32.0
    labels = (np.arange(16) % 2).astype("int32")
    weights = np.linspace(0.5, 2.0, 16).astype("float32")

    def run(data, **fit_kwargs):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
        trainer = hvdclip.HvdClipTrainer(
            model, keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        history = trainer.fit(tf.data.Dataset.from_tensor_slices(data), batch_size=8, shard=False, verbose=0, **fit_kwargs)
        return trainer, history

    plain, history = run((x, labels))
    assert 0.0 <= history.history["accuracy"][0] <= 1.0
    weighted, _ = run((x, labels, weights))
    by_class, _ = run((x, labels), class_weight={0: 1.0, 1: 3.0})
    same_as_class, _ = run((x, labels, np.where(labels == 1, 3.0, 1.0).astype("float32")))
    flat = lambda t: np.concatenate([v.numpy().ravel() for v in t.model.variables])  # noqa: E731
    assert not np.array_equal(flat(plain), flat(weighted)), "sample weights must reach the loss"
    assert np.array_equal(flat(by_class), flat(same_as_class)), "class_weight is a per-example weight by label"


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda: ProgressBar(verbose=3, sums=StepSums()), ValueError, r"`verbose` must be an integer >= 1 and <= 2. Received: verbose=3"),
        (lambda: ProgressBar(verbose=1, sums=StepSums(), interval=-1), ValueError, r"`interval` must be a number >= 0\. Received: interval=-1"),
        (lambda: hvdclip.TensorBoard(None), TypeError, r"`log_dir` must be a path. Received: log_dir=None"),
        (lambda: hvdclip.TensorBoard("x", every_n_steps=0), ValueError, r"`every_n_steps` must be an integer >= 1"),
    ],
)
def test_callbacks_reject_bad_arguments(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


# ---------------------------------------------------------------- progress


def test_verbose_1_shows_a_progress_bar_with_the_step_metrics(capsys):
    trainer_for().fit(id_dataset(16), epochs=2, batch_size=8, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    for shown in ("2/2", "loss:", "grad_norm:", "clip_rate:", "steps/s:"):
        assert shown in out, out


def test_verbose_2_prints_one_line_per_epoch_and_0_nothing(capsys):
    data = id_dataset(16)
    trainer_for().fit(data, epochs=2, batch_size=8, validation_data=data, verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 4 and lines[0] == "Epoch 1/2"
    assert lines[1].startswith("2/2 - ") and "clip_rate:" in lines[1] and "val_loss:" in lines[1]
    trainer_for().fit(data, epochs=2, batch_size=8, verbose=0)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- bookkeeping inside the compiled step


def counters(trainer):
    state = trainer.engine.fit_state
    return [int(v.numpy()) for v in (state.global_step, state.epoch, state.epoch_step)]


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_history_and_counters_equal_a_reference_built_from_train_step(accumulation_steps):
    x, y = make_data(seed=5, n=48, scale=0.3)  # Gradient norms of 0.7 to 3: some steps clip at 2, some not.

    def make_trainer():
        return hvdclip.HvdClipTrainer(
            make_mlp(seed=1), keras.optimizers.SGD(0.05), keras.losses.MeanSquaredError(),
            clip=hvdclip.clip_by_global_norm(2.0), accumulation_steps=accumulation_steps,
        )

    fitted = make_trainer()
    history = fitted.fit(tf.data.Dataset.from_tensor_slices((x, y)), epochs=2, batch_size=8, verbose=0)

    stepped = make_trainer()
    expected = {}
    for epoch in range(2):
        reports = [stepped.train_step(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
        applied = [r for r in reports if r["synced"] and not r["skipped"]]  # No micro-step's (NaN) norms.
        for name, over in [("loss", reports), ("skipped", [r for r in reports if r["synced"]])] + [
            (name, applied) for name in ("grad_norm", "clipped_grad_norm", "clip_active")
        ]:
            expected.setdefault(name, []).append(sum(float(r[name]) for r in over) / len(over))

    assert history.history == expected, "History must be the float64 means of the steps' metrics, exactly"
    assert 0 < sum(expected["clip_active"]) < 2, "the test should see steps that clip and steps that do not"
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(fitted.model.variables, stepped.model.variables))
    assert counters(fitted) == [12, 2, 0]
    assert counters(stepped)[0] == 12, "train_step runs the same compiled step as fit, so it counts its steps too"
    labels = [label for label, _ in fitted.engine.named_state_variables()]
    assert not any("step_sums" in label for label in labels), "epoch sums are per-rank scratch: not broadcast, not checkpointed"


def test_a_resumed_run_counts_on_and_averages_the_steps_it_ran(tmp_path):
    fit = dict(epochs=3, batch_size=8, shuffle_buffer=48, verbose=0)
    data = id_dataset(48)  # 6 steps per epoch.
    log = StepLog()
    reference = resumable_trainer(seed=1)
    reference.fit(data, callbacks=[log], **fit)

    interrupted = resumable_trainer(seed=1)
    with pytest.raises(Interrupted):
        interrupted.fit(data, callbacks=[hvdclip.CheckpointSaver(tmp_path, every_n_steps=1), InterruptAt(8)], **fit)
    assert counters(interrupted) == [8, 1, 2]
    resumed = resumable_trainer(seed=1, model_seed=9, rng_seed=9)
    resumed.restore(tmp_path)
    assert counters(resumed) == [8, 1, 2]
    resumed_log = StepLog()
    history = resumed.fit(data, callbacks=[resumed_log], **fit)

    assert counters(resumed) == counters(reference) == [18, 3, 0]
    assert resumed_log.steps == {step: log.steps[step] for step in range(9, 19)}
    for index, steps in enumerate([range(9, 13), range(13, 19)]):  # The rest of epoch 1, then epoch 2.
        for name, values in history.history.items():
            assert values[index] == sum(log.steps[step][name] for step in steps) / len(steps), (name, index)


def test_the_live_progress_bar_shows_the_running_means_of_the_epoch_so_far(capsys):
    class Shown(ProgressBar):
        """Keeps the means that each redraw during an epoch shows (not the epoch's last line)."""

        def __init__(self, sums):
            super().__init__(verbose=1, sums=sums, interval=0)  # Redraw after every step.
            self.shown, self.in_step = [], False

        def on_step_end(self, step, logs):
            self.in_step = True
            super().on_step_end(step, logs)
            self.in_step = False

        def _values(self, means):
            if self.in_step:
                self.shown.append(dict(means))
            return super()._values(means)

    trainer = trainer_for()
    bar, log = Shown(trainer.engine.fit_state.epoch_sums), StepLog()
    trainer.fit(id_dataset(24), epochs=2, batch_size=8, callbacks=[log, bar], verbose=0)

    def running_mean(steps):
        averaged = [name for name in log.steps[steps[0]] if name not in ("synced", "all_have_data")]  # Facts, not means.
        return {name: sum(log.steps[step][name] for step in steps) / len(steps) for name in averaged}

    assert bar.shown == [running_mean(steps) for steps in ([1], [1, 2], [1, 2, 3], [4], [4, 5], [4, 5, 6])]
    assert "Epoch 2/2" in capsys.readouterr().out


def test_fit_runs_no_eager_op_per_step_but_the_next_batch_and_the_compiled_step():
    eager_ops = []

    def spy(op_type, inputs, attrs, outputs, op_name=None, graph=None):
        if graph is None:
            eager_ops.append(op_type.decode() if isinstance(op_type, bytes) else op_type)

    class Mark(hvdclip.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            eager_ops.append("<epoch>")

        def on_step_end(self, step, logs):
            eager_ops.append("<step>")

    for accumulation_steps in (1, 2):
        trainer = trainer_for(accumulation_steps=accumulation_steps)
        eager_ops.clear()
        op_callbacks.add_op_callback(spy)
        try:  # verbose=2: the progress bar's per-step hook runs, but never redraws mid-epoch.
            trainer.fit(id_dataset(48), epochs=2, batch_size=8, callbacks=[Mark()], verbose=2)
        finally:
            op_callbacks.remove_op_callback(spy)

        text = " ".join(eager_ops)
        between = [chunk.split() for epoch in text.split("<epoch>")[1:] for chunk in epoch.split("<step>")[1:-1]]
        assert len(between) == 2 * 5, text
        for ops in between:  # The next batch is fetched before the step; before an epoch's last step, none is.
            assert ops[:-1] in ([], ["IteratorGetNext"]) and ops[-1].startswith("__inference__recorded_step"), ops


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"epochs": 0}, ValueError, r"`epochs` must be an integer >= 1. Received: epochs=0"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1. Received: batch_size=0"),
        ({"shuffle_buffer": 2.5}, TypeError, r"`shuffle_buffer` must be an integer >= 1. Received: shuffle_buffer=2.5"),
        ({"shard": "yes"}, ValueError, r"`shard` must be 'auto', 'files', 'elements' or False \(True means 'elements'\). Received: shard='yes'"),
        ({"verbose": 3}, ValueError, r"`verbose` must be an integer >= 0 and <= 2. Received: verbose=3"),
        ({"validation_data": [1]}, TypeError, r"`validation_data` must be a tf.data.Dataset of \(x, y\) or \(x, y, sample_weight\) batches. Received: validation_data=\[1\]"),
        ({"validation_metrics": ["mae"]}, TypeError, r"`validation_metrics` must be a list of keras.metrics.Metric objects"),
        ({"validation_metrics": [keras.metrics.MeanAbsoluteError()]}, ValueError, r"`validation_metrics` needs `validation_data`"),
        ({"callbacks": [print]}, TypeError, r"`callbacks` must be a list of Keras callbacks or hvdclip.Callback objects. Received: callbacks\[0\]="),
        ({"callbacks": keras.callbacks.EarlyStopping()}, TypeError, r"`callbacks` must be a list of Keras callbacks .*Received: callbacks=<"),
        ({"class_weight": [1.0, 2.0]}, TypeError, r"`class_weight` must be a dict from class index .*Received: class_weight=\[1\.0, 2\.0\]"),
        ({"class_weight": {0: -1.0}}, ValueError, r"`class_weight\[0\]` must be a number >= 0\. Received: class_weight\[0\]=-1\.0"),
    ],
)
def test_fit_rejects_bad_arguments_before_any_step(kwargs, error, pattern):
    trainer = trainer_for()
    with pytest.raises(error, match=pattern):
        trainer.fit(tf.data.Dataset.from_tensor_slices(make_data(seed=0, n=8)).batch(4), **kwargs)
    assert trainer.broadcast_count == 0


def test_evaluate_rejects_bad_metrics():
    data = tf.data.Dataset.from_tensor_slices(make_data(seed=0, n=8)).batch(4)
    with pytest.raises(ValueError, match=r"`metrics` must have distinct names other than 'loss'"):
        trainer_for().evaluate(data, metrics=[keras.metrics.Mean(name="loss")])
