"""`hvdclip.tensorflow.DistributedGradientTape`: Horovod's tape, with its signature, on Keras 3, plus `clip=`.

Horovod's idiom, unchanged but for the import and (to clip) one argument:

    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    tape = hvd.DistributedGradientTape(tape, clip=hvdclip.clip_by_global_norm(1.0))
    grads = tape.gradient(loss, model.trainable_variables)     # averaged over ranks, then clipped
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

`gradient` runs the core's stages up to the clip (`hvdclip.core.step.reduce_and_clip`): the
reduction with Horovod's options and positional names, the merge of repeated sparse rows, the
clip transform on the reduced gradient, under the watchdog's marker. The optimizer is yours, so
what needs the core's state stays with `hvdclip.Clipper` and `hvdclip.DistributedGradientTape`
(docs/doors.md): a stateful clip (AutoClip, ZClip), the NaN/Inf skip on every rank, accumulation,
the has-data vote and mixed precision's unscale-before-clip (this tape clips the gradient of the
loss it is given: with a `LossScaleOptimizer`, that is the scaled one, so clip in the Clipper door).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import horovod.tensorflow as hvd
import tensorflow as tf

from hvdclip.core.step import reduce_and_clip
from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.distributed.reduction import Reduction
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip.errors import HvdClipError
from hvdclip.transforms.base import GradientTransform, check_transform
from hvdclip.validation import check_bool

__all__ = ["DistributedGradientTape"]

_marker: list = []  # One watchdog marker for every Horovod-signature tape of this process.


def _shared_marker() -> Any:
    if not _marker:
        with tf.init_scope():  # Its variables are made once, outside the traced step.
            _marker.append(default_watchdog().marker("the gradient allreduce"))
    return _marker[0]


class DistributedGradientTape:
    """Wraps a `tf.GradientTape` so that `gradient` returns the gradient averaged over ranks, then clipped.

    Horovod's arguments, with Horovod's defaults (`groups=None` with `num_groups=0`: one allreduce
    per gradient, batched by Horovod's fusion buffer, where Horovod reduces on GPUs with NCCL, and
    one grouped allreduce on CPU, which is faster there; `groups=0` for one per gradient
    everywhere), and hvdclip's `clip=`: a stateless `GradientTransform`
    such as `hvdclip.clip_by_global_norm(1.0)`, run on the reduced gradient.

    After `gradient`, `report` holds that step's `grad_norm`, `clipped_grad_norm` and
    `clip_active` (tensors, the same on every rank): Horovod's `gradient` returns only the
    gradient, so the step's measurements wait here for your logs.
    """

    def __init__(
        self,
        gradtape: tf.GradientTape,
        device_dense: str = "",
        device_sparse: str = "",
        compression: Any = hvd.Compression.none,
        sparse_as_dense: bool = False,
        op: Any = hvd.Average,
        gradient_predivide_factor: float = 1.0,
        num_groups: int = 0,
        groups: Any = None,
        process_set: Any = hvd.global_process_set,
        scale_local_gradients: bool = True,
        *,
        clip: GradientTransform | None = None,
    ) -> None:
        if not isinstance(gradtape, tf.GradientTape):
            raise TypeError(f"`gradtape` must be a tf.GradientTape. Received: gradtape={gradtape!r}")
        check_bool("scale_local_gradients", scale_local_gradients)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
            raise (ValueError if isinstance(num_groups, int) and not isinstance(num_groups, bool) else TypeError)(
                f"`num_groups` must be an integer >= 0. Received: num_groups={num_groups!r}"
            )
        self._tape = gradtape
        self._reduction = Reduction(
            device_dense=device_dense, device_sparse=device_sparse, compression=compression,
            sparse_as_dense=sparse_as_dense, op=op, gradient_predivide_factor=gradient_predivide_factor,
            groups=groups if groups is not None else (num_groups or None),  # Horovod's defaults: hvdclip's for the device.
            process_set=None if process_set is hvd.global_process_set else process_set,
        )  # fmt: skip
        self._clip = check_transform("clip", clip, optional=True)
        self.report: dict[str, tf.Tensor] = {}

    def gradient(self, target: Any, sources: Sequence, output_gradients: Any = None) -> list:
        """The gradient of `target` for `sources`, averaged over ranks (and clipped, with `clip=`).

        `sources` may be Keras 3 variables (Horovod's own tape fails on them). `None` stays `None`.
        """
        sources = list(sources)
        local = self._tape.gradient(target, as_tf_variables(sources), output_gradients=output_gradients)
        state = ()
        if self._clip is not None:
            state = self._clip.init(sources)
            if tf.nest.flatten(state):
                raise HvdClipError(
                    "This clip transform keeps state between steps (AutoClip's history, ZClip's statistics), which a "
                    "tape made anew in every step cannot hold. Use hvdclip.Clipper(optimizer, clip) and "
                    "hvdclip.DistributedGradientTape(tape, clipper), whose state is broadcast and checkpointed."
                )
        prepared = reduce_and_clip(
            list(local), sources, self._reduction, self._clip, state, marker=_shared_marker(),
            step=tf.constant(0, tf.int64),
        )  # fmt: skip
        self.report = dict(prepared.metrics)
        return list(prepared.grads)
