"""The gradient-transform protocol, the one function that runs a transform, and `chain`.

A transform is a pair of functions:

* `init(variables) -> state`: a nest of tensors (possibly `()`), built once before step 1. The
  trainer stores it in non-trainable `tf.Variable`s, so it is broadcast from rank 0 with the
  model, checkpointed, and identical on every rank.
* `update(grads, state, variables) -> TransformResult(grads, state, report)`: pure; receives the
  *reduced* gradient list (dense tensors, `tf.IndexedSlices` or `None`, aligned with `variables`)
  and the current state (read from those variables), and returns the new gradients, the new state
  to store and, optionally, a `ClipReport` of what it did (see `hvdclip.transforms.report`). A
  report of None means "not known": whoever runs the transform measures the output instead.

Run a transform with `apply_transform`, which checks what `update` returned, rather than calling
`update` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from hvdclip.gradients import Gradient
from hvdclip.transforms.report import ClipReport

__all__ = [
    "GradientTransform",
    "TransformResult",
    "apply_transform",
    "chain",
    "check_transform",
    "empty_state",
    "identity",
]


class TransformResult(NamedTuple):
    """What a transform's `update` returns.

    Attributes:
        grads: the new gradient list, aligned with the input (`None` where the input is `None`).
        state: the new state, with the structure `init` built.
        report: a `ClipReport` of what `update` did, or None (the default) when it does not say;
            then the caller measures the output's norm and whether anything changed.
    """

    grads: list[Gradient]
    state: Any
    report: ClipReport | None = None


InitFn = Callable[[Sequence[tf.Variable]], Any]
UpdateFn = Callable[[list[Gradient], Any, Sequence[tf.Variable]], TransformResult]


class GradientTransform(NamedTuple):
    """An `init`/`update` pair; see the module docstring for the contract.

    Example, a transform that halves every gradient (stateless, without a report):
        >>> from hvdclip.gradients import scale
        >>> def init(variables):
        ...     return ()
        >>> def update(grads, state, variables):
        ...     return hvdclip.TransformResult([scale(g, 0.5) for g in grads], state)
        >>> halve = hvdclip.GradientTransform(init, update)
        >>> clip = hvdclip.chain(halve, hvdclip.clip_by_global_norm(1.0))
    """

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


def _scalar(value: Any, dtypes: tuple) -> bool:
    try:
        tensor = tf.convert_to_tensor(value)
    except (TypeError, ValueError):
        return False
    return tensor.shape.rank == 0 and tensor.dtype in dtypes


def apply_transform(
    transform: GradientTransform, grads: Sequence[Gradient], state: Any, variables: Sequence[tf.Variable]
) -> TransformResult:
    """Runs `transform.update` and checks what it returned.

    Everything that runs a transform (the trainer's step, `chain`, `zero_nonfinite`) goes through
    here, so a transform written for another protocol (optax's `(grads, state)` pair) or a malformed
    report fails when the step is traced, with a message saying what to return, not later in a zip.

    Returns:
        `TransformResult(grads, state, report)`, with `grads` a list as long as the input.

    Raises:
        TypeError: `update` did not return a `TransformResult`, or its `report` is neither None
            nor a `ClipReport` of a float32 scalar (or None) and a bool scalar.
        ValueError: `update` returned a different number of gradients than it received.
    """
    grads = list(grads)
    result = transform.update(grads, state, variables)
    if not isinstance(result, TransformResult):
        if isinstance(result, (tuple, list)):
            items = ", ".join(type(item).__name__ for item in result)
            received = f"a {type(result).__name__} of {len(result)} items ({items})"
        else:
            received = repr(result)
        raise TypeError(
            "`update` must return hvdclip.TransformResult(grads, state), or TransformResult(grads, state, report) "
            f"with report=hvdclip.ClipReport(norm, active). Received: {received}"
        )
    out = list(result.grads)
    if len(out) != len(grads):
        raise ValueError(
            "`update` must return one gradient per input gradient (None where the input is None). "
            f"Received: {len(out)} gradients for {len(grads)}"
        )
    report = result.report
    if report is not None and (
        not isinstance(report, ClipReport)
        or not _scalar(report.active, (tf.bool,))
        or not (report.norm is None or _scalar(report.norm, (tf.float32,)))
    ):
        raise TypeError(
            "`update` must return a TransformResult whose `report` is None or hvdclip.ClipReport(norm, active), "
            f"with `norm` a float32 scalar or None and `active` a bool scalar. Received: report={report!r}"
        )
    return TransformResult(out, result.state, report)


def empty_state(variables: Sequence[tf.Variable]) -> tuple:
    """The `init` of a transform without state: `()`."""
    del variables
    return ()


def identity() -> GradientTransform:
    """The transform that changes nothing (what `clip=None` means).

    Example:
        >>> grads = hvdclip.identity().update([tf.ones(2)], (), []).grads   # [tf.ones(2)]
    """

    def update(grads, state, variables):
        del variables
        return TransformResult(list(grads), state, ClipReport(norm=None, active=tf.constant(False)))

    return GradientTransform(empty_state, update)


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Runs transforms in order, each on the previous one's output; keeps a tuple of states.

    The state has one entry per transform, in order. The chain reports when every member does:
    the output's norm is the last one a member reported, and it clipped if any member did.

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
        if not isinstance(state, (tuple, list)):
            raise TypeError(
                f"`state` must be a tuple with one entry per chained transform ({len(transforms)}), as the "
                f"chain's `init` builds it. Received: state={state!r}"
            )
        if len(state) != len(transforms):
            raise ValueError(
                f"`state` must have one entry per chained transform ({len(transforms)}). Received: "
                f"{len(state)} entries; build the state with this chain's `init`"
            )
        new_states, reports = [], []
        for transform, inner_state in zip(transforms, state):
            grads, inner_state, report = apply_transform(transform, grads, inner_state, variables)
            new_states.append(inner_state)
            reports.append(report)
        if None in reports:  # A member that does not report: the chain's output must be measured.
            return TransformResult(list(grads), tuple(new_states))
        # A None norm (a member that changed nothing) keeps the one before it.
        norm = next((report.norm for report in reversed(reports) if report.norm is not None), None)
        active = tf.reduce_any([report.active for report in reports]) if reports else tf.constant(False)
        return TransformResult(list(grads), tuple(new_states), ClipReport(norm, active))

    return GradientTransform(init, update)
