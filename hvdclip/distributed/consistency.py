"""Checks that ranks hold the same model: structure before the start-up broadcast, state later.

What must be identical on every rank is everything the step computes from the reduced gradient:
the weights, the optimizer's state, the clip state and the counters, and the moving statistics of
a BatchNormalization layer that synchronises its batch statistics over ranks (one that declares
`synchronized_over_ranks = True`, such as `hvdclip.SyncBatchNormalization`). Two kinds of model
state are *rank-local by design* and are not compared (`rank_local_variables`):

* the moving mean and variance of a plain `keras.layers.BatchNormalization`: each rank normalises
  by its own batch and keeps its own statistics; `HvdClipTrainer.average_local_statistics`
  averages them before a checkpoint, an export or an evaluation;
* the state of each Keras `SeedGenerator` (Dropout and other random layers): the start-up
  broadcast folds the rank into it, so that each rank draws its own masks.

Both checks are collective and symmetric: every rank gathers the same facts and so reaches the same
verdict, and raises the same `RankMismatchError`. No rank is left waiting in an allreduce that
the others skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

from hvdclip import foreign
from hvdclip.errors import RankMismatchError

__all__ = [
    "Signature",
    "signature",
    "check_same_structure",
    "weights_checksum",
    "seed_generator_states",
    "local_batch_norm_statistics",
    "rank_local_variables",
    "variable_checksums",
    "check_same_state",
]

# Keras names the variable behind every `keras.random.SeedGenerator` so (Dropout, GaussianNoise, RandomFlip, ...).
_SEED_STATE_NAME = "seed_generator_state"

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


def _layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    # Keras 3's own walk over nested layers (functional, sequential and subclassed alike).
    return foreign.flatten_layers(model)


def seed_generator_states(model: keras.layers.Layer) -> list:
    """The state variable of every `keras.random.SeedGenerator` in `model` (Keras variables)."""
    return [v for v in model.variables if v.name == _SEED_STATE_NAME]


def local_batch_norm_statistics(model: keras.layers.Layer) -> list:
    """`moving_mean` and `moving_variance` of each BatchNormalization whose statistics are rank-local.

    A BatchNormalization layer is rank-local unless its class declares `synchronized_over_ranks =
    True` (as a layer that reduces its batch statistics over Horovod ranks should). Keras'
    `synchronized=True` only acts under `tf.distribute`, so it does not count.
    """
    found, seen = [], set()
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and not getattr(layer, "synchronized_over_ranks", False):
            for variable in (layer.moving_mean, layer.moving_variance):
                if id(variable) not in seen:
                    seen.add(id(variable))
                    found.append(variable)
    return found


def rank_local_variables(model: keras.layers.Layer) -> list:
    """Model variables that may differ between ranks by design (see the module docstring)."""
    return local_batch_norm_statistics(model) + seed_generator_states(model)


def variable_checksums(variables: Sequence[tf.Variable]) -> tf.Tensor:
    """`weights_checksum` of each variable, as an int64 vector (compute it on the device)."""
    if not variables:
        return tf.zeros([0], tf.int64)
    return tf.stack([weights_checksum([variable]) for variable in variables])


def _likely_cause(name: str, trainable: bool) -> str:
    if name.startswith("model/") and trainable:
        return (
            "a trainable weight changed outside the training step on some ranks: an `assign` or "
            "`set_weights`/`load_weights` in code or a callback that runs on one rank only (e.g. under "
            "`if hvd.rank() == 0`), or a non-deterministic custom op in the step"
        )
    if name.startswith("model/"):
        return (
            "a layer updates non-trainable state from its own rank's batch. hvdclip treats only plain "
            "BatchNormalization's moving statistics and seed-generator states as rank-local; make the layer "
            "reduce its statistics over ranks, or mark a BatchNormalization subclass that does with "
            "`synchronized_over_ranks = True`"
        )
    if name.startswith("optimizer/"):
        return (
            "the optimizer's state was changed on some ranks only: a learning-rate or other optimizer "
            "setting assigned by a callback or code that runs on one rank"
        )
    return "hvdclip's own state was changed on some ranks only (a manual assign to the clip state or counters)"


def check_same_state(
    checksums: tf.Tensor, names: Sequence[str], trainable: Sequence[bool], step: int
) -> None:
    """Raises `RankMismatchError` on every rank if any variable's checksum differs between ranks.

    `checksums` holds one checksum per variable named in `names` (`variable_checksums`); one
    allgather compares them all and names the first variable that differs, with a likely cause.
    """
    local = tf.reshape(tf.cast(checksums, tf.int64), [1, -1])
    gathered = hvd.allgather(local, name="hvdclip_state_checksums").numpy()
    differs = (gathered != gathered[0]).any(axis=0)
    if not differs.any():
        return
    first = int(np.argmax(differs))
    bad = [rank for rank in range(gathered.shape[0]) if gathered[rank, first] != gathered[0, first]]
    others = int(differs.sum()) - 1
    more = f" (and {others} more variable(s))" if others else ""
    raise RankMismatchError(
        f"Ranks' state has drifted apart by step {step}: {names[first]!r}{more} differs on rank(s) {bad} from "
        f"rank 0. Likely cause: {_likely_cause(names[first], trainable[first])}. Rank-local state (plain "
        "BatchNormalization moving statistics, seed-generator states) is not compared. Restore from the "
        "last checkpoint after fixing the cause."
    )
