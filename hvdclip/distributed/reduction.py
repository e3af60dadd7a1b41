"""`Reduction`: how a gradient list is averaged over ranks, by Horovod's own machinery; and the flags
that ride in it.

The reduction is `hvd.DistributedGradientTape`'s, with its options (compression,
`sparse_as_dense`, `op`, `gradient_predivide_factor`, groups, process set) and with
`use_generic_names=True` (upstream PR #3628): the collectives are named `grad_0 ... grad_{n-1}` by
position, with `ignore_name_scope`. Horovod matches collectives across ranks *by name*, and its
default names come from the gradient tensors' names, which carry Keras layer names; Keras numbers
auto-named layers per process (`dense_9` on one rank, `dense_10` on a rank that built one more
layer elsewhere), so default names can differ between ranks, and each rank then waits forever
for a tensor the other never sends.

Horovod 0.28.1's generic names cover dense gradients only: a sparse gradient (`tf.IndexedSlices`,
from an embedding lookup) is allgathered under a name derived from its tensors' names. So the
values and indices of each sparse gradient are first given positional tensor names here, which
makes Horovod's derived names positional too.

`hvd.DistributedGradientTape` computes the local gradient and reduces it in one call; hvdclip's
doors need the reduction on its own (Keras' `fit` hands the optimizer gradients it has already
computed; accumulation reduces the mean of several local gradients), so this calls the function
`hvd.DistributedGradientTape` and `hvd.DistributedOptimizer` are both built on
(`hvdclip.foreign.make_allreduce_grads_fn`; `tests/unit/test_reduction.py` checks the tape uses it).

Flags. Some yes/no facts must agree over ranks every step: "this rank has no batch for the next
step". Each rank's flag (0 or 1) is appended to the gradient with the fewest elements, so it
crosses in the same allreduce and costs no collective of its own; it comes back as the count of
ranks that raised it (averaged or summed by the same op as the gradient: count / N, or count). The
answer is "count > 0", never a comparison of a mean with a threshold: a positive count stays
positive through the average and through fp16 compression for any number of ranks up to 2**24
(fp16's smallest positive value is 2**-24), so the answer is exact. Where no dense gradient can
carry them (Adasum, which does not add; a model with only sparse gradients), the flags take one
small allreduce of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import horovod.tensorflow as hvd
import tensorflow as tf

from hvdclip import foreign
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.validation import check_bool, check_int, check_number

__all__ = ["Reduction", "OPS", "COMPRESSIONS", "raised"]

COMPRESSIONS = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
OPS = {"average": hvd.Average, "sum": hvd.Sum, "adasum": hvd.Adasum}


def _named(table: dict, value: Any) -> str | None:
    """The key of `table` whose value is `value` (Horovod's own constant), or `value` if it is a key."""
    if isinstance(value, str):
        return value if value in table else None
    return next((name for name, constant in table.items() if constant is value or constant == value), None)


@dataclass(frozen=True, eq=False)
class Reduction:
    """How gradients are averaged over ranks: Horovod's options, one object every door takes.

    Args:
        compression: `"fp16"` (or Horovod's `hvd.Compression.fp16`) halves allreduce traffic
            (gradients are cast back after); `"none"` (or None, or `hvd.Compression.none`) sends
            them as they are.
        sparse_as_dense: allreduce embedding gradients as dense tensors instead of allgathering
            their rows.
        op: `"average"` (default), `"sum"` or `"adasum"`, or Horovod's `hvd.Average`, `hvd.Sum`,
            `hvd.Adasum` (Adasum: dense gradients only).
        gradient_predivide_factor: with `"average"`, divide by this before the sum and by
            `size / factor` after it (Horovod's option; 1.0 divides once, after).
        groups: how many grouped allreduces carry the dense gradients: 1 sends them all as one
            group, after the whole backward pass; 0 gives each gradient its own allreduce, which
            Horovod's fusion buffer batches as gradients become ready, overlapping the reduction
            with the rest of the backward pass; n > 1 splits them into n groups; or a list of
            lists of variables, one group each (Horovod's `groups`). None (the default) is 1 on
            CPU, where one group ties or wins (`make bench`), and 0 where TensorFlow sees a GPU
            and Horovod has NCCL, where `docs/scaling.md`'s model says one group gives up the
            overlap (ResNet-50 at 25 Gbit/s: about 91 % efficiency per gradient, 76 % as one
            group).
        process_set: a Horovod `ProcessSet` to reduce over; None means every rank.
        device_dense, device_sparse: the devices Horovod reduces dense and sparse gradients on
            ("" lets Horovod choose: the GPU where it was built with GPU operations).

    Example:
        >>> clipper = hvdclip.Clipper(optimizer, hvdclip.clip_by_global_norm(1.0),
        ...                           reduction=hvdclip.Reduction(compression="fp16"))
    """

    compression: Any = "none"
    sparse_as_dense: bool = False
    op: Any = "average"
    gradient_predivide_factor: float = 1.0
    groups: Any = None
    process_set: Any = None
    device_dense: str = ""
    device_sparse: str = ""

    def __post_init__(self) -> None:
        compression = "none" if self.compression is None else _named(COMPRESSIONS, self.compression)
        if compression is None:
            raise ValueError(
                "`compression` must be 'none', 'fp16', None, hvd.Compression.none or hvd.Compression.fp16. "
                f"Received: compression={self.compression!r}"
            )
        op = _named(OPS, self.op)
        if op is None:
            raise ValueError(
                f"`op` must be one of {sorted(OPS)} or hvd.Average, hvd.Sum, hvd.Adasum. Received: op={self.op!r}"
            )
        check_bool("sparse_as_dense", self.sparse_as_dense)
        factor = check_number("gradient_predivide_factor", self.gradient_predivide_factor, gt=0)
        if factor != 1.0 and op != "average":
            raise ValueError(
                "`gradient_predivide_factor` only applies to op='average'. "
                f"Received: gradient_predivide_factor={self.gradient_predivide_factor!r}, op={self.op!r}"
            )
        groups = self.groups
        if isinstance(groups, (list, tuple)):
            if not all(isinstance(group, (list, tuple)) and group for group in groups):
                raise TypeError(
                    "`groups` must be an int >= 0 or a list of non-empty lists of variables. "
                    f"Received: groups={self.groups!r}"
                )
            groups = tuple(tuple(as_tf_variables(group)) for group in groups)
        elif groups is not None:
            groups = check_int("groups", groups, ge=0)
        for device in ("device_dense", "device_sparse"):
            if not isinstance(getattr(self, device), str):
                raise TypeError(f"`{device}` must be a device name such as '/gpu:0', or ''. Received: {device}={getattr(self, device)!r}")
        if self.process_set is not None and not isinstance(self.process_set, hvd.ProcessSet):
            raise TypeError(
                f"`process_set` must be a Horovod ProcessSet or None. Received: process_set={self.process_set!r}"
            )
        object.__setattr__(self, "compression", compression)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "gradient_predivide_factor", float(factor))
        object.__setattr__(self, "groups", groups)

    @property
    def resolved_groups(self) -> Any:
        """`groups`, with None decided for this machine: 0 on a GPU with NCCL, else 1."""
        if self.groups is not None:
            return self.groups
        return 0 if hvd.nccl_built() and tf.config.list_physical_devices("GPU") else 1

    def options(self) -> dict:
        """The keyword arguments `hvd.DistributedGradientTape` takes for this reduction."""
        resolved = self.resolved_groups
        groups = [list(group) for group in resolved] if isinstance(resolved, tuple) else resolved or None
        return {
            "device_dense": self.device_dense,
            "device_sparse": self.device_sparse,
            "compression": COMPRESSIONS[self.compression],
            "sparse_as_dense": self.sparse_as_dense,
            "op": OPS[self.op],
            "gradient_predivide_factor": self.gradient_predivide_factor,
            "groups": groups,
            "process_set": self.process_set if self.process_set is not None else hvd.global_process_set,
        }

    @functools.cached_property
    def _function(self):
        # Made on first use: it needs hvd.init(). The function hvd.DistributedGradientTape builds for itself.
        return foreign.make_allreduce_grads_fn(**self.options())

    def __call__(self, grads: Sequence, variables: Sequence, flags: Sequence[tf.Tensor] = ()) -> tuple[list, list]:
        """The rank-average of `grads` (aligned with `variables`; `None` stays `None`), and the flags' answers.

        Args:
            grads: this rank's gradients.
            variables: the variables they belong to.
            flags: bool scalars, each one fact about this rank ("I have no next batch").

        Returns:
            `(reduced, raised)`: the reduced gradients, and for each flag a bool scalar that is
            True on every rank if any rank raised it.
        """
        grads = [_positionally_named(g, i) if isinstance(g, tf.IndexedSlices) else g for i, g in enumerate(grads)]
        flags = [tf.cast(tf.reshape(flag, []), tf.bool) for flag in flags]
        carrier = self._carrier(grads) if flags else None
        if carrier is not None:
            carried = grads[carrier]
            count = carried.shape.num_elements()
            grads[carrier] = tf.concat([tf.reshape(carried, [-1]), tf.cast(tf.stack(flags), carried.dtype)], axis=0)
        if all(g is None for g in grads):
            reduced = list(grads)
        else:
            reduced = list(self._function(grads, as_tf_variables(variables), True))
        if carrier is None:
            return reduced, self._flags_alone(flags)
        flat = reduced[carrier]
        reduced[carrier] = tf.reshape(flat[:count], carried.shape)
        return reduced, raised(flat[count:], len(flags))

    def _carrier(self, grads: list) -> int | None:
        """The dense gradient with the fewest elements (its shape fully known), to carry the flags."""
        if self.op == "adasum":  # Adasum combines vectors by their angle: a count would not survive it.
            return None
        sizes = [
            (g.shape.num_elements(), i)
            for i, g in enumerate(grads)
            if g is not None and not isinstance(g, tf.IndexedSlices) and g.dtype.is_floating
            and g.shape.num_elements() is not None
        ]  # fmt: skip
        return min(sizes)[1] if sizes else None

    def _flags_alone(self, flags: list) -> list:
        if not flags:
            return []
        process_set = self.process_set if self.process_set is not None else hvd.global_process_set
        counts = hvd.allreduce(
            tf.cast(tf.stack(flags), tf.float32), op=hvd.Sum, name="hvdclip_flags", ignore_name_scope=True,
            process_set=process_set,
        )  # fmt: skip
        return raised(counts, len(flags))


def raised(reduced_flags: tf.Tensor, count: int) -> list[tf.Tensor]:
    """Each flag's answer from its reduced value (the count of ranks that raised it, maybe divided by N).

    "Some rank raised it" is "the value is > 0": a sum of 0s and 1s is 0 only if every term is,
    and dividing a positive count by N, in float32 or in fp16 (smallest positive value 2**-24),
    stays positive for any N up to 2**24. A threshold on the mean (`mean < 1`) would not: with one
    rank of N out of data, the mean of "has data" is 1 - 1/N, which rounds to 1 in fp16 from N >= 2048.
    """
    return [reduced_flags[i] > 0 for i in range(count)]


def _positionally_named(grad: tf.IndexedSlices, position: int) -> tf.IndexedSlices:
    """`grad` with its values and indices renamed by position, so Horovod's allgather names are too.

    The scope is absolute (trailing "/"): the enclosing scopes (an optimizer's auto-numbered name,
    a Keras layer's) could differ between ranks.
    """
    with tf.name_scope("hvdclip_sparse_grads/"):
        values = tf.identity(grad.values, name=f"grad_{position}_values")
        indices = tf.identity(grad.indices, name=f"grad_{position}_indices")
    return tf.IndexedSlices(values, indices, grad.dense_shape)
