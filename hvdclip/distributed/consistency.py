"""Checks that ranks hold the same model: structure before the start-up broadcast, weights later.

Both are collective and symmetric: every rank gathers the same facts and so reaches the same
verdict, and raises the same `RankMismatchError`. No rank is left waiting in an allreduce that
the others skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from hvdclip.errors import RankMismatchError

__all__ = ["Signature", "signature", "check_same_structure", "weights_checksum", "check_same_weights"]

Signature = list[tuple[str, tuple[int | None, ...], str]]


def signature(named_variables: Sequence[tuple[str, tf.Variable]]) -> Signature:
    """(name, shape, dtype) of each variable, in order."""
    return [(name, tuple(v.shape.as_list()), v.dtype.name) for name, v in named_variables]


def _structure(sig: Signature) -> list[tuple[tuple[int | None, ...], str]]:
    # Names are left out: Keras numbers auto-named layers per process (dense_9 on one rank,
    # dense_10 on another when it built one more layer elsewhere), which is harmless.
    return [(shape, dtype) for _, shape, dtype in sig]


def _digest(sig: Signature) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(repr(_structure(sig)).encode()).digest()[:8], dtype=np.int64).copy()


def _first_difference(reference: Signature, other: Signature) -> str:
    for index, (a, b) in enumerate(zip(reference, other)):
        if a[1:] != b[1:]:
            return (
                f"variable #{index}: rank 0 has {a[0]!r} shape={list(a[1])} dtype={a[2]}, "
                f"this rank has {b[0]!r} shape={list(b[1])} dtype={b[2]}"
            )
    longer, count = (reference, len(other)) if len(reference) > len(other) else (other, len(reference))
    extra = longer[count]
    who = "rank 0" if longer is reference else "this rank"
    return f"variable count: rank 0 has {len(reference)}, this rank has {len(other)}; first extra on {who}: {extra[0]!r}"


def check_same_structure(named_variables: Sequence[tuple[str, tf.Variable]]) -> None:
    """Raises `RankMismatchError` on every rank if any rank's variables differ in count, shape or dtype.

    Costs one allgather of 8 bytes per rank; only on a mismatch are the full lists gathered to
    name the first differing variable.
    """
    sig = signature(named_variables)
    digests = hvd.allgather(tf.constant(_digest(sig))).numpy()
    if (digests == digests[0]).all():
        return
    everyone = hvd.allgather_object(sig, name="hvdclip_signature")
    bad_rank = next(rank for rank, other in enumerate(everyone) if _structure(other) != _structure(everyone[0]))
    detail = _first_difference(everyone[0], everyone[bad_rank]).replace("this rank", f"rank {bad_rank}")
    raise RankMismatchError(
        f"Ranks built different models, so rank 0's weights cannot be broadcast to them. First difference, "
        f"{detail}. Build the model and optimizer the same way on every rank (same code, same arguments, "
        "no rank-dependent layers)."
    )


def weights_checksum(variables: Sequence[tf.Variable]) -> tf.Tensor:
    """A bit-sensitive int64 checksum of float variables, computed on the device.

    The float bits are reinterpreted as integers and summed: any change to any bit of any weight
    changes the sum, unless changes cancel exactly, which a divergence never does in practice.
    """
    total = tf.constant(0, tf.int64)
    for variable in variables:
        value = tf.convert_to_tensor(variable)
        # Reinterpret as 32- or 16-bit words (a float64 becomes two int32s) and sum those in
        # int64: every bit counts, and the sum cannot overflow for any real model size.
        if value.dtype in (tf.float64, tf.int64, tf.float32):
            bits = tf.cast(tf.bitcast(value, tf.int32), tf.int64)
        elif value.dtype in (tf.float16, tf.bfloat16):
            bits = tf.cast(tf.bitcast(value, tf.int16), tf.int64)
        else:
            bits = tf.cast(value, tf.int64)
        total += tf.reduce_sum(bits)
    return total


def check_same_weights(checksum: tf.Tensor, step: int) -> None:
    """Raises `RankMismatchError` on every rank if the ranks' weight checksums differ."""
    gathered = hvd.allgather(tf.reshape(checksum, [1])).numpy()
    if (gathered == gathered[0]).all():
        return
    bad = [rank for rank, value in enumerate(gathered) if value != gathered[0]]
    raise RankMismatchError(
        f"Ranks' weights have drifted apart by step {step}: rank(s) {bad} differ from rank 0. Something "
        "outside hvdclip changed weights on some ranks (a per-rank callback, a non-deterministic custom "
        "op, or a manual assign); restore from the last checkpoint."
    )
