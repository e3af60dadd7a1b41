"""Every rank's loop runs the same number of steps, whatever its data: agreed lengths and the has-data vote.

A rank whose data ends while the others go on would leave them waiting in the next gradient
allreduce for ever. Two ways keep the ranks in step, and every door uses them:

* **Lengths known on every rank** (`agree_epoch_length`): one allgather at the start of the epoch,
  and every rank runs the shortest rank's number of steps (capped by `steps_per_epoch`); rank 0
  warns with each rank's count when they differ. No vote and no look-ahead are needed.
* **Some rank's length unknown** (a generator, TFRecord files): `Lockstep` fetches this rank's
  next batch *before* each step and yields it with `has_next`; the step hands it to the core,
  where it rides in the gradient allreduce (`hvdclip.Reduction`'s flags), and the step's
  `all_have_data` says whether every rank has one. After the first step where some rank has no
  next batch, every rank stops: the epoch ends at the shortest rank's length, found as it goes.
  With gradient accumulation (k micro-batches per step) the vote is taken at each window's last
  micro-batch, about the *next whole window*: micro-steps communicate nothing, so a rank must not
  start a window it cannot finish. An epoch then ends at the last window every rank can fill; the
  batches of a trailing partial window are not used (with known lengths, windows simply continue
  into the next epoch).
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from hvdclip.distributed.collectives import agree_min, allgather_int64
from hvdclip.distributed.watchdog import default_watchdog

__all__ = ["EpochLength", "Lockstep", "agree_epoch_length", "UNKNOWN", "INFINITE"]

UNKNOWN = int(tf.data.UNKNOWN_CARDINALITY)
INFINITE = int(tf.data.INFINITE_CARDINALITY)


@dataclass(frozen=True)
class EpochLength:
    """How long an epoch is, as every rank agreed at its start.

    Attributes:
        steps: steps per epoch; None when the epoch ends only when some rank runs out of data.
        watch: the epoch runs under `Lockstep` (some rank's length is unknown).
        counts: each rank's number of batches per epoch (negative: unknown or infinite).
    """

    steps: int | None
    watch: bool
    counts: list[int] = field(default_factory=list)

    def warn_if_uneven(self) -> None:
        """Warns with each rank's count when known counts differ (call it on rank 0 only)."""
        if self.watch or len(set(self.counts)) <= 1:
            return
        shown = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(self.counts))
        warnings.warn(
            f"The ranks' data have different numbers of batches ({shown}). Every rank runs {self.steps} "
            "steps per epoch, the shortest rank's, so the longer ranks' last batches are skipped each epoch; "
            "data that splits evenly uses them all.",
            stacklevel=4,
        )


def agree_epoch_length(count: int, steps_per_epoch: int | None, argument: str = "dataset") -> EpochLength:
    """The epoch's length from each rank's `count` of batches (`UNKNOWN`, `INFINITE` or >= 0): one allgather.

    Raises:
        ValueError: on every rank, when some rank's data (`argument`) is infinite and `steps_per_epoch` is None.
    """
    with default_watchdog().section("agreeing on the steps per epoch"):
        counts = [int(c) for c in allgather_int64([count], "cardinality")]
    if steps_per_epoch is None and INFINITE in counts:
        infinite = [rank for rank, c in enumerate(counts) if c == INFINITE]
        where = "" if len(counts) == 1 else f" on rank(s) {infinite}"
        raise ValueError(
            f"`{argument}` is infinite (it repeats){where}, so an epoch would never end. Pass `steps_per_epoch`, or "
            f"drop the `repeat()`. Received: cardinality={count}"
        )
    if UNKNOWN in counts:
        return EpochLength(steps_per_epoch, watch=True, counts=counts)
    finite = [c for c in counts if c >= 0]
    shortest = min(finite) if finite else steps_per_epoch
    steps = shortest if steps_per_epoch is None else min(shortest, steps_per_epoch)
    return EpochLength(steps, watch=False, counts=counts)


class Lockstep:
    """This rank's batches, one step ahead, ending every rank's loop after the same step.

    For data whose length some rank does not know (with every rank's length known, agree on the
    shortest instead: `agree_epoch_length`, and no vote is needed).

    Args:
        batches: this rank's batches (a `tf.data.Dataset`, an iterator, or any iterable).
        clipper: the `hvdclip.Clipper` whose steps consume them; its accumulation decides the
            window, and its last vote when to stop.

    Yields `(batch, has_next)`, `has_next` a bool scalar tensor to pass to the step's
    `DistributedGradientTape(..., has_data=has_next)` (or `Clipper.step(..., has_data=...)`):
    at each window's last micro-batch (every step, without accumulation), whether this rank holds
    the whole next window. Before the first batch the ranks agree (one small allreduce) that each
    has a first window; after each step that voted, the loop stops on every rank if some rank has
    nothing more.

    Example:
        >>> for (x, y), has_next in hvdclip.Lockstep(dataset, clipper):
        ...     loss, report = train_step(x, y, has_next)
    """

    def __init__(self, batches: Iterable, clipper: Any) -> None:
        if not isinstance(batches, (Iterable, Iterator)):
            raise TypeError(f"`batches` must be an iterable of batches, e.g. a tf.data.Dataset. Received: batches={batches!r}")
        from hvdclip.core.step import Clipper  # Not at import: the step module's users import this one.

        if not isinstance(clipper, Clipper):
            raise TypeError(f"`clipper` must be the hvdclip.Clipper that runs the steps. Received: clipper={clipper!r}")
        self._batches = batches
        self._clipper = clipper
        self.steps = 0  # Steps yielded by the last iteration.
        self.ran_out = False  # The last iteration stopped because some rank had no more data.
        self.had_more = False  # This rank still had data when it stopped (another rank ran out first).

    def __iter__(self) -> Iterator[tuple[Any, tf.Tensor]]:
        batches = iter(self._batches)
        acc = self._clipper.accumulation
        window = 1 if acc is None else acc.steps
        # A restored state may be inside a window: this one's first window is the rest of that one.
        position = 0 if acc is None else int(acc.micro_step.numpy())
        pending = deque(itertools.islice(batches, window - position))
        self.steps, self.ran_out, self.had_more = 0, False, False
        with default_watchdog().section("agreeing that every rank has a first window of batches"):
            if not agree_min(len(pending) == window - position, "lockstep_first_window"):
                self.ran_out, self.had_more = True, len(pending) == window - position
                return  # Some rank cannot fill even the first window: no rank steps.
        yes = tf.constant(True)
        while pending:
            batch = pending.popleft()
            closes_window = position == window - 1
            position = (position + 1) % window
            if closes_window:
                pending.extend(itertools.islice(batches, window))
                has_next = len(pending) == window
            else:
                has_next = True  # Micro-steps do not vote: the vote was about this whole window.
            self.steps += 1
            yield batch, (yes if has_next else tf.constant(False))
            if closes_window and not bool(self._clipper.all_have_data.numpy()):
                self.ran_out, self.had_more = True, has_next
                return
