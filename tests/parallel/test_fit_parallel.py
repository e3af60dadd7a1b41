"""`fit` on 2 ranks: sharding, uneven data, exact validation, resume, rank-0-only output, shared errors.

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
from hvdclip.distributed import consistency
from hvdclip.distributed.bridge import as_tf_variables
from support import allgather, checksum, make_data, make_mlp
from training_support import (
    InterruptAt,
    Interrupted,
    StepLog,
    id_dataset,
    record_batches,
    resumable_trainer,
    state_values,
)




def plain_trainer(model=None, lr=1e-2):
    return hvdclip.HvdClipTrainer(
        model or make_mlp(seed=1), keras.optimizers.SGD(lr), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0)
    )


def test_each_rank_trains_on_its_own_disjoint_shard_every_epoch(world):
    trainer = resumable_trainer()
    seen = record_batches(trainer)
    trainer.fit(id_dataset(64), epochs=2, batch_size=8, shuffle_buffer=64, verbose=0)
    ids = allgather(np.array(seen).reshape(2, -1))  # [rank, epoch, ids of the epoch]
    # Dropout's seed state is each rank's own by design; everything else must be identical.
    seeds = {id(v) for v in consistency.seed_generator_states(trainer.model)}
    weights = allgather(checksum([v for v in trainer.model.variables if id(v) not in seeds]))

    for epoch in range(2):
        assert sorted(np.concatenate([ids[0, epoch], ids[1, epoch]])) == list(range(64)), f"epoch {epoch} is not a partition"
    assert not np.array_equal(ids[:, 0], ids[:, 1]), "each epoch should be reshuffled"
    assert (weights == weights[0]).all()


def test_an_uneven_dataset_warns_on_rank_0_and_every_rank_runs_the_shortest_shard(world):
    rank, _ = world
    trainer = plain_trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(id_dataset(41), epochs=1, batch_size=3, verbose=0)  # Shards of 21 and 20: 7 and 6 batches.
    uneven = [w for w in caught if "different numbers of batches (rank 0: 7, rank 1: 6)" in str(w.message)]
    facts = allgather(np.array([len(uneven), int(trainer.global_step.numpy())]))

    assert facts[:, 0].tolist() == [1, 0], "rank 0, and only rank 0, warns"
    assert facts[:, 1].tolist() == [6, 6], "both ranks run the shortest shard's steps"


def test_validation_metrics_are_the_exact_mean_over_uneven_shards(world):
    x, y = make_data(seed=4, n=13)  # Shards of 7 and 6 examples.
    trainer = plain_trainer()
    data = tf.data.Dataset.from_tensor_slices((x, y))
    results = trainer.evaluate(data, batch_size=4, metrics=[keras.metrics.MeanAbsoluteError()])
    errors = trainer.model.predict(x, verbose=0) - y  # The whole set, on this rank alone.
    rows = allgather(np.array([results["loss"], results["mean_absolute_error"]]))
    expected = np.array([np.mean(errors**2), np.mean(np.abs(errors))])

    assert np.array_equal(rows[0], rows[1]), "every rank gets the same result"
    np.testing.assert_allclose(rows[0], expected, rtol=1e-5)


def test_resuming_on_two_ranks_ends_with_the_uninterrupted_weights(world, shared_dir):
    rank, _ = world
    fit = dict(epochs=3, batch_size=4, shuffle_buffer=48, verbose=0)
    data = id_dataset(48)  # 6 steps per epoch on each rank.
    reference = resumable_trainer(seed=1)
    reference.fit(data, **fit)

    interrupted = resumable_trainer(seed=1)
    crashed = False
    try:
        interrupted.fit(data, callbacks=[hvdclip.CheckpointSaver(shared_dir, every_n_steps=1), InterruptAt(8)], **fit)
    except Interrupted:
        crashed = True
    # Each rank starts from different weights and RNG: only the restore and the broadcast can align them.
    resumed = resumable_trainer(seed=1, model_seed=9 + rank, rng_seed=9 + rank)
    step = resumed.restore(shared_dir)
    resumed.fit(data, **fit)

    # Dropout's seed state is rank-local by design (each rank draws its own masks): compare it per
    # rank with the uninterrupted run, and everything else across ranks too.
    seeds = [v.numpy() for v in consistency.seed_generator_states(reference.model)]
    resumed_seeds = [v.numpy() for v in consistency.seed_generator_states(resumed.model)]
    local = {id(v) for v in as_tf_variables(consistency.rank_local_variables(reference.model))}
    shared = [v.numpy() for _, v in reference.engine.named_state_variables() if id(v) not in local]
    local = {id(v) for v in as_tf_variables(consistency.rank_local_variables(resumed.model))}
    resumed_shared = [v.numpy() for _, v in resumed.engine.named_state_variables() if id(v) not in local]
    sums = allgather(np.stack([checksum(shared), checksum(resumed_shared)]))
    facts = allgather(np.array([crashed, step, resumed.broadcast_count, checksum(seeds)[0] == checksum(resumed_seeds)[0]]))
    seed_rows = allgather(checksum(seeds))

    assert facts.tolist() == [[1, 8, 1, 1], [1, 8, 1, 1]], "resumed seed states must equal the uninterrupted run's on each rank"
    assert (sums == sums[0, 0]).all(), "resumed weights differ from the uninterrupted run's, or between ranks"
    assert not (seed_rows == seed_rows[0]).all(), "each rank's dropout seed state should be its own"


def test_only_rank_0_writes_checkpoints_logs_and_the_model(world, shared_dir):
    rank, _ = world
    mine = os.path.join(shared_dir, f"rank{rank}")  # Each rank names its own place; only rank 0 may use it.
    trainer = resumable_trainer()
    callbacks = [hvdclip.CheckpointSaver(os.path.join(mine, "ckpts")), hvdclip.TensorBoard(os.path.join(mine, "logs"), every_n_steps=2)]
    trainer.fit(id_dataset(32), epochs=2, batch_size=4, callbacks=callbacks, verbose=0)
    trainer.save(os.path.join(mine, "model.keras"))
    written = allgather(
        np.array(
            [
                os.path.exists(os.path.join(mine, "ckpts", "checkpoint")),
                bool(tf.io.gfile.glob(os.path.join(mine, "logs", "events.out.tfevents.*"))),
                os.path.exists(os.path.join(mine, "model.keras")),
                os.path.exists(mine),
            ]
        )
    )

    assert written[0].tolist() == [True, True, True, True]
    assert written[1].tolist() == [False, False, False, False], "rank 1 wrote or created something"


def test_only_rank_0_shows_progress(world, capfd):
    trainer = plain_trainer()
    trainer.fit(id_dataset(16), epochs=2, batch_size=4, verbose=1)
    out = capfd.readouterr().out
    shown = allgather(np.array([len(out), "Epoch 2/2" in out, "clip_rate:" in out, "steps/s:" in out]))

    assert shown[0, 0] > 0 and shown[0, 1:].all(), "rank 0 shows the bar with its metrics"
    assert shown[1].tolist() == [0, 0, 0, 0], "rank 1 prints nothing"


class StopOnRank1(hvdclip.Callback):
    def on_epoch_end(self, epoch, logs):
        if hvd.rank() == 1:
            self.trainer.stop_training = True


def test_ranks_stop_together_and_share_the_epoch_logs(world):
    rank, _ = world
    x, y = make_data(seed=20 + rank, n=32)  # Different data, so per-rank losses differ.
    trainer = plain_trainer()
    history = trainer.fit(
        tf.data.Dataset.from_tensor_slices((x, y)), epochs=5, batch_size=8, shard=False, callbacks=[StopOnRank1()], verbose=0
    )
    epochs = allgather(np.array(history.epochs))
    losses = allgather(np.array(history.history["loss"]))

    assert epochs.tolist() == [[0], [0]], "a stop asked by one rank stops every rank after that epoch"
    assert losses[0, 0] == losses[1, 0], "epoch logs are averaged over ranks, so identical"


def test_history_is_the_mean_of_every_ranks_step_metrics(world):
    rank, _ = world
    x, y = make_data(seed=30 + rank, n=32)  # Different data, so per-rank losses differ: 4 steps per epoch.
    trainer = plain_trainer()
    log = StepLog()
    history = trainer.fit(
        tf.data.Dataset.from_tensor_slices((x, y)), epochs=2, batch_size=8, shard=False, callbacks=[log], verbose=0
    )
    names = sorted(history.history)
    sums = [[sum(log.steps[step][name] for step in steps) for name in names] for steps in (range(1, 5), range(5, 9))]
    every_sum = allgather(np.array(sums))  # [rank, epoch, metric]: this rank's float64 sum of the epoch's steps.
    every_history = allgather(np.array([history.history[name] for name in names]).T)  # [rank, epoch, metric]

    assert names == ["clip_active", "clipped_grad_norm", "grad_norm", "loss", "skipped"]
    assert np.array_equal(every_history[0], every_history[1]), "every rank gets the same History"
    np.testing.assert_array_equal(every_history[0], (every_sum[0] + every_sum[1]) / 8)


def error_on_every_rank(action):
    try:
        action()
    except hvdclip.HvdClipError as error:
        return f"{type(error).__name__}: {error}"
    return ""


def test_an_unwritable_checkpoint_directory_raises_on_every_rank(world, shared_dir):
    blocker = os.path.join(shared_dir, "a_file")
    if hvd.rank() == 0:
        with open(blocker, "w") as handle:
            handle.write("not a directory")
    trainer = plain_trainer()
    saver = hvdclip.CheckpointSaver(os.path.join(blocker, "ckpts"))
    message = error_on_every_rank(lambda: trainer.fit(id_dataset(16), batch_size=4, callbacks=[saver], verbose=0))
    raised = allgather(np.array(["OutputDirectoryError: `directory` is not a writable directory" in message, trainer.broadcast_count]))

    assert raised.tolist() == [[1, 1], [1, 1]], message


def test_restoring_a_different_model_raises_on_every_rank(world, shared_dir):
    saved = plain_trainer(make_mlp(seed=1, hidden=16))
    saved.fit(id_dataset(16), batch_size=4, callbacks=[hvdclip.CheckpointSaver(shared_dir)], verbose=0)
    wider = plain_trainer(make_mlp(seed=1, hidden=32, name="wider"))
    message = error_on_every_rank(lambda: wider.restore(shared_dir))
    raised = allgather(np.array(["CheckpointError" in message and "'model/wider/dense" in message and "(8, 32)" in message]))

    assert raised.tolist() == [[True], [True]], message
