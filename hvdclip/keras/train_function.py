"""hvdclip's train function for Keras `fit`: Keras' own `train_step`, started right and kept in step.

Keras' `fit` calls `model.train_function(iterator)` once per step; its own takes the next batch
and runs `train_step`. `compile` with hvdclip's `DistributedOptimizer` installs this one instead
(`foreign.record_compile_arguments` runs the hook after Keras' own `compile`), which runs the same
`model.train_step`, compiled once:

* **start-up, before the first step**: the checks (`hvdclip.keras.broadcast.prepare_fit`); then,
  unless something has already sent it (`BroadcastGlobalVariablesCallback`, an elastic state's
  sync), the one broadcast of rank 0's state. A model without an `Input`, which Keras builds only
  when it traces the first step, is first built from the first batch, so its variables exist to
  be sent. No step ever runs on weights that differ between ranks.
* **every rank's epochs in step**: at each epoch's start the ranks agree on its length (one
  allgather of each rank's number of batches, which `BroadcastGlobalVariablesCallback` reads from
  Keras; without it the length counts as unknown): known and equal, every rank runs them; known
  but different, every rank runs the shortest rank's (rank 0 warns with each rank's count),
  each step after the first taking its batch inside the compiled function, as Keras' own train
  function does; unknown on some rank, every rank runs over `hvdclip.Lockstep` until the first step after which
  some rank has none left (each step carries this rank's "I have a next batch" in its gradient
  allreduce: the vote). A known count is trusted, as Keras trusts `steps_per_epoch`: data that
  ends before it ends one rank's epoch alone, and the watchdog ends the ranks left waiting;
* when the epoch ends early on a rank, the function raises `StopIteration`, which is how Keras'
  own train function ends an epoch.

The step is compiled without XLA whatever `compile(jit_compile=...)` resolved to: Horovod's
collectives have no XLA kernels here (`hvdclip.keras.xla` says what is done about it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from hvdclip import foreign
from hvdclip.core.lockstep import UNKNOWN, EpochLength, Lockstep, agree_epoch_length
from hvdclip.distributed.runtime import launched_elastically, rank
from hvdclip.keras.startup import broadcast_initial_state, prepare_fit
from hvdclip.keras.optimizer import DistributedOptimizer

__all__ = ["TrainFunction", "install"]


class TrainFunction:
    """`model.train_function` for a model compiled with hvdclip's `DistributedOptimizer`."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.optimizer = model.optimizer
        self._compiled = tf.function(self._one_step, reduce_retracing=True)
        # An agreed epoch's steps take their batch inside the compiled step, as Keras' own train
        # function does: no eager fetch and no hand-over of the batch's tensors per step.
        self._compiled_next = tf.function(self._next_step)
        self._iterator: Any = None
        self._batches: Iterator | None = None
        self._length: EpochLength | None = None  # This epoch's, once agreed; None: unknown.
        self._done = 0  # Steps of this epoch so far.
        self._warned = False

    def _one_step(self, data: Any, has_data: Any) -> Any:
        with self.optimizer.voting(has_data):
            return self.model.train_step(data)

    def _next_step(self, iterator: Any) -> Any:
        return self._one_step(next(iterator), None)

    def begin_epoch(self, batches: int | None) -> None:
        """The ranks agree on this epoch's length from each one's number of `batches` (None: unknown)."""
        self._length = agree_epoch_length(UNKNOWN if batches is None else int(batches), None)
        self._done = 0
        if rank() == 0 and not self._warned and len(set(self._length.counts)) > 1 and not self._length.watch:
            self._length.warn_if_uneven()
            self._warned = True

    def _start(self, data: Any) -> None:
        """Before the first step: the checks, then (unless it already happened) the start-up broadcast."""
        if not self.model.built:  # A model without `Input`: Keras would build it while tracing the step.
            self.model(data[0] if isinstance(data, (tuple, list)) else data)
        prepare_fit(self.model)
        if not self.optimizer.state_broadcast and not launched_elastically():
            broadcast_initial_state(self.model)

    @property
    def _started(self) -> bool:
        """The start-up (checks, the broadcast) is done: no step needs a batch in hand for it."""
        return self.optimizer.built and self.optimizer.state_broadcast

    def _step(self, data: Any, has_data: Any) -> Any:
        if not self._started:
            self._start(data)
        return self._compiled(data, has_data)

    def __call__(self, iterator: Any) -> Any:
        if not isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            # `train_on_batch` and friends: a Python iterator of the given batch, on every rank alike.
            logs = None
            for _, data in zip(range(self.model.steps_per_execution), iterator):
                logs = self._step(data, None)
            return logs
        if iterator is not self._iterator:  # A new pass over the data (Keras keeps one across epochs with steps_per_epoch).
            self._iterator = iterator
            agreed = self._length is not None and not self._length.watch  # Every rank runs `steps`.
            self._batches = None if agreed else iter(Lockstep(iterator, self.optimizer.clipper))
        logs = None
        cap = None if self._length is None else self._length.steps
        for _ in range(self.model.steps_per_execution):
            if cap is not None and self._done >= cap:
                break
            if self._batches is not None:
                item = next(self._batches, None)
                if item is None:
                    break
                logs = self._step(*item)
            elif not self._started:
                data = next(iterator, None)  # The first step: the start-up needs a batch in hand.
                if data is None:
                    break
                logs = self._step(data, None)
            else:
                try:
                    logs = self._compiled_next(iterator)
                except (StopIteration, tf.errors.OutOfRangeError):  # A trusted count longer than the data.
                    break
            self._done += 1
        if logs is None:
            self._iterator = None  # Keras starts the next epoch with a new iterator.
            raise StopIteration
        return logs


def install(model: keras.Model) -> None:
    """After `model.compile`: hvdclip's train function, if the model's optimizer is hvdclip's (Keras keeps it)."""
    if isinstance(getattr(model, "optimizer", None), DistributedOptimizer):
        model.train_function = TrainFunction(model)


foreign.record_compile_arguments(after=install)
