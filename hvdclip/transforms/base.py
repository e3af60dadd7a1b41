"""The gradient-transform protocol and its combinator.

A transform is a pair of functions:

* `init(variables) -> state`: a nest of tensors (possibly `()`), built once before step 1. The
  trainer stores it in non-trainable `tf.Variable`s, so it is broadcast from rank 0 with the
  model, checkpointed, and identical on every rank.
* `update(grads, state, variables) -> (grads, state)`: pure; receives the *reduced* gradient list
  (dense tensors, `tf.IndexedSlices` or `None`, aligned with `variables`) and the current state
  (read from those variables), and returns new gradients and the new state to store.

A transform built with `reporting(init, update_with_report)` also says what it did: its
`update_with_report(grads, state, variables) -> (grads, state, ClipReport)` is the same update plus
a `ClipReport` (the output's global norm, whether it clipped) from numbers it computed anyway, so
the trainer need not measure the clipped gradient again (see `hvdclip.transforms.report`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from hvdclip.gradients import Gradient
from hvdclip.transforms.report import ClipReport, reporting_update, update_and_report
from hvdclip.validation import check_callable

__all__ = ["GradientTransform", "chain", "check_transform", "from_reporting_update", "identity", "reporting"]

InitFn = Callable[[Sequence[tf.Variable]], Any]
UpdateFn = Callable[[list[Gradient], Any, Sequence[tf.Variable]], tuple[list[Gradient], Any]]
ReportingUpdateFn = Callable[[list[Gradient], Any, Sequence[tf.Variable]], tuple[list[Gradient], Any, ClipReport]]


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


def _no_state(variables):
    del variables
    return ()


def reporting(init: InitFn | None, update_with_report: ReportingUpdateFn) -> GradientTransform:
    """A transform whose `update` also reports what it did (`init=None`: a transform without state).

    `update` is `update_with_report` without the report, and carries it (as `update.with_report`)
    for the trainer, which logs the report's norm and `active` instead of measuring them.

    Example:
        >>> from hvdclip.gradients import scale_to_norm, squared_norms, total
        >>> from hvdclip.transforms.report import scale_with_report
        >>> def update_with_report(grads, state, variables):   # clip_by_global_norm(1.0)
        ...     squares = squared_norms(grads)
        ...     factor = scale_to_norm(tf.sqrt(total(squares)), 1.0)
        ...     clipped, report = scale_with_report(grads, factor, squares)
        ...     return clipped, state, report
        >>> clip = hvdclip.reporting(None, update_with_report)
    """
    if init is not None and not callable(init):
        raise TypeError(f"`init` must be callable, or None for a transform without state. Received: init={init!r}")
    check_callable("update_with_report", update_with_report)
    return from_reporting_update(init, update_with_report, reports=True)


def from_reporting_update(init: InitFn | None, update_with_report: Callable, *, reports: bool) -> GradientTransform:
    """The transform whose `update` is `update_with_report` without its report.

    With `reports`, `update` carries `update_with_report` for the trainer (what `reporting` builds).
    Without, the report is dropped: for a combinator (`chain`, `skip_nonfinite`) whose
    `update_with_report` returns None as its report when a transform inside it does not report.
    """

    def update(grads, state, variables):
        grads, state, _ = update_with_report(grads, state, variables)
        return grads, state

    if reports:
        update.with_report = update_with_report
    return GradientTransform(init or _no_state, update)


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

    def update_with_report(grads, state, variables):
        new_states, reports = [], []
        for transform, inner_state in zip(transforms, state):
            grads, inner_state, report = update_and_report(transform, grads, inner_state, variables)
            new_states.append(inner_state)
            reports.append(report)
        if None in reports:  # A member that does not report: the chain's output must be measured.
            return list(grads), tuple(new_states), None
        # The output's norm is the last one a member reported (a None keeps the one before it);
        # the chain clipped if any member did.
        norm = next((report.norm for report in reversed(reports) if report.norm is not None), None)
        active = tf.reduce_any([report.active for report in reports]) if reports else tf.constant(False)
        return list(grads), tuple(new_states), ClipReport(norm, active)

    every_member_reports = all(reporting_update(t.update) is not None for t in transforms)
    return from_reporting_update(init, update_with_report, reports=every_member_reports)
