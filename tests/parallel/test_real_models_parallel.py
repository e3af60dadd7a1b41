"""Real models on 2 ranks (issue 13): local BatchNorm, per-rank randomness, uneven and file-based data,
epoch means over applied steps.

Every rank runs every test; collectives first, asserts after (see conftest.py).
"""

import os
import warnings

import horovod.tensorflow as hvd
import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
import hvdclip.keras
from support import allgather, checksum, make_data, make_mlp
from training_support import (
    StepLog,
    batch_norm_cnn,
    dropout_mlp,
    id_dataset,
    images,
    parsed_records,
    record_batches,
    write_records,
)




def cnn_trainer(**kwargs):
    return hvdclip.HvdClipTrainer(
        batch_norm_cnn(seed=3), keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError(),
        clip=hvdclip.clip_by_global_norm(1.0), **kwargs,
    )


def batch_norm_statistics(model):
    """Each BatchNormalization layer's moving mean and variance (Keras variables), in layer order."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    return [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]


def statistics(model):
    return [v.numpy().copy() for v in batch_norm_statistics(model)]


# ---------------------------------------------------------------- 2. local BatchNorm


def test_the_guard_ignores_local_batch_norm_statistics_and_names_a_real_drift(world):
    rank, _ = world
    trainer = cnn_trainer(check_consistency_every=2)
    x, y = images(seed=rank, n=10 * 8)  # Each rank's data has its own mean and scale: its BN statistics drift.
    false_alarm, raised_at = None, None
    for step in range(1, 11):
        if step == 7 and rank == 1:
            kernel = trainer.model.trainable_variables[3]
            kernel.assign(kernel + 1e-7)  # A real drift, on one rank only.
        try:
            trainer.train_step(x[(step - 1) * 8 : step * 8], y[(step - 1) * 8 : step * 8])
        except hvdclip.RankMismatchError as error:
            (raised_at, false_alarm) = ((step, str(error)), None) if step >= 7 else (None, str(error))
            break
        if step == 6:
            local = allgather(checksum(statistics(trainer.model)))
    steps = allgather(np.array([raised_at[0] if raised_at else -1]))
    drifted = trainer.model.trainable_variables[3].path

    assert false_alarm is None, f"a false alarm on BatchNorm's rank-local statistics: {false_alarm}"
    assert not (local == local[0]).all(), "the ranks' moving statistics should differ, or the test proves nothing"
    assert steps.tolist() == [[8], [8]], "both ranks raise at the first check after the drift"
    message = raised_at[1]
    assert f"'model/{drifted}'" in message and "differs on rank(s) [1]" in message, message
    assert "a trainable weight changed outside the training step on some ranks" in message, message


def test_checkpoints_save_and_evaluate_use_the_ranks_mean_statistics(world, shared_dir):
    rank, _ = world

    class Record(hvdclip.Callback):  # Runs before the saver: each rank's own statistics at the epoch's end.
        def on_epoch_end(self, epoch, logs):
            self.before = statistics(self.trainer.model)

    trainer = cnn_trainer()
    record = Record()
    x, y = images(seed=rank, n=32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    trainer.fit(data, epochs=1, shard=False, callbacks=[record, hvdclip.CheckpointSaver(os.path.join(shared_dir, "ckpts"))], verbose=0)
    before = allgather(np.concatenate([s.ravel() for s in record.before]))
    saved = np.zeros_like(before[0])
    if rank == 0:
        reader = tf.train.load_checkpoint(os.path.join(shared_dir, "ckpts"))
        labels = [label.decode() for label in reader.get_tensor("labels/.ATTRIBUTES/VARIABLE_VALUE")]
        local = {v.path for v in batch_norm_statistics(trainer.model)}
        saved = np.concatenate(
            [reader.get_tensor(f"state/{i}/.ATTRIBUTES/VARIABLE_VALUE").ravel() for i, label in enumerate(labels) if label[len("model/"):] in local]
        )
    saved = allgather(saved)[0]
    after_fit = allgather(checksum(statistics(trainer.model)))

    # Train on further, different data, then save and evaluate: both average again.
    for step in range(3):
        trainer.train_step(*images(seed=10 + rank + step, n=8))
    trained = allgather(np.concatenate([s.ravel() for s in statistics(trainer.model)]))
    path = os.path.join(shared_dir, "model.keras")
    trainer.save(path)
    exported = np.zeros_like(before[0])
    if rank == 0:
        loaded = keras.models.load_model(path)
        exported = np.concatenate([s.ravel() for s in statistics(loaded)])
    exported = allgather(exported)[0]
    trainer.train_step(*images(seed=20 + rank, n=8))
    untouched = allgather(np.concatenate([s.ravel() for s in statistics(trainer.model)]))
    trainer.evaluate(data)
    evaluated = allgather(np.concatenate([s.ravel() for s in statistics(trainer.model)]))

    assert not np.allclose(before[0], before[1]), "the ranks' statistics should differ before the save"
    np.testing.assert_allclose(saved, before.mean(axis=0), rtol=1e-6, atol=1e-7, err_msg="checkpoint is not the ranks' mean")
    assert (after_fit == after_fit[0]).all(), "after the averaging every rank holds the same statistics"
    np.testing.assert_allclose(exported, trained.mean(axis=0), rtol=1e-6, atol=1e-7, err_msg="save() is not the ranks' mean")
    np.testing.assert_allclose(evaluated[0], untouched.mean(axis=0), rtol=1e-6, atol=1e-7)
    assert np.array_equal(evaluated[0], evaluated[1])


# ---------------------------------------------------------------- 3. randomness


def masks_after(start, seed=1):
    """Dropout outputs of a fresh model on the same input on every rank, after `start(model)`."""
    keras.utils.set_random_seed(seed)
    model = dropout_mlp(seed=seed)
    start(model)
    x = np.ones((16, 8), "float32")
    return [model(x, training=True).numpy().ravel() for _ in range(2)]


def start_trainer(model):
    hvdclip.HvdClipTrainer(model, keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError()).engine.start()


def start_clipper(model):
    hvdclip.Clipper(keras.optimizers.SGD(0.01), hvdclip.clip_by_global_norm(1.0)).broadcast_initial_state(model)


def start_keras_fit(model):
    model.compile(optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    hvdclip.keras.broadcast_initial_state(model)


@pytest.mark.parametrize("start", [start_trainer, start_clipper, start_keras_fit], ids=["trainer", "tape", "keras_fit"])
def test_each_rank_draws_its_own_dropout_masks_reproducibly(world, start):
    first = masks_after(start)
    again = masks_after(start)
    other_seed = masks_after(start, seed=2)
    rows = allgather(np.stack(first))  # [rank, call, values]
    same = allgather(np.array([all(np.array_equal(a, b) for a, b in zip(first, again))]))
    moved = allgather(np.array([not np.array_equal(first[0], other_seed[0])]))

    assert not np.array_equal(rows[0, 0], rows[1, 0]), "ranks drew the same dropout mask"
    assert not np.array_equal(rows[0, 0], rows[0, 1]), "a rank's masks should change from call to call"
    assert same.all(), "the same seed must give the same masks on each rank"
    assert moved.all(), "another seed must give other masks"


# ---------------------------------------------------------------- 4. uneven and unknown-length data


def generated(rank, batches):
    """A generator dataset (unknown length) of `batches` batches of 4, different on each rank."""
    x, y = make_data(seed=50 + rank, n=4 * batches)

    def gen():
        for i in range(batches):
            yield x[i * 4 : (i + 1) * 4], y[i * 4 : (i + 1) * 4]

    spec = (tf.TensorSpec((None, 8), tf.float32), tf.TensorSpec((None, 1), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=spec)


@pytest.mark.parametrize("steps_per_epoch", [None, 10])
def test_unknown_length_data_ends_the_epoch_where_the_first_rank_runs_out(world, steps_per_epoch):
    rank, _ = world
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=4), keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(generated(rank, 7 if rank == 0 else 4), epochs=2, steps_per_epoch=steps_per_epoch, shard=False, verbose=0)
    ran_out = [str(w.message) for w in caught if "ran out of data" in str(w.message)]
    facts = allgather(np.array([int(trainer.global_step.numpy()), len(ran_out), len(history.history["loss"])]))
    weights = allgather(checksum(trainer.model.variables))

    assert facts.tolist() == [[8, 2, 2], [8, 0, 2]], "4 steps per epoch on both ranks; rank 0 warns each epoch"
    assert rank != 0 or "rank(s) [1] ran out of data after 4 batches" in ran_out[0], ran_out
    assert rank != 0 or "rank 0: more than 4, rank 1: 4" in ran_out[0], ran_out
    assert (weights == weights[0]).all()


def test_three_files_on_two_ranks_never_hang(world, shared_dir):
    rank, _ = world
    names = write_records(shared_dir, files=3, per_file=6) if rank == 0 else None
    names = hvd.broadcast_object(names, root_rank=0, name="hvdclip_test_record_names")
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=5), keras.optimizers.SGD(0.001), keras.losses.MeanSquaredError())
    seen = record_batches(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(parsed_records(names), epochs=1, steps_per_epoch=10, batch_size=1, verbose=0)
    ran_out = [str(w.message) for w in caught if "ran out of data" in str(w.message)]
    files = allgather(np.array(sorted({int(ids[0]) for ids in seen}) + [-1] * (2 - len({int(ids[0]) for ids in seen}))))
    facts = allgather(np.array([len(seen), len(ran_out)]))

    assert facts.tolist() == [[6, 1], [6, 0]], "rank 1's one file has 6 records: every rank stops at 6"
    # Rank 0 holds files 0 and 2 and reads file 0 first; rank 1 holds file 1.
    assert files[0].tolist() == [0, -1] and files[1].tolist() == [1, -1], "shard='auto' gives each rank its own files"


# ---------------------------------------------------------------- 5. sharding


def test_auto_shards_by_file_and_falls_back_to_elements_with_a_warning(world, shared_dir):
    rank, _ = world
    names = write_records(shared_dir, files=4, per_file=4) if rank == 0 else None
    names = hvd.broadcast_object(names, root_rank=0, name="hvdclip_test_record_names_2")
    results = []
    for files, shard in ((names, "auto"), (names[:1], "auto"), (names, "elements")):
        trainer = hvdclip.HvdClipTrainer(make_mlp(seed=6), keras.optimizers.SGD(0.001), keras.losses.MeanSquaredError())
        seen = record_batches(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(parsed_records(files), epochs=1, batch_size=1, shard=shard, verbose=0)
        fewer = sum("reads fewer files than there are ranks" in str(w.message) for w in caught)
        results.append((sorted({int(ids[0]) for ids in seen}), len(seen), fewer))
    by_file = allgather(np.array(results[0][0] + [results[0][1], results[0][2]]))
    one_file = allgather(np.array([len(results[1][0]), results[1][1], results[1][2]]))
    elements = allgather(np.array([len(results[2][0]), results[2][1]]))

    assert by_file.tolist() == [[0, 2, 8, 0], [1, 3, 8, 0]], "4 files: each rank reads 2 of its own"
    assert one_file.tolist() == [[1, 2, 1], [1, 2, 0]], "1 file: by element, 2 records each, rank 0 warns"
    assert elements.tolist() == [[4, 8], [4, 8]], "'elements' reads every file on every rank"


def test_files_that_cannot_be_split_refuse_shard_files_on_every_rank(world):
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=6), keras.optimizers.SGD(0.001), keras.losses.MeanSquaredError())
    try:
        trainer.fit(id_dataset(8), batch_size=2, shard="files", verbose=0)
        message = ""
    except ValueError as error:
        message = str(error)
    raised = allgather(np.array([bool(message)]))
    assert raised.all()
    assert "`shard='files'` needs `dataset` to read files" in message and "Received: shard='files'" in message


def test_an_order_that_differs_between_ranks_is_detected(world):
    rank, _ = world
    warned = []
    for seed in (rank, 7):  # A per-rank order (as an unseeded shuffle gives), then a shared one.
        trainer = hvdclip.HvdClipTrainer(make_mlp(seed=6), keras.optimizers.SGD(0.001), keras.losses.MeanSquaredError())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(id_dataset(32).shuffle(32, seed=seed), batch_size=4, verbose=0)
        warned.append(sum("start with different elements" in str(w.message) for w in caught))
    counts = allgather(np.array(warned))
    assert counts.tolist() == [[1, 0], [0, 0]], "rank 0 warns once, and only when the orders differ"


# ---------------------------------------------------------------- 6. epoch means


def test_epoch_metrics_average_over_applied_steps_only(world):
    rank, _ = world
    # A loss scale so large that the first steps overflow and are skipped (halving it each time).
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.001), initial_scale=2.0**126)
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=8), optimizer, keras.losses.MeanSquaredError())
    log = StepLog()
    x, y = make_data(seed=60 + rank, n=8 * 8)
    history = trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, shard=False, callbacks=[log], verbose=0)
    steps = [log.steps[s] for s in sorted(log.steps)]
    applied_norms = [s["grad_norm"] for s in steps if not s["skipped"]]
    skipped = sum(s["skipped"] for s in steps)
    rows = allgather(np.array([history.history["grad_norm"][0], history.history["skipped"][0]]))

    assert 0 < skipped < len(steps), f"the test needs skipped and applied steps; skipped {skipped} of {len(steps)}"
    assert np.isfinite(rows).all(), rows
    np.testing.assert_allclose(rows[:, 0], np.mean(applied_norms), rtol=1e-6)
    np.testing.assert_allclose(rows[:, 1], skipped / len(steps), rtol=1e-12)
