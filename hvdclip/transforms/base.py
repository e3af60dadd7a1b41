"""The gradient-transform protocol and its combinator.

A transform is a pair of functions:

* `init(variables) -> state`: a nest of tensors (possibly `()`), built once before step 1. The
  trainer stores it in non-trainable `tf.Variable`s, so it is broadcast from rank 0 with the
  model, checkpointed, and identical on every rank.
* `update(grads, state, variables) -> (grads, state)`: pure; receives the *reduced* gradient list
  (dense tensors, `tf.IndexedSlices` or `None`, aligned with `variables`) and the current state
  (read from those variables), and returns new gradients and the new state to store.

A transform may also have `update_with_report(grads, state, variables) -> (grads, state, report)`:
the same update, plus a `ClipReport` of what it did (the output's global norm, whether it clipped),
from numbers it computed anyway. The trainer logs those instead of measuring the output again,
which would cost two more passes over every gradient on every step. `update` must return exactly
the first two results of `update_with_report`; `reporting(init, update_with_report)` builds both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from hvdclip.gradients import Gradient
from hvdclip.validation import check_callable

__all__ = [
    "ClipReport",
    "GradientTransform",
    "chain",
    "check_transform",
    "identity",
    "reporting",
    "stateless",
    "update_and_report",
]


class ClipReport(NamedTuple):
    """What a transform did, from numbers it computed anyway.

    Attributes:
        norm: the global L2 norm of the output gradients (a float32 scalar), or None when the
            transform did not change it (then it is the input's).
        active: a bool scalar, True when the transform clipped (scaled down or replaced) any
            gradient. It is exact: a scale factor that is exactly 1 is not a clip.
    """

    norm: tf.Tensor | None
    active: tf.Tensor


InitFn = Callable[[Sequence[tf.Variable]], Any]
UpdateFn = Callable[[list[Gradient], Any, Sequence[tf.Variable]], tuple[list[Gradient], Any]]
ReportingUpdateFn = Callable[[list[Gradient], Any, Sequence[tf.Variable]], tuple[list[Gradient], Any, ClipReport]]


class GradientTransform(NamedTuple):
    """An `init`/`update` pair, and optionally `update_with_report`; see the module docstring."""

    init: InitFn
    update: UpdateFn
    update_with_report: ReportingUpdateFn | None = None


def check_transform(name: str, value: Any, *, optional: bool = False) -> GradientTransform | None:
    """Refuses anything but a `GradientTransform` whose `init` and `update` are callable (or None if `optional`).

    A `GradientTransform(1.0, None)` is a NamedTuple like any other, so without this check it would
    fail only when the trainer first calls it, deep inside a traced step.
    """
    if optional and value is None:
        return None
    if not isinstance(value, GradientTransform) or not (
        callable(value.init)
        and callable(value.update)
        and (value.update_with_report is None or callable(value.update_with_report))
    ):
        what = "a GradientTransform such as hvdclip.clip_by_global_norm(1.0)" + (", or None" if optional else "")
        raise TypeError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return value


def _no_state(variables):
    del variables
    return ()


def stateless(update: UpdateFn) -> GradientTransform:
    """A transform from an `update` that keeps no state: its `init` returns `()`."""
    return GradientTransform(_no_state, update)


def reporting(init: InitFn | None, update_with_report: ReportingUpdateFn) -> GradientTransform:
    """A transform from `update_with_report`, with `update` derived from it (`init=None`: stateless).

    Example:
        >>> from hvdclip.gradients import global_norm, scale, scale_to_norm
        >>> def update_with_report(grads, state, variables):
        ...     norm = global_norm(grads)
        ...     factor = scale_to_norm(norm, 1.0)
        ...     return [scale(g, factor) for g in grads], state, hvdclip.ClipReport(norm * factor, factor < 1)
        >>> clip = hvdclip.reporting(None, update_with_report)
    """

    if init is not None and not callable(init):
        raise TypeError(f"`init` must be callable, or None for a transform without state. Received: init={init!r}")
    check_callable("update_with_report", update_with_report)

    def update(grads, state, variables):
        grads, state, _ = update_with_report(grads, state, variables)
        return grads, state

    return GradientTransform(init or _no_state, update, update_with_report)


def update_and_report(
    transform: GradientTransform, grads: list[Gradient], state: Any, variables: Sequence[tf.Variable]
) -> tuple[list[Gradient], Any, ClipReport | None]:
    """Runs `transform`, with its `ClipReport` when it makes one (else the report is None)."""
    if transform.update_with_report is None:
        grads, state = transform.update(grads, state, variables)
        return list(grads), state, None
    grads, state, report = transform.update_with_report(grads, state, variables)
    if not isinstance(report, ClipReport):
        raise TypeError(
            "`update_with_report` must return (grads, state, hvdclip.ClipReport(norm, active)). "
            f"Received a report of {report!r}"
        )
    return list(grads), state, report


def identity() -> GradientTransform:
    """The transform that changes nothing (what `clip=None` means)."""

    def update_with_report(grads, state, variables):
        del variables
        return list(grads), state, ClipReport(norm=None, active=tf.constant(False))

    return reporting(None, update_with_report)


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

    if not all(t.update_with_report is not None for t in transforms):
        return GradientTransform(init, update)

    def update_with_report(grads, state, variables):
        # The output's norm is the last one a member reported (a None keeps the one before it);
        # the chain clipped if any member did.
        new_states, norm, active = [], None, tf.constant(False)
        for transform, inner_state in zip(transforms, state):
            grads, inner_state, report = transform.update_with_report(grads, inner_state, variables)
            new_states.append(inner_state)
            norm = norm if report.norm is None else report.norm
            active = tf.logical_or(active, report.active)
        return list(grads), tuple(new_states), ClipReport(norm, active)

    return GradientTransform(init, update, update_with_report)
