"""What hvdclip does with XLA: Keras' `jit_compile` in the fit door, `tf.function(jit_compile=True)` in your loop.

hvdclip never XLA-compiles a step that holds its collectives:

* Horovod's collectives have no XLA kernels in hvdclip's build. Upstream, Horovod 0.28.1 has one for
  `HorovodAllreduce` alone, on GPU, behind `HOROVOD_ENABLE_XLA_OPS=1` (PR #3053): not for the
  grouped allreduce of hvdclip's default one-group reduction, the allgather that carries sparse
  (embedding) gradients, or the broadcast. Its source does not build against TensorFlow >= 2.16,
  so `docker/install_python.sh` compiles it out. A step that reaches a collective under XLA fails
  to compile with an OpKernel error.
* Where it does compile, XLA clusters the reduction with the backward pass, and Horovod then
  learns of the gradients only when the cluster ends: the overlap of communication with
  computation is lost (horovod#1283, #1673 report 90 % scaling efficiency falling to 78 %).

So, in the fit door: Keras' `compile(jit_compile="auto")`, the default, turns XLA on whenever
TensorFlow sees a GPU and every layer supports it; hvdclip's train function runs `train_step`
without XLA and rank 0 says so once (`compile(..., jit_compile=False)` silences it). An explicit
`jit_compile=True` is refused before any step: it asks for something that cannot be done. In your
own loop, tracing hvdclip's step inside `tf.function(jit_compile=True)` raises `HvdClipError`
naming the fix, instead of an OpKernel trace (`hvdclip.core.step`).
"""

from __future__ import annotations

import sys
import warnings

import keras

from hvdclip import foreign
from hvdclip.distributed.runtime import rank

__all__ = ["check_fit_compile"]

_warned_models: set[int] = set()


def check_fit_compile(model: keras.Model) -> None:
    """Before `fit`'s first step: refuses an explicit `jit_compile=True`; notes (rank 0, once) an "auto" one."""
    if not model.jit_compile:
        return
    requested = foreign.requested_jit_compile(model)
    if requested is True:
        raise ValueError(
            "`model` is compiled with jit_compile=True (XLA), but hvdclip's step holds Horovod collectives, which "
            "XLA cannot compile here (no kernels for the grouped allreduce, the sparse allgather or the broadcast), "
            "and XLA would stop the reduction overlapping the backward pass. Compile with jit_compile=False (or "
            "leave Keras' default: hvdclip then runs the step without XLA). Received: jit_compile=True"
        )
    if rank() == 0 and id(model) not in _warned_models:
        _warned_models.add(id(model))
        warnings.warn(
            f"Keras resolved compile(jit_compile={requested if requested is not None else 'auto'!r}) to XLA (it does "
            "on GPU nodes), but hvdclip runs the training step without XLA: its Horovod collectives have no XLA "
            "kernels here. Pass jit_compile=False to model.compile to silence this.",
            stacklevel=3,
        )
        sys.stderr.flush()
