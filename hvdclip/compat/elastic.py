"""Horovod's elastic API on Keras 3: `run` and the states of `horovod.tensorflow(.keras).elastic`.

Horovod's elastic loop (`horovod.common.elastic.run_fn`: sync, train, restore and reset on a
failed collective, reset on a host change) and its Keras callbacks touch no Keras variable, so
they are used as they are. What breaks on Keras 3 is replaced here:

* Horovod's `TensorFlowKerasState` and `KerasState` call `optimizer.variables()` (a list on
  Keras 3) and Horovod's variable broadcast, which fails on Keras 3 variables. These save, restore
  and broadcast `model.variables` and `optimizer.variables` through
  `hvdclip.compat.collectives.broadcast_variables` (positional names, a structure check). The
  optimizer is built first if it is not (Keras 3 creates its variables then), so every rank,
  a joining one too, holds the same list. `optimizer.variables` of hvdclip's
  `DistributedOptimizer` include its clip state and counters, so they reach a joining rank.
* Horovod's `TensorFlowState` broadcasts its variables when it is made (a collective outside the
  elastic loop) and, under TensorFlow 2, never at a sync, so a joining rank keeps its own values.
  This one broadcasts at every sync, as the Keras states do.
* Horovod's `run` turns a failed allreduce, allgather or broadcast into a reset but returns
  None, silently, for any other `tf.errors.UnknownError`, and misses the grouped allreduce (its
  `HorovodGroupedAllreduce` op) that gradient reductions use. This `run` recognises Horovod's
  collective failures as `hvdclip.trainer.elastic.is_collective_failure` does, and re-raises
  every other error.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import horovod.tensorflow as hvd
import keras
import tensorflow as tf
from horovod.common.elastic import ObjectState, run_fn
from horovod.common.exceptions import HorovodInternalError
from horovod.tensorflow.functions import broadcast_object
from horovod.tensorflow.keras.elastic import CommitStateCallback, UpdateBatchStateCallback, UpdateEpochStateCallback

from hvdclip.compat.collectives import broadcast_variables

__all__ = [
    "CommitStateCallback",
    "KerasState",
    "TensorFlowKerasState",
    "TensorFlowState",
    "UpdateBatchStateCallback",
    "UpdateEpochStateCallback",
    "run",
]


def run(func: Callable) -> Callable:
    """Decorates `func(state, ...)` to run in Horovod's elastic loop, as Horovod's `run` does.

    Before each attempt every rank syncs `state` from rank 0; a failed Horovod collective (a rank
    died or left) restores the last commit, re-initialises Horovod with the ranks that are left
    and tries again; a host change (raised by `state.commit()`) re-initialises and syncs. Every
    other error propagates. As in Horovod, run every collective of the job inside `func`: one
    outside could pair with a joining rank's sync.

    Example:
        >>> @hvd.elastic.run
        ... def train(state):
        ...     while state.batch < 100:
        ...         training_step(*batches[state.batch])
        ...         state.batch += 1
        ...         state.commit()
    """
    if not callable(func):
        raise TypeError(f"`func` must be a function taking the state first. Received: func={func!r}")

    @functools.wraps(func)
    def attempt(state, *args, **kwargs):
        with _failed_collectives_reset():
            return func(state, *args, **kwargs)

    return run_fn(attempt, _reset)


@contextlib.contextmanager
def _failed_collectives_reset():
    """Turns a failed Horovod collective into HorovodInternalError, on which Horovod's loop restores and resets."""
    # Imported here: hvdclip.trainer imports hvdclip.keras, whose package imports this module.
    from hvdclip.trainer.elastic import is_collective_failure

    try:
        yield
    except tf.errors.OpError as error:
        if not is_collective_failure(error):
            raise
        raise HorovodInternalError(error) from error


def _reset() -> None:
    hvd.shutdown()
    hvd.init()


class _VariablesState(ObjectState):
    """An `ObjectState` that also saves, restores and syncs a list of variables (rank 0's at a sync)."""

    def __init__(self, **kwargs: Any) -> None:
        self._saved_values: list = []
        self._save_variables()
        super().__init__(bcast_object=broadcast_object, get_rank=hvd.rank, **kwargs)

    def tracked_variables(self) -> list:
        raise NotImplementedError

    def save(self) -> None:
        self._save_variables()
        super().save()

    def restore(self) -> None:
        for variable, value in zip(self.tracked_variables(), self._saved_values):
            variable.assign(value)
        super().restore()

    def sync(self) -> None:
        with _failed_collectives_reset():  # A rank lost during the sync.
            broadcast_variables(self.tracked_variables(), root_rank=0)
            self._save_variables()
            super().sync()

    def _save_variables(self) -> None:
        # A copy on the variable's device, as Horovod's states keep it.
        self._saved_values = [tf.identity(variable) for variable in self.tracked_variables()]


class TensorFlowKerasState(_VariablesState):
    """The state of a Keras 3 model and its optimizer for Horovod's elastic loop; Horovod's signature.

    `save` (each `commit`) copies `model.variables` and `optimizer.variables`; `restore` puts the
    copy back; `sync` sends rank 0's to every rank (a joining one too), then the `kwargs`.

    Args:
        model: a built Keras 3 model.
        optimizer: the optimizer; default `model.optimizer`. Built here if it is not yet.
        backend: TensorFlow 1's Keras backend, for Horovod's signature; ignored.
        kwargs: more state to sync (e.g. `batch=0, epoch=0`), exposed as attributes.
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None, backend=None, **kwargs):
        del backend  # TensorFlow 1 only (a session to run the broadcast in).
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
        if not model.built:
            raise ValueError(
                f"`model` {model.name!r} must be built first: run `model.build(input_shape)` or call it on a batch."
            )
        optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a Keras 3 optimizer, or None with a compiled `model`. "
                f"Received: optimizer={optimizer!r}"
            )
        self.model = model
        self.optimizer = optimizer
        super().__init__(**kwargs)

    def tracked_variables(self) -> list:
        if not self.optimizer.built:
            # Keras 3 creates an optimizer's variables when it is built; every rank must hold them
            # before the first commit or sync, or a joining rank's list would be shorter.
            self.optimizer.build(self.model.trainable_variables)
        return list(self.model.variables) + list(self.optimizer.variables)

    def sync(self) -> None:
        super().sync()
        from hvdclip.keras.optimizer import DistributedOptimizer  # hvdclip.keras imports this module.

        if isinstance(self.optimizer, DistributedOptimizer):
            # Its clip state and counters came with `optimizer.variables`: rank 0's state is everywhere.
            self.optimizer.state_broadcast = True


class KerasState(TensorFlowKerasState):
    """`TensorFlowKerasState` for Keras; Horovod's signature (`horovod.tensorflow.keras.elastic.KerasState`).

    Example:
        >>> state = hvd.elastic.KerasState(model, batch=0, epoch=0)
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None, **kwargs):
        super().__init__(model, optimizer=optimizer, **kwargs)


class TensorFlowState(_VariablesState):
    """The state of a list of variables for Horovod's elastic loop; Horovod's signature.

    Args:
        variables: the Keras 3 variables or `tf.Variable`s to track. Required: TensorFlow 2 has
            no global-variable collection for Horovod's default.
        session: TensorFlow 1's session; must be None.
        kwargs: more state to sync, exposed as attributes.
    """

    def __init__(self, variables: Sequence | None = None, session=None, **kwargs):
        if session is not None:
            raise ValueError(f"`session` must be None: TensorFlow 2 runs eagerly. Received: session={session!r}")
        if not isinstance(variables, Iterable) or isinstance(variables, (tf.Variable, keras.Variable, str)):
            raise TypeError(
                "`variables` must be a list of variables (TensorFlow 2 keeps no global variables for Horovod's "
                f"default). Received: variables={variables!r}"
            )
        self.variables = list(variables)
        for variable in self.variables:
            if not isinstance(variable, (tf.Variable, keras.Variable)):
                raise TypeError(f"`variables` must hold Keras 3 variables or tf.Variables. Received an item {variable!r}")
        super().__init__(**kwargs)

    def tracked_variables(self) -> list:
        return self.variables

