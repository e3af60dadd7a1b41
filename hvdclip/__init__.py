"""hvdclip: Horovod data-parallel training for TensorFlow 2 / Keras 3, clipping the reduced gradient.

`import hvdclip` is cheap and initialises nothing: the names below load their module (and with it
TensorFlow and Horovod) on first use, so `hvdclip.launch` and `hvdclip.errors` work on a head node
without TensorFlow.
"""

import importlib

# Public name -> module defining it. The only logic here is PEP 562's lazy attribute lookup.
_EXPORTS = {
    "HvdClipTrainer": "hvdclip.trainer",
    "History": "hvdclip.trainer",
    "Elastic": "hvdclip.trainer.elastic",
    "Clipper": "hvdclip.core",
    "DistributedGradientTape": "hvdclip.core",
    "Lockstep": "hvdclip.core",
    "Reduction": "hvdclip.distributed.reduction",
    "init": "hvdclip.distributed.runtime",
    "is_initialized": "hvdclip.distributed.runtime",
    "rank": "hvdclip.distributed.runtime",
    "size": "hvdclip.distributed.runtime",
    "local_rank": "hvdclip.distributed.runtime",
    "GradientTransform": "hvdclip.transforms",
    "TransformResult": "hvdclip.transforms",
    "ClipReport": "hvdclip.transforms",
    "chain": "hvdclip.transforms",
    "identity": "hvdclip.transforms",
    "clip_by_value": "hvdclip.transforms",
    "clip_by_norm": "hvdclip.transforms",
    "clip_by_global_norm": "hvdclip.transforms",
    "adaptive_grad_clip": "hvdclip.transforms",
    "autoclip": "hvdclip.transforms",
    "zclip": "hvdclip.transforms",
    "zero_nonfinite": "hvdclip.transforms",
    "Callback": "hvdclip.trainer.callbacks",
    "TensorBoard": "hvdclip.trainer.tensorboard",
    "SyncBatchNormalization": "hvdclip.keras.batch_norm",
    "sync_batch_norm": "hvdclip.keras.batch_norm",
    "CheckpointSaver": "hvdclip.trainer.checkpoint",
    "ScaledWarmup": "hvdclip.keras.schedules",
    "CheckpointError": "hvdclip.errors",
    "ElasticResetError": "hvdclip.errors",
    "OutputDirectoryError": "hvdclip.errors",
    "HvdClipError": "hvdclip.errors",
    "LauncherError": "hvdclip.errors",
    "NonFiniteGradientError": "hvdclip.errors",
    "NotInitializedError": "hvdclip.errors",
    "RankMismatchError": "hvdclip.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hvdclip' has no attribute {name!r}")


def __dir__():
    return __all__
