"""Elastic `fit`: lose a host and keep training on the others; add one and grow.

`HvdClipTrainer.fit(..., elastic=hvdclip.Elastic(commit_every=100))`, launched with
`hvdclip-run --elastic --min-np N --max-np M --host-discovery-script S` (Horovod's elastic mode,
Gloo), runs the epochs inside Horovod's elastic loop (`horovod.common.elastic.run_fn`):

    sync (broadcast from rank 0) -> train, committing every n steps and at each epoch end
      a collective fails (a rank died)  -> restore the last commit -> shutdown, init -> sync -> train
      discovery changed (at a commit)   -> shutdown, init (the new ranks join) -> sync -> train

What a commit holds, and a sync sends, is what the start-up broadcast sends: the model's
variables, the optimizer's, the clip state (AutoClip history, ZClip statistics), the skip counters
and `fit`'s position and RNG. A commit is a copy to host memory on every rank, plus one small
broadcast to learn of discovery changes. On a re-entry `fit` re-shards the data for the new world
size and continues its epoch from the committed step, exactly as a checkpoint restored at that
world size would (`docs/elastic.md` states what that proves).

The learning-rate rule for the new size is `Elastic(learning_rate=...)`: `"scale"` keeps the
per-example rate (the rate is proportional to the number of ranks, as the linear scaling rule and
`ScaledWarmup` have it); `"keep"` leaves it alone.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from horovod.common.elastic import State, run_fn
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
from horovod.tensorflow.functions import broadcast_object

from hvdclip import foreign
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip.errors import CheckpointError, ElasticResetError
from hvdclip.keras.schedules import ScaledWarmup
from hvdclip.validation import check_int

__all__ = ["Elastic", "ElasticState", "rescale_learning_rate", "run_elastic"]

LEARNING_RATE_RULES = ("scale", "keep")


@dataclass(frozen=True)
class Elastic:
    """How `HvdClipTrainer.fit` runs in an elastic job (`hvdclip-run --elastic`).

    Args:
        commit_every: commit the state every this many global steps (and at every epoch end);
            `None` commits at epoch ends only. A failure loses the work since the last commit;
            a commit costs a copy of the state to host memory and one small broadcast.
        learning_rate: what a change of world size does to the optimizer's learning rate.
            `"scale"` (default) keeps the rate per example: it is multiplied by new size / old
            size (a `ScaledWarmup` schedule gets the new size instead). `"keep"` leaves it.

    Example:
        >>> trainer.fit(dataset, epochs=10, elastic=hvdclip.Elastic(commit_every=50))
    """

    commit_every: int | None = 100
    learning_rate: str = "scale"

    def __post_init__(self) -> None:
        if self.commit_every is not None:
            check_int("commit_every", self.commit_every, ge=1)
        if not isinstance(self.learning_rate, str) or self.learning_rate not in LEARNING_RATE_RULES:
            raise (ValueError if isinstance(self.learning_rate, str) else TypeError)(
                f"`learning_rate` must be one of {LEARNING_RATE_RULES}. Received: learning_rate={self.learning_rate!r}"
            )


def check_elastic(value: Any) -> Elastic | None:
    """`fit`'s `elastic=`: an `Elastic`, True (the defaults), or None/False (not elastic)."""
    if value is None or value is False:
        return None
    if isinstance(value, Elastic):
        return value
    if value is True:
        return Elastic()
    raise TypeError(f"`elastic` must be an hvdclip.Elastic(...), True, False or None. Received: elastic={value!r}")


def _scaled_warmup(optimizer: Any) -> ScaledWarmup | None:
    rate = foreign.learning_rate_object(optimizer)
    return rate if isinstance(rate, ScaledWarmup) else None


def rescale_learning_rate(optimizer: Any, old_size: int, new_size: int) -> None:
    """Keeps the per-example learning rate when the world size goes from `old_size` to `new_size`.

    A rate held in a variable is multiplied by `new_size / old_size`; a `ScaledWarmup` schedule is
    given `new_size` (its factor at each step follows). Any other schedule cannot be rescaled:
    use `Elastic(learning_rate="keep")` or wrap it in `ScaledWarmup`. Every rank must call it with
    the same sizes, so the result is the same everywhere.
    """
    rate = foreign.learning_rate_object(optimizer)  # A LossScaleOptimizer's rate is its inner one's.
    if isinstance(rate, ScaledWarmup):
        rate.size = new_size  # A Python number in the compiled step: the caller retraces.
    elif isinstance(rate, tf.Variable) or hasattr(rate, "assign"):
        rate.assign(rate * (new_size / old_size))
    else:
        raise ValueError(
            f"Elastic(learning_rate='scale') cannot rescale a {type(rate).__name__} learning rate. Wrap it in "
            "`hvdclip.ScaledWarmup`, or pass `Elastic(learning_rate='keep')`."
        )


def check_rescalable(optimizer: Any) -> None:
    """Raises at the start of `fit` (not at the first reset) if `rescale_learning_rate` could not work."""
    rate = foreign.learning_rate_object(optimizer)
    if not (isinstance(rate, ScaledWarmup) or isinstance(rate, tf.Variable) or hasattr(rate, "assign")):
        raise ValueError(
            f"Elastic(learning_rate='scale') cannot rescale a {type(rate).__name__} learning rate at a change of "
            "world size. Wrap the schedule in `hvdclip.ScaledWarmup`, or pass `Elastic(learning_rate='keep')`."
        )


class ElasticState(State):
    """The trainer's whole state for Horovod's elastic loop: committed, restored, synchronised.

    `save` copies every variable the start-up broadcast sends to host memory (this rank's values:
    seed generators differ per rank, rank-local BatchNorm statistics too); `restore` puts the copy
    back and drops the history of epochs finished after it; `sync` broadcasts rank 0's state to
    every rank of the new world (the start-up broadcast again, with its structure check), agrees on
    the size the learning rate was set for and applies the learning-rate rule.

    Attributes:
        lr_size: the world size the optimizer's learning rate is set for (rank 0's at the start).
        commits, resets: how many of each this rank has done.
        reset_log: one `(cause, old size, new size, committed step, seconds)` per reset.
    """

    def __init__(self, engine: Any, policy: Elastic, history: Any, sample_batch: Any) -> None:
        super().__init__(bcast_object=_broadcast_object, get_rank=hvd.rank)
        self._engine = engine
        self._policy = policy
        self._history = history
        self._sample_batch = sample_batch
        self._saved: tuple | None = None
        self.lr_size = hvd.size()
        self._traced_size = hvd.size()
        self.commits = 0
        self.resets = 0
        self.reset_log: list[tuple[str, int, int, int, float]] = []
        self._reset_started: tuple[str, int, float] | None = None
        self._failures_since_commit = 0
        self._commit_due = False

    # ------------------------------------------------------------------ Horovod's State interface

    def _variables(self) -> list:
        # The shared state and this rank's own (its accumulation sums, zero at a commit: commits
        # wait for the end of a window).
        return [v for _, v in self._engine.named_state_variables() + self._engine.local_state_variables()]

    def save(self) -> None:
        values = [np.array(variable.numpy(), copy=True) for variable in self._variables()]
        history = ({name: len(values) for name, values in self._history.history.items()}, len(self._history.epochs))
        self._saved = (values, self.lr_size, history, self._engine.optimizer_steps)

    def restore(self) -> None:
        if self._saved is None:
            return
        values, self.lr_size, (lengths, epochs), self._engine.optimizer_steps = self._saved
        for variable, value in zip(self._variables(), values):
            variable.assign(value)
        for name in list(self._history.history):
            if name in lengths:
                del self._history.history[name][lengths[name] :]
            else:
                del self._history.history[name]
        del self._history.epochs[epochs:]

    def sync(self) -> None:
        try:
            self._sync()
        except (HorovodInternalError, tf.errors.OpError) as error:
            # A peer lost during the sync (a second host, or the joining one): reset again.
            mapped = self.failed(error, hvd.size())
            if mapped is error:
                raise
            raise mapped from error

    def _sync(self) -> None:
        engine = self._engine
        restore_error = None
        # The bound of a first step: a joining rank may still be building and tracing.
        with default_watchdog().section("the elastic state's broadcast from rank 0", compiling=True):
            if engine.started:
                engine.rebroadcast()
            else:
                read, engine.deferred_restore = engine.deferred_restore, None
                if hvd.rank() == 0 and read is not None:
                    # `restore` in an elastic job: rank 0 reads, the broadcast sends it to every rank.
                    # Only the job's first sync gets here on rank 0 (later, rank 0 is an older host).
                    try:
                        engine.take_restored(read())
                    except CheckpointError as error:
                        restore_error = str(error)
                    engine.discard_window_sums()
                engine.start(self._sample_batch)
            # Rank 0 decides, so a joining rank (fresh, nothing pending) continues where the others are.
            fit_state, warmup = engine.fit_state, _scaled_warmup(engine.optimizer)
            (self.lr_size, resuming, engine.optimizer_steps, warmup_size, restore_error) = (
                self._bcast_object(
                    (self.lr_size, fit_state.resuming, engine.optimizer_steps, warmup and warmup.size, restore_error)
                )
            )
            fit_state.resume_here(resuming)
        if restore_error is not None:
            raise CheckpointError(restore_error)  # On every rank: rank 0 could not restore.
        if warmup is not None:
            warmup.size = warmup_size  # A joining rank made its schedule with its own world's size.
        size = hvd.size()
        if self._policy.learning_rate == "scale" and self.lr_size != size:
            rescale_learning_rate(engine.optimizer, self.lr_size, size)
            self.lr_size = size
        if size != self._traced_size:
            engine.retrace()  # Whatever the step read from Python at trace time (a schedule's size).
            self._traced_size = size
        if self._reset_started is not None:
            cause, old_size, started = self._reset_started
            self.reset_log.append((cause, old_size, size, int(engine.fit_state.global_step.numpy()), time.monotonic() - started))
            self._reset_started = None
            if hvd.rank() == 0:
                print(
                    f"hvdclip elastic: {cause}; world size {old_size} -> {size}; continuing from the commit at global "
                    f"step {int(engine.fit_state.global_step.numpy())} after {self.reset_log[-1][-1]:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
        self.save()  # A failure before the first commit comes back here.

    def reset(self) -> None:
        """After a failure or a discovery change, before the next sync: drop what no commit holds."""
        self._engine.prepare_for_reentry()
        self._engine.fit_state.resume_here()  # Re-entered, `fit` continues from the committed position.
        self.resets += 1

    # ------------------------------------------------------------------ hvdclip's use

    def commit(self) -> None:
        """Saves the state and raises `HostsUpdatedInterrupt` on every rank if discovery changed."""
        self.commits += 1
        self._failures_since_commit = 0
        self._commit_due = False
        super().commit()

    def maybe_commit(self, global_step: int, *, epoch_end: bool = False) -> None:
        """Commits at epoch ends and every `commit_every` steps; inside a gradient-accumulation window
        (local sums no commit holds), at the first step after it instead."""
        every = self._policy.commit_every
        if epoch_end or (every is not None and global_step % every == 0):
            self._commit_due = True
        if self._commit_due and self._engine.between_windows():
            self.commit()

    def began_reset(self, cause: str, old_size: int) -> None:
        self._reset_started = (cause, old_size, time.monotonic())

    def failed(self, error: BaseException, size: int) -> BaseException:
        """What to raise for `error`: HorovodInternalError (restore and reset) for a lost peer, else `error`."""
        if not is_collective_failure(error):
            return error
        self._failures_since_commit += 1
        if self._failures_since_commit > MAX_RESETS_WITHOUT_A_COMMIT:
            # The same failure again and again: not a peer that a smaller world leaves behind.
            return ElasticResetError(
                f"A collective failed again after {MAX_RESETS_WITHOUT_A_COMMIT} elastic resets with no commit in "
                f"between, so the job ends instead of resetting forever. The last failure: {error}"
            )
        self.began_reset("a rank failed" if isinstance(error, HorovodInternalError) else "a collective failed", size)
        return error if isinstance(error, HorovodInternalError) else HorovodInternalError(error)


def _broadcast_object(obj: Any) -> Any:
    return broadcast_object(obj, root_rank=0, name="hvdclip_elastic_object")


# What a Horovod collective reports when a peer died or left. A graph error's message also holds the
# Python stack where the failing op was defined (which passes through horovod/common/elastic.py), so
# only these op types and Horovod's own sentence count, and only on the error types Horovod raises.
_COLLECTIVE_FAILURE = re.compile(
    r"Horovod has been shut down|Horovod(Grouped)?(Allreduce|Allgather|Broadcast|Alltoall|Reducescatter)"
)
# Failures in a row that a reset answered without a commit in between: past this, the error is not a
# lost peer that a smaller world can train without, and the job ends with it.
MAX_RESETS_WITHOUT_A_COMMIT = 3


def is_collective_failure(error: BaseException) -> bool:
    """A failed Horovod collective (a peer died or left): what the elastic loop recovers from."""
    if isinstance(error, HorovodInternalError):
        return True
    return isinstance(error, tf.errors.UnknownError) and bool(_COLLECTIVE_FAILURE.search(str(error.message)))


def run_elastic(state: ElasticState, train: Callable[[ElasticState], Any]) -> Any:
    """Runs `train(state)` in Horovod's elastic loop, recovering from failed collectives and resizes.

    `train` must run every collective of the job after the loop's first sync (Horovod's rule: a
    collective outside it could pair with a joining worker's sync and deadlock).
    """

    def attempt(state: ElasticState) -> Any:
        size = hvd.size()
        try:
            return train(state)
        except HostsUpdatedInterrupt:
            state.began_reset("the hosts changed", size)
            # Always sync, removals too (Horovod skips the sync when hosts were only removed): the
            # learning-rate rule, the retrace and the log run in the sync.
            raise HostsUpdatedInterrupt(False) from None
        except (HorovodInternalError, tf.errors.OpError) as error:
            mapped = state.failed(error, size)
            if mapped is error:
                raise
            raise mapped from error

    return run_fn(attempt, _reset)(state)


def _reset() -> None:
    hvd.shutdown()
    hvd.init()
