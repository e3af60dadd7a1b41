"""`ClipReport`: what a transform did, from numbers it computed anyway.

The trainer logs `clipped_grad_norm` and `clip_active` every step. Measuring them on the clipped
gradient costs two more passes over every gradient (a norm and an element-wise comparison); a
transform that scales gradients already knows its factors and the input norms, which give both.
A transform built with `hvdclip.reporting` carries such a report; any other transform is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from hvdclip.gradients import Gradient, applied_factor, scale

__all__ = ["ClipReport", "reporting_update", "scale_with_report", "update_and_report"]


class ClipReport(NamedTuple):
    """What a transform did to the gradient list.

    Attributes:
        norm: the global L2 norm of the output gradients (a float32 scalar), or None when the
            transform did not change them (then it is the input's).
        active: a bool scalar, True when the transform clipped: scaled some gradient by a factor
            that is below 1 in the gradient's own dtype, or cut some element to a threshold.
    """

    norm: tf.Tensor | None
    active: tf.Tensor


def reporting_update(update: Any):
    """The `update_with_report` that `hvdclip.reporting` attached to `update`, or None.

    It hangs on the update function itself, so a transform rebuilt with another `update` (such as
    `t._replace(update=...)`) loses the report with it and is measured instead.
    """
    return getattr(update, "with_report", None)


def _checked(report: Any) -> ClipReport:
    def scalar(value: Any, dtypes: tuple) -> bool:
        try:
            tensor = tf.convert_to_tensor(value)
        except (TypeError, ValueError):
            return False
        return tensor.shape.rank == 0 and tensor.dtype in dtypes

    if (
        not isinstance(report, ClipReport)
        or not scalar(report.active, (tf.bool,))
        or not (report.norm is None or scalar(report.norm, (tf.float32,)))
    ):
        raise TypeError(
            "`update_with_report` must return (grads, state, hvdclip.ClipReport(norm, active)), with `norm` "
            f"a float32 scalar or None and `active` a bool scalar. Received: report={report!r}"
        )
    return report


def update_and_report(
    transform: Any, grads: list[Gradient], state: Any, variables: Sequence[tf.Variable]
) -> tuple[list[Gradient], Any, ClipReport | None]:
    """Runs `transform` (a `GradientTransform`), with its `ClipReport` if it makes one (else None)."""
    with_report = reporting_update(transform.update)
    if with_report is None:
        grads, state = transform.update(grads, state, variables)
        return list(grads), state, None
    grads, state, report = with_report(grads, state, variables)
    return list(grads), state, _checked(report)


def scale_with_report(
    grads: Sequence[Gradient], factors: Any, squares: Sequence[tf.Tensor]
) -> tuple[list[Gradient], ClipReport]:
    """Scales each gradient by its factor and reports the result without another pass over it.

    Args:
        grads: the gradient list.
        factors: one float32 scalar for every gradient, or one per gradient (`None` where the
            gradient is `None`), each a scalar or a tensor that broadcasts against its values.
        squares: each gradient's squared L2 norm (`gradients.squared_norm`), or, where a factor
            is a tensor, the squared norms it applies to (the same shape as the factor).

    The output's norm and `active` use each factor as `scale` applies it, rounded to the
    gradient's dtype: a float16 gradient scaled by 0.99995 is scaled by exactly 1, so not clipped.
    A factor of 0 (a norm that overflowed to Inf) gives zeros, whose norm is 0, not Inf * 0.
    """
    if not isinstance(factors, (list, tuple)):
        factors = [factors] * len(grads)
    out, out_squares, active = [], [tf.constant(0.0)], [tf.constant(False)]
    for grad, factor, squared in zip(grads, factors, squares):
        if grad is None:
            out.append(None)
            continue
        applied = applied_factor(factor, grad)
        out.append(scale(grad, factor))
        out_squares.append(tf.reduce_sum(tf.where(applied == 0, 0.0, squared * tf.square(applied))))
        active.append(tf.reduce_any(applied < 1))
    return out, ClipReport(tf.sqrt(tf.add_n(out_squares)), tf.reduce_any(tf.stack(active)))
