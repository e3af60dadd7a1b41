"""`load_model`: a saved Keras 3 model, its optimizer wrapped in hvdclip's `DistributedOptimizer`.

Horovod's `load_model` maps each optimizer class's lower-cased name to a wrapping factory, the
keys Keras 2's HDF5 configs used. Keras 3 looks optimizers up by class name ("Adam"), so on Keras 3
Horovod's returns the model with its optimizer *not* wrapped: training it averages nothing, and the
ranks drift apart silently. This one loads the model with its optimizer (and the optimizer's saved
state), then recompiles it as it was saved with that optimizer inside a `DistributedOptimizer`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import keras
from horovod.tensorflow.compression import Compression

from hvdclip.distributed.reduction import Reduction
from hvdclip.validation import check_bool

__all__ = ["load_model"]


def load_model(
    filepath,
    custom_optimizers: Sequence[type] | None = None,
    custom_objects: Mapping[str, Any] | None = None,
    compression=Compression.none,
    legacy_opts: bool = False,
) -> keras.Model:
    """Loads a saved Keras 3 model (`.keras`, or a legacy `.h5`) and wraps its optimizer for Horovod.

    Horovod's signature and defaults. The optimizer keeps the state it was saved with (slots,
    `iterations`, learning rate); the model is compiled again with the saved loss, metrics and
    settings and `hvdclip.keras.DistributedOptimizer(optimizer, compression=compression)`,
    without clipping (pass a new one to `compile` to clip). A model saved with hvdclip's
    `DistributedOptimizer` gets its inner optimizer rewrapped. A model saved without an
    optimizer is returned as loaded.

    Args:
        filepath: the saved model's path.
        custom_optimizers: optimizer classes that are not Keras' own, so that Keras can rebuild them.
        custom_objects: Keras' `custom_objects` for everything else the model needs.
        compression: Horovod's gradient compression (`Compression.none` or `Compression.fp16`).
        legacy_opts: must be False: Keras 3 has no `keras.optimizers.legacy`.

    Example:
        >>> model = hvd.load_model("checkpoint-3.keras")
        >>> model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    """
    from hvdclip.keras.optimizer import DistributedOptimizer  # hvdclip.keras imports this module.

    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"`filepath` must be a path (str or os.PathLike). Received: filepath={filepath!r}")
    if not os.path.isfile(filepath):
        raise ValueError(f"`filepath` must be a saved Keras model file, and there is no file there. Received: filepath={filepath!r}")
    Reduction(compression=compression)  # Checked before the file is read.
    if check_bool("legacy_opts", legacy_opts):
        raise ValueError(
            "`legacy_opts` must be False: Keras 3 has no keras.optimizers.legacy (its optimizers are "
            f"keras.optimizers.*). Received: legacy_opts={legacy_opts!r}"
        )
    objects = dict(_checked_mapping("custom_objects", custom_objects))
    for cls in _checked_classes(custom_optimizers):
        objects.setdefault(cls.__name__, cls)
    with warnings.catch_warnings():
        # DistributedOptimizer.from_config's advice (compile=False, compile again) is what this function does.
        warnings.filterwarnings("ignore", message="hvdclip.keras.DistributedOptimizer was restored without")
        model = keras.models.load_model(filepath, custom_objects=objects)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return model
    if isinstance(optimizer, DistributedOptimizer):
        optimizer = optimizer.inner_optimizer
        warnings.warn(
            f"{os.fspath(filepath)!r} was saved with hvdclip's DistributedOptimizer; load_model wraps its optimizer "
            "again without a clip transform (a .keras file cannot hold one). To clip, compile with "
            "DistributedOptimizer(model.optimizer.inner_optimizer, clip=...).",
            stacklevel=2,
        )
    compile_config = {k: v for k, v in model.get_compile_config().items() if k != "optimizer"}
    settings = keras.saving.deserialize_keras_object(compile_config, custom_objects=objects)
    model.compile(optimizer=DistributedOptimizer(optimizer, compression=compression), **settings)
    return model


def _checked_mapping(name: str, value) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a dict of names to objects or None. Received: {name}={value!r}")
    return value


def _checked_classes(value) -> list[type]:
    if value is None:
        return []
    classes = list(value) if isinstance(value, (list, tuple)) else None
    if classes is None or not all(isinstance(c, type) and issubclass(c, keras.optimizers.Optimizer) for c in classes):
        raise TypeError(
            "`custom_optimizers` must be a list of keras.optimizers.Optimizer subclasses or None. "
            f"Received: custom_optimizers={value!r}"
        )
    return classes
