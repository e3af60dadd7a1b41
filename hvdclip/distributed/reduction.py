"""`GradientReduction`: how a gradient list is averaged over ranks, by Horovod's own machinery.

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
doors need the reduction on its own as well (Keras' `fit` hands the optimizer gradients it has
already computed, and gradient accumulation reduces the mean of several local gradients), so this
class calls the reduction function that `hvd.DistributedGradientTape` and
`hvd.DistributedOptimizer` are both built on (`horovod.tensorflow._make_allreduce_grads_fn`,
pinned with Horovod 0.28.1; `tests/unit/test_reduction.py` checks that the tape uses it).
"""

from __future__ import annotations

from collections.abc import Sequence

import horovod.tensorflow as hvd
import tensorflow as tf

from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.validation import check_bool, check_int, check_number

__all__ = ["GradientReduction", "compression_for", "OPS"]

_COMPRESSIONS = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
OPS = {"average": hvd.Average, "sum": hvd.Sum, "adasum": hvd.Adasum}


def compression_for(name: str | None):
    """Horovod's compression object for `compression=` ("none" or "fp16"); None means "none"."""
    key = "none" if name is None else name
    if not isinstance(key, str) or key not in _COMPRESSIONS:
        raise ValueError(f"`compression` must be one of {sorted(_COMPRESSIONS)} or None. Received: compression={name!r}")
    return _COMPRESSIONS[key]


class GradientReduction:
    """Averages gradient lists over ranks as `hvd.DistributedGradientTape` does, with positional names.

    Args:
        compression: `"fp16"` halves allreduce traffic (gradients are cast back after); None or
            `"none"` sends them as they are.
        sparse_as_dense: allreduce embedding gradients as dense tensors instead of allgathering
            their rows.
        op: `"average"` (the default), `"sum"` or `"adasum"` (Horovod's Adasum; dense gradients only).
        gradient_predivide_factor: with `"average"`, divide by this before the sum and by
            `size / factor` after it (Horovod's option; 1.0 divides once, after).
        groups: how many grouped allreduces carry the dense gradients: 1 (the default) sends them
            all as one group; 0 gives each gradient its own allreduce, left to Horovod's fusion
            buffer to batch (`make bench` measures both).

    Example:
        >>> reduction = GradientReduction(compression="fp16")
        >>> averaged = reduction(local_grads, model.trainable_variables)
    """

    def __init__(
        self,
        *,
        compression: str | None = None,
        sparse_as_dense: bool = False,
        op: str = "average",
        gradient_predivide_factor: float = 1.0,
        groups: int = 1,
    ) -> None:
        self.compression = compression_for(compression)
        self.sparse_as_dense = check_bool("sparse_as_dense", sparse_as_dense)
        if not isinstance(op, str) or op not in OPS:
            raise ValueError(f"`op` must be one of {sorted(OPS)}. Received: op={op!r}")
        self.op = op
        self.gradient_predivide_factor = check_number("gradient_predivide_factor", gradient_predivide_factor, gt=0)
        if self.gradient_predivide_factor != 1.0 and op != "average":
            raise ValueError(
                "`gradient_predivide_factor` only applies to op='average'. "
                f"Received: gradient_predivide_factor={gradient_predivide_factor!r}, op={op!r}"
            )
        self.groups = check_int("groups", groups, ge=0)
        self._reduce = None  # Horovod's function, made on first use (it needs hvd.init()).

    def options(self) -> dict:
        """The keyword arguments `hvd.DistributedGradientTape` takes for this reduction."""
        return {
            "compression": self.compression,
            "sparse_as_dense": self.sparse_as_dense,
            "op": OPS[self.op],
            "gradient_predivide_factor": self.gradient_predivide_factor,
            "groups": self.groups or None,
        }

    def _function(self):
        if self._reduce is None:
            options = self.options()
            # The function hvd.DistributedGradientTape(tape, **options) builds for itself.
            self._reduce = hvd._make_allreduce_grads_fn(
                "DistributedGradientTape", "", "", options["compression"], options["sparse_as_dense"],
                options["op"], options["gradient_predivide_factor"], options["groups"], hvd.global_process_set,
            )
        return self._reduce

    def __call__(self, grads: Sequence, variables: Sequence) -> list:
        """The rank-average of `grads` (aligned with `variables`); `None` stays `None`."""
        grads = [_positionally_named(g, i) if isinstance(g, tf.IndexedSlices) else g for i, g in enumerate(grads)]
        if all(g is None for g in grads):
            return list(grads)
        return list(self._function()(grads, as_tf_variables(variables), True))


def _positionally_named(grad: tf.IndexedSlices, position: int) -> tf.IndexedSlices:
    """`grad` with its values and indices renamed by position, so Horovod's allgather names are too.

    The scope is absolute (trailing "/"): the enclosing scopes (an optimizer's auto-numbered name,
    a Keras layer's) could differ between ranks.
    """
    with tf.name_scope("hvdclip_sparse_grads/"):
        values = tf.identity(grad.values, name=f"grad_{position}_values")
        indices = tf.identity(grad.indices, name=f"grad_{position}_indices")
    return tf.IndexedSlices(values, indices, grad.dense_shape)
