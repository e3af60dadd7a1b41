"""The gradient-transform protocol and its combinator.

A transform is a pair of functions:

* `init(variables) -> state`: a nest of tensors (possibly `()`), built once before step 1. The
  trainer stores it in non-trainable `tf.Variable`s, so it is broadcast from rank 0 with the
  model, checkpointed, and identical on every rank.
* `update(grads, state, variables) -> (grads, state)`: pure; receives the *reduced* gradient list
  (dense tensors, `tf.IndexedSlices` or `None`, aligned with `variables`) and the current state
  (read from those variables), and returns new gradients and the new state to store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from hvdclip.gradients import Gradient

__all__ = ["GradientTransform", "chain", "check_transform", "identity", "stateless"]

InitFn = Callable[[Sequence[tf.Variable]], Any]
UpdateFn = Callable[[list[Gradient], Any, Sequence[tf.Variable]], tuple[list[Gradient], Any]]


class GradientTransform(NamedTuple):
    """An `init`/`update` pair; see the module docstring for the contract."""

    init: InitFn
    update: UpdateFn


def check_transform(name: str, value: Any, *, optional: bool = False) -> GradientTransform | None:
    """Refuses anything but a `GradientTransform` whose `init` and `update` are callable (or None if `optional`).

    A `GradientTransform(1.0, None)` is a NamedTuple like any other, so without this check it would
    fail only when the trainer first calls it, deep inside a traced step.
    """
    if optional and value is None:
        return None
    if not isinstance(value, GradientTransform) or not (callable(value.init) and callable(value.update)):
        what = "a GradientTransform such as hvdclip.clip_by_global_norm(1.0)" + (", or None" if optional else "")
        raise TypeError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return value


def stateless(update: UpdateFn) -> GradientTransform:
    """A transform from an `update` that keeps no state: its `init` returns `()`."""

    def init(variables):
        del variables
        return ()

    return GradientTransform(init, update)


def identity() -> GradientTransform:
    """The transform that changes nothing (what `clip=None` means)."""

    def update(grads, state, variables):
        del variables
        return list(grads), state

    return stateless(update)


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Runs transforms in order, each on the previous one's output; keeps a tuple of states.

    Order matters: each transform sees the previous one's output. On the gradient [10, 0.1, -10],
    `chain(clip_by_value(0.5), clip_by_global_norm(1.0))` gives [0.5, 0.1, -0.5] (the value clip
    already brought the norm under 1), while the reverse order gives [0.5, 0.00707, -0.5].

    Example:
        >>> clip = hvdclip.chain(hvdclip.clip_by_value(1.0), hvdclip.clip_by_global_norm(5.0))
        >>> trainer = hvdclip.HvdClipTrainer(model, optimizer, loss_fn, clip=clip)
    """
    for position, transform in enumerate(transforms):
        check_transform(f"transforms[{position}]", transform)

    def init(variables):
        return tuple(t.init(variables) for t in transforms)

    def update(grads, state, variables):
        new_states = []
        for transform, inner_state in zip(transforms, state):
            grads, inner_state = transform.update(grads, inner_state, variables)
            new_states.append(inner_state)
        return list(grads), tuple(new_states)

    return GradientTransform(init, update)
