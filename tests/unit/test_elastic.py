"""Elastic `fit` in one process: commits, a failure's restore and re-entry, a discovery change, the
learning-rate rule. (Across hosts, with ranks really dying and joining: tests/cluster/test_elastic.py.)"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from horovod.common.exceptions import HorovodInternalError
from horovod.runner.elastic.worker import HostUpdateResult

import hvdclip
from hvdclip.trainer.elastic import ElasticState, rescale_learning_rate
from support import make_data, make_mlp

EPOCHS, BATCH = 3, 8


def trainer():
    keras.utils.set_random_seed(5)  # Before the trainer: it seeds its shuffle RNG from Keras' global seed.
    return hvdclip.HvdClipTrainer(
        make_mlp(seed=4), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(),
        clip=hvdclip.autoclip(percentile=50, history=16),
    )  # fmt: skip


def dataset():
    x, y = make_data(seed=8, n=96)  # 12 steps per epoch
    return tf.data.Dataset.from_tensor_slices((x, y))


def fit(job, callbacks=(), **elastic):
    return job.fit(
        dataset(), epochs=EPOCHS, batch_size=BATCH, shuffle_buffer=32, callbacks=list(callbacks), verbose=0,
        elastic=hvdclip.Elastic(**elastic) if elastic else None,
    )  # fmt: skip


def weights(job):
    return [v.numpy() for v in job.model.trainable_variables]


@pytest.fixture
def elastic_launch(monkeypatch):
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")  # What horovodrun --min-np/--max-np sets for its workers.
    # A process started without a launcher runs Horovod over MPI, which cannot be initialised twice:
    # here a reset keeps the world (of one) instead of `shutdown(); init()`, which the cluster test runs.
    resets = []
    monkeypatch.setattr("hvdclip.trainer.elastic._reset", lambda: resets.append(1))
    return resets


@pytest.fixture(scope="module")
def uninterrupted():
    job = trainer()
    history = fit(job)
    return weights(job), history.history["loss"]


class FailOnce(hvdclip.Callback):
    """Raises what a failed collective becomes, once, after global step `step`."""

    def __init__(self, step):
        self.step, self.failed = step, False

    def on_step_end(self, step, logs):
        if step == self.step and not self.failed:
            self.failed = True
            raise HorovodInternalError("a peer was lost (simulated)")


class Record(hvdclip.Callback):
    def __init__(self):
        self.steps, self.begins = [], 0

    def on_train_begin(self, logs=None):
        self.begins += 1

    def on_step_end(self, step, logs):
        self.steps.append(step)


def test_outside_an_elastic_launch_fit_warns_and_trains_as_usual(uninterrupted):
    job = trainer()
    with pytest.warns(UserWarning, match=r"not launched elastically.*hvdclip-run --elastic"):
        fit(job, commit_every=5)
    assert job.engine.elastic_state is None
    assert all(np.array_equal(a, b) for a, b in zip(weights(job), uninterrupted[0]))


def test_commits_every_n_steps_and_at_epoch_ends_without_changing_the_result(elastic_launch, uninterrupted):
    job = trainer()
    history = fit(job, commit_every=5)
    # Steps 5, 10, 15, 20, 25, 30, 35 and the ends of epochs 0 and 1 (12, 24); not after the last epoch.
    assert job.engine.elastic_state.commits == 9
    assert job.engine.elastic_state.resets == 0 and job.broadcast_count == 1
    assert all(np.array_equal(a, b) for a, b in zip(weights(job), uninterrupted[0]))
    assert history.history["loss"] == uninterrupted[1]


# Mid-epoch; on an epoch's last step (before the epoch's end commits); right after that commit.
@pytest.mark.parametrize("fail_after", [7, 12, 13])
def test_a_failed_collective_restores_the_last_commit_and_redoes_the_steps_exactly(elastic_launch, uninterrupted, fail_after):
    job, record = trainer(), Record()
    history = fit(job, [record, FailOnce(fail_after)], commit_every=5)
    state = job.engine.elastic_state
    committed = max(s for s in (5, 10, 12) if s < fail_after)  # A step commits after its callbacks ran.
    assert [entry[:4] for entry in state.reset_log] == [("a rank failed", 1, 1, committed)]
    # The steps after the commit ran twice; everything else once, and the result is the uninterrupted run's.
    assert record.steps == list(range(1, fail_after + 1)) + list(range(committed + 1, 12 * EPOCHS + 1))
    assert all(np.array_equal(a, b) for a, b in zip(weights(job), uninterrupted[0]))
    assert history.epochs == [0, 1, 2] and len(history.history["loss"]) == EPOCHS
    assert record.begins == 2  # on_train_begin runs at every entry, on every rank
    assert job.broadcast_count == 2  # the start-up broadcast, and the sync after the reset


def test_a_discovery_change_resets_at_the_next_commit_without_losing_a_step(elastic_launch, uninterrupted):
    job, record = trainer(), Record()

    class HostAdded(hvdclip.Callback):
        def on_step_end(self, step, logs):
            if step == 7:  # what Horovod's driver sends a worker when discovery lists a new host
                job.engine.elastic_state.on_hosts_updated(1.0, HostUpdateResult.added)

    fit(job, [record, HostAdded()], commit_every=5)
    assert [entry[:4] for entry in job.engine.elastic_state.reset_log] == [("the hosts changed", 1, 1, 10)]
    assert record.steps == list(range(1, 12 * EPOCHS + 1))  # the commit at step 10 kept everything
    assert all(np.array_equal(a, b) for a, b in zip(weights(job), uninterrupted[0]))


def test_restore_puts_back_every_variable_and_forgets_epochs_finished_after_the_commit():
    job = trainer()
    x, _ = make_data(seed=8, n=BATCH)
    job.engine.start(x)
    history = hvdclip.History({"loss": [1.0]}, [0])
    state = ElasticState(job.engine, hvdclip.Elastic(), history, x)
    state.save()
    before = [v.numpy().copy() for _, v in job.engine.named_state_variables()]
    for _, variable in job.engine.named_state_variables():
        variable.assign(tf.ones_like(variable) if variable.dtype.is_floating else variable + 1)
    history.history["loss"].append(2.0)
    history.history["val_loss"] = [3.0]
    history.epochs.append(1)
    state.restore()
    after = [v.numpy() for _, v in job.engine.named_state_variables()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert history.history == {"loss": [1.0]} and history.epochs == [0]


def test_the_learning_rate_rule_keeps_the_rate_per_example():
    adam = keras.optimizers.Adam(0.03)
    adam.build([tf.Variable(1.0)])
    rescale_learning_rate(adam, 3, 2)
    assert float(adam.learning_rate) == pytest.approx(0.02)
    warmup = hvdclip.ScaledWarmup(0.01, steps_per_epoch=10, size=4)
    sgd = keras.optimizers.SGD(warmup)
    rescale_learning_rate(sgd, 4, 2)
    assert warmup.size == 2
    decay = keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9))
    with pytest.raises(ValueError, match=r"cannot rescale a ExponentialDecay learning rate.*ScaledWarmup.*'keep'"):
        rescale_learning_rate(decay, 2, 3)


def test_fit_refuses_a_schedule_the_rule_cannot_rescale_before_training(elastic_launch):
    job = hvdclip.HvdClipTrainer(
        make_mlp(seed=4), keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)),
        keras.losses.MeanSquaredError(),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"Elastic\(learning_rate='scale'\) cannot rescale"):
        fit(job, commit_every=5)
    assert job.broadcast_count == 0
    fit(job, commit_every=5, learning_rate="keep")  # the way out the message names


def test_restore_in_an_elastic_job_is_read_at_the_first_sync_and_resumes_exactly(elastic_launch, tmp_path, uninterrupted):
    saver = hvdclip.CheckpointSaver(tmp_path / "ckpts", every_n_steps=5, max_to_keep=20)
    trainer().fit(dataset(), epochs=EPOCHS, batch_size=BATCH, shuffle_buffer=32, callbacks=[saver], verbose=0)
    job = trainer()
    # No collective here (a joining rank would meet the others' sync): the read waits for fit's first sync.
    assert job.restore(str(tmp_path / "ckpts" / "ckpt-15")) == 0 and job.engine.deferred_restore is not None
    record = Record()
    fit(job, [record], commit_every=5)
    assert record.steps == list(range(16, 12 * EPOCHS + 1))
    assert all(np.array_equal(a, b) for a, b in zip(weights(job), uninterrupted[0]))


def test_only_horovods_collective_failures_count_as_a_lost_peer():
    from hvdclip.trainer.elastic import is_collective_failure

    stack = 'File "/venv/lib/python3.11/site-packages/horovod/common/elastic.py", line 164, in wrapper'
    assert is_collective_failure(tf.errors.UnknownError(None, None, f"[{stack}] Horovod has been shut down."))
    assert is_collective_failure(tf.errors.UnknownError(None, None, "node HorovodGroupedAllreduce_grad_0 failed"))
    assert is_collective_failure(HorovodInternalError("lost"))
    # A user's own error in the compiled step, whose message carries Horovod's frames: not a lost peer.
    assert not is_collective_failure(tf.errors.InvalidArgumentError(None, None, f"indices[3] = 9 is not in [0, 4) {stack}"))
    assert not is_collective_failure(tf.errors.UnknownError(None, None, f"a user's py_function failed {stack}"))


def test_a_failure_that_comes_back_without_a_commit_ends_the_job_after_three_resets(elastic_launch):
    class AlwaysFail(hvdclip.Callback):
        def on_step_end(self, step, logs):
            if step == 7:
                raise HorovodInternalError("the same failure every time")

    job = trainer()
    with pytest.raises(hvdclip.ElasticResetError, match=r"after 3 elastic resets .*the same failure every time"):
        fit(job, [AlwaysFail()], commit_every=5)
    assert [entry[3] for entry in job.engine.elastic_state.reset_log] == [5, 5, 5]


def test_a_discovery_change_that_only_removes_hosts_still_syncs(elastic_launch, uninterrupted):
    job = trainer()

    class HostRemoved(hvdclip.Callback):
        def on_step_end(self, step, logs):
            if step == 7:  # Horovod skips the sync for a removal; hvdclip must not (the learning-rate rule runs there)
                job.engine.elastic_state.on_hosts_updated(1.0, HostUpdateResult.removed)

    fit(job, [HostRemoved()], commit_every=5)
    assert [entry[:4] for entry in job.engine.elastic_state.reset_log] == [("the hosts changed", 1, 1, 10)]
    assert job.broadcast_count == 2
    assert all(np.array_equal(a, b) for a, b in zip(weights(job), uninterrupted[0]))


def test_with_gradient_accumulation_a_due_commit_waits_for_the_end_of_the_window(elastic_launch):
    keras.utils.set_random_seed(5)
    job = hvdclip.HvdClipTrainer(
        make_mlp(seed=4), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), accumulation_steps=2
    )  # fmt: skip
    fit(job, commit_every=3)
    # Due at 3, 6, ..., 33 and at the ends of epochs 0 and 1 (steps 12, 24); taken at the next even step.
    assert job.engine.elastic_state.commits == len([4, 6, 10, 12, 16, 18, 22, 24, 28, 30, 34])


def test_a_checkpoint_that_cannot_be_restored_raises_on_every_rank_at_the_first_sync(elastic_launch, tmp_path):
    job = trainer()
    assert job.restore(str(tmp_path / "nothing-here")) == 0  # read at the first sync, not now
    with pytest.raises(hvdclip.CheckpointError, match="nothing-here"):
        fit(job, commit_every=5)


def test_restore_in_an_elastic_launch_still_applies_when_training_starts_outside_fit(elastic_launch, tmp_path):
    saver = hvdclip.CheckpointSaver(tmp_path / "ckpts", every_n_steps=5, max_to_keep=20)
    trainer().fit(dataset(), epochs=1, batch_size=BATCH, callbacks=[saver], verbose=0)
    job = trainer()
    job.restore(str(tmp_path / "ckpts" / "ckpt-10"))
    x, _ = make_data(seed=8, n=BATCH)
    job.engine.start(x)
    assert int(job.global_step.numpy()) == 10 and job.engine.deferred_restore is None
