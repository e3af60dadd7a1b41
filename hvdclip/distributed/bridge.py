"""The one place where hvdclip hands Keras 3 state to Horovod.

Horovod 0.28.1's TensorFlow API predates Keras 3 and rejects `keras.Variable` (upstream
horovod#4290: its broadcast calls `assign`, and `DistributedGradientTape` calls `.ref()`, on an
object it expects to be a `tf.Variable`). Each Keras 3 variable on the TensorFlow backend wraps a
`tf.Variable`, reachable as `.value`; Horovod gets that.
"""

from __future__ import annotations

from collections.abc import Iterable

import tensorflow as tf

__all__ = ["as_tf_variables"]


def as_tf_variables(variables: Iterable) -> list[tf.Variable]:
    """The `tf.Variable` behind each Keras 3 variable (plain `tf.Variable`s pass through)."""
    out = []
    for variable in variables:
        if isinstance(variable, tf.Variable):
            out.append(variable)
        else:
            inner = getattr(variable, "value", None)
            if not isinstance(inner, tf.Variable):
                raise TypeError(
                    "hvdclip needs Keras 3 on the TensorFlow backend (KERAS_BACKEND=tensorflow): "
                    f"variable {getattr(variable, 'path', variable)!r} is not backed by a tf.Variable."
                )
            out.append(inner)
    return out
