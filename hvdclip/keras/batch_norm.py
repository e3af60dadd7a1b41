"""`SyncBatchNormalization`: BatchNormalization whose training statistics cover every rank's batch.

With plain BatchNormalization each rank normalises by the mean and variance of its own batch and
keeps its own moving statistics, so N ranks with batch B do not train like one process with
batch N*B, and the ranks' moving statistics drift apart. `SyncBatchNormalization` computes the
batch statistics over all ranks' examples (`hvdclip.distributed.batch_statistics`), so every
rank normalises the same way and holds the same moving statistics.

`sync_batch_norm(model)` rebuilds a Sequential or functional model with each BatchNormalization
replaced, weights kept.
"""

from __future__ import annotations

import keras

from hvdclip import foreign
from hvdclip.distributed import runtime
from hvdclip.distributed.batch_statistics import global_moments

__all__ = ["SyncBatchNormalization", "sync_batch_norm"]

foreign.require_batch_norm_moments_hook()  # The Keras hook `_moments` overrides below.


@keras.saving.register_keras_serializable(package="hvdclip")
class SyncBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization with batch statistics over all Horovod ranks (TensorFlow backend).

    Takes BatchNormalization's arguments. In training (`training=True`, trainable layer) the batch
    mean and variance are those of every rank's examples together, from one grouped allreduce of
    per-channel counts, sums and sums of squares; ranks may hold different batch sizes. Gradients
    flow through that allreduce, so 2 ranks with batch B compute what one process computes with
    the combined batch 2B. Inference uses the moving statistics, which stay identical on every
    rank. At size 1 it is exactly BatchNormalization.

    Every rank must call the layer in training mode in the same steps (it is a collective), as
    `HvdClipTrainer` does. `synchronized` (for `tf.distribute`) is accepted for compatibility
    with BatchNormalization configs and ignored: this layer always synchronises over Horovod.

    Example:
        >>> x = keras.layers.Conv2D(32, 3)(inputs)
        >>> x = hvdclip.SyncBatchNormalization(momentum=0.9)(x)
    """

    # Its moving statistics are the same on every rank: the consistency guard compares them and
    # checkpoints need not average them (hvdclip.distributed.consistency.rank_local_variables).
    synchronized_over_ranks = True

    def __init__(self, *args, synchronized: bool = False, **kwargs) -> None:
        del synchronized  # tf.distribute's switch; `ops.moments(synchronized=True)` would change the math at size 1.
        super().__init__(*args, **kwargs)

    def _moments(self, inputs, mask):
        runtime.require_initialized(f"SyncBatchNormalization {self.name!r} in training")
        if runtime.size() == 1:
            return super()._moments(inputs, mask)
        weights = None
        if mask is not None:
            # Broadcast as BatchNormalization does: the mask covers every axis but the last.
            weights = keras.ops.broadcast_to(keras.ops.expand_dims(mask, axis=-1), keras.ops.shape(inputs))
        return global_moments(inputs, self._reduction_axes, weights=weights)


def _is_plain_batch_norm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization) and not isinstance(layer, SyncBatchNormalization)


def _replace(layer: keras.layers.Layer) -> keras.layers.Layer:
    if type(layer) is keras.layers.BatchNormalization:
        return SyncBatchNormalization.from_config(layer.get_config())
    if _is_plain_batch_norm(layer):
        raise ValueError(
            f"`model` holds layer {layer.name!r} of class {type(layer).__name__}, a subclass of "
            "BatchNormalization that sync_batch_norm cannot convert without losing its own behaviour; "
            "make it subclass hvdclip.SyncBatchNormalization instead."
        )
    return layer.__class__.from_config(layer.get_config())


def _layers_within(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # Keras keeps no public list of a layer's sublayers at every depth.
    return foreign.flatten_layers(layer, include_self=False)


def sync_batch_norm(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with every BatchNormalization replaced by `SyncBatchNormalization`.

    Layers inside nested Sequential and functional models are replaced too; every weight (gamma,
    beta, moving mean and variance, and all other layers' weights) is kept, and the layers keep
    their names and configs. Call it before creating the `HvdClipTrainer` and optimizer: the
    copy has new variables.

    Args:
        model: a Sequential or functional `keras.Model`.

    Returns:
        A new model of the same architecture; `model` itself is left unchanged.

    Raises:
        TypeError: `model` is not a `keras.Model`.
        ValueError: `model` is a subclassed model (its layers cannot be rebuilt from outside),
            or holds BatchNormalization layers that cannot be replaced (inside a custom layer or
            a nested subclassed model, or a subclass of BatchNormalization).

    Example:
        >>> model = hvdclip.sync_batch_norm(keras.applications.ResNet50(weights=None))
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model (Keras 3). Received: model={model!r}")
    if not isinstance(model, (keras.Sequential, foreign.functional_model_class())):
        raise ValueError(
            f"`model` is a subclassed keras.Model ({type(model).__name__}), whose layers sync_batch_norm "
            "cannot rebuild. Create its layers with hvdclip.SyncBatchNormalization in place of "
            "keras.layers.BatchNormalization (it takes the same arguments), or build the model with the "
            f"Sequential or functional API. Received: model={model.name!r}"
        )
    clone = keras.models.clone_model(model, clone_function=_replace, recursive=True)
    left = [layer.name for layer in _layers_within(clone) if _is_plain_batch_norm(layer)]
    if left:
        raise ValueError(
            f"`model` holds BatchNormalization layers that sync_batch_norm cannot reach: {left}. They sit "
            "inside a custom layer or a subclassed model; create them as hvdclip.SyncBatchNormalization "
            f"there instead. Received: model={model.name!r}"
        )
    if model.built:
        clone.set_weights(model.get_weights())
    return clone
