"""The training loops being compared, as they run on one rank.

Every loop trains the same model with the same loss, optimizer and learning rate on the same
batches, and exposes one method, `run(steps)`, which returns once `steps` steps are done. The
loops differ only in what the comparison is about:

* `HvdClipLoop`: `HvdClipTrainer.fit`, the public path (allreduce -> clip -> apply, plus the
  per-step metrics and counters that `fit` keeps).
* `OwnLoopDoor`: a user's own `tf.function` step with `hvdclip.DistributedGradientTape`; with
  `groups=0`, one allreduce per gradient left to Horovod's fusion buffer instead of one group;
  with `vote=True`, every step passes `has_data` (as `hvdclip.Lockstep` does for data of unknown
  length), so the has-data vote rides the gradient allreduce.
* `KerasFitDoor`: `model.compile(hvdclip.keras.DistributedOptimizer(...))` and Keras' `fit`.
* `HandWrittenLoop`: the minimal correct Horovod loop a user could write instead.
* `SeedLoop`: the forum answer's pattern, each tensor clipped by its own norm and every variable
  re-broadcast from rank 0 after every step.
* `MirroredLoop`: `tf.distribute.MultiWorkerMirroredStrategy` with the optimizer's own
  `global_clipnorm`, TensorFlow's native alternative to Horovod.
"""

from __future__ import annotations

import horovod.tensorflow as hvd
import keras
import tensorflow as tf

import hvdclip
from benchmarks.models import ModelSpec, dataset_for

__all__ = ["CLIP_NORM", "HandWrittenLoop", "HvdClipLoop", "KerasFitDoor", "MirroredLoop", "OwnLoopDoor", "SeedLoop"]

CLIP_NORM = 1.0
LEARNING_RATE = 1e-3


def _loss_fn(**kwargs) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kwargs)


def _tf_variables(variables) -> list[tf.Variable]:
    # Horovod 0.28.1's tape and broadcast take tf.Variables only; a Keras 3 variable wraps one as `.value`.
    return [v.value for v in variables]


class HvdClipLoop:
    """hvdclip's trainer, driven through `fit` exactly as a user drives it."""

    def __init__(self, spec: ModelSpec, batch_size: int, seed: int, clip: bool, compression: str | None = None):
        self.model = spec.build()
        self.dataset = dataset_for(spec, batch_size, seed)
        self.trainer = hvdclip.HvdClipTrainer(
            self.model,
            keras.optimizers.Adam(LEARNING_RATE),
            _loss_fn(),
            clip=hvdclip.clip_by_global_norm(CLIP_NORM) if clip else None,
            reduction=hvdclip.Reduction(compression=compression),
        )

    def run(self, steps: int) -> None:
        # Each rank's dataset is already its own (shard=False); no progress bar to draw (verbose=0).
        self.trainer.fit(self.dataset, epochs=1, steps_per_epoch=steps, shard=False, verbose=0)


class OwnLoopDoor:
    """Door 1 as a user writes it: their step, `hvdclip.DistributedGradientTape`, `tape.apply_gradients`."""

    def __init__(self, spec: ModelSpec, batch_size: int, seed: int, groups: int = 1, vote: bool = False):
        self.model = spec.build()
        self.vote = vote
        self.clipper = hvdclip.Clipper(
            keras.optimizers.Adam(LEARNING_RATE), hvdclip.clip_by_global_norm(CLIP_NORM), reduction=hvdclip.Reduction(groups=groups)
        )
        self.loss_fn = _loss_fn()
        self.dataset = dataset_for(spec, batch_size, seed)
        self.step = tf.function(self._step)
        self.started = False

    def _step(self, x, y, has_data=None) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = self.loss_fn(y, self.model(x, training=True))
        tape = hvdclip.DistributedGradientTape(tape, self.clipper, has_data=has_data)
        grads = tape.gradient(loss, self.model.trainable_variables)
        tape.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss

    def run(self, steps: int) -> None:
        if not self.started:
            self.clipper.broadcast_initial_state(self.model)
            self.started = True
        loss = None
        more = tf.constant(True)  # a tensor, not a Python bool: the vote is computed, never folded away
        for x, y in self.dataset.take(steps):
            loss = self.step(x, y, more) if self.vote else self.step(x, y)
        float(loss)  # wait for the last step


class KerasFitDoor:
    """Door 2 as a user writes it: `compile` with hvdclip's optimizer wrapper, then Keras' `fit`."""

    def __init__(self, spec: ModelSpec, batch_size: int, seed: int):
        import hvdclip.keras

        self.model = spec.build()
        self.model.compile(
            optimizer=hvdclip.keras.DistributedOptimizer(
                keras.optimizers.Adam(LEARNING_RATE), clip=hvdclip.clip_by_global_norm(CLIP_NORM)
            ),
            loss=_loss_fn(),
            jit_compile=False,
        )
        self.dataset = dataset_for(spec, batch_size, seed)
        self.callbacks = [hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0)]

    def run(self, steps: int) -> None:
        # fit returns after its last step's logs are read back, so no extra wait is needed.
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=self.callbacks)


class _HorovodLoop:
    """Shared scaffolding of the two hand-written Horovod loops: build, broadcast once, iterate."""

    def __init__(self, spec: ModelSpec, batch_size: int, seed: int):
        self.model = spec.build()
        self.optimizer = keras.optimizers.Adam(LEARNING_RATE)
        self.loss_fn = _loss_fn()
        self.dataset = dataset_for(spec, batch_size, seed)
        self.step = tf.function(self._step)
        self.started = False

    def _step(self, x, y) -> tf.Tensor:
        raise NotImplementedError

    def run(self, steps: int) -> None:
        if not self.started:
            # Slots must exist before the broadcast so that rank 0's optimizer state reaches all ranks.
            self.optimizer.build(self.model.trainable_variables)
            hvd.broadcast_variables(_tf_variables(self.model.variables + self.optimizer.variables), root_rank=0)
            self.started = True
        loss = None
        for x, y in self.dataset.take(steps):
            loss = self.step(x, y)
        float(loss)  # wait for the last step


class HandWrittenLoop(_HorovodLoop):
    """Tape, `DistributedGradientTape`, `tf.clip_by_global_norm`, apply: one `tf.function`."""

    def _step(self, x, y) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = self.loss_fn(y, self.model(x, training=True))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, _tf_variables(self.model.trainable_variables))
        grads, _ = tf.clip_by_global_norm(grads, CLIP_NORM)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss


class SeedLoop(_HorovodLoop):
    """The seed's pattern: `tf.clip_by_norm` per tensor and `hvd.broadcast_variables` every step.

    Gradients are averaged with `DistributedGradientTape` (without it the ranks would not be
    training together at all); the seed's `MultiWorkerMirroredStrategy` scope is left out, as
    mixing two distribution mechanisms is not something to time.
    """

    def _step(self, x, y) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = self.loss_fn(y, self.model(x, training=True))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, _tf_variables(self.model.trainable_variables))
        grads = [tf.clip_by_norm(g, CLIP_NORM) for g in grads]
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        hvd.broadcast_variables(_tf_variables(self.model.variables), root_rank=0)
        return loss


class MirroredLoop:
    """`MultiWorkerMirroredStrategy`, a custom loop, and `Adam(global_clipnorm=...)`.

    The loss is averaged over the global batch, because the strategy sums the replicas'
    gradients. Keras 3 clips `global_clipnorm` inside `apply_gradients` *before* that sum, so this
    clips each replica's gradient, not the reduced one: it is here for speed, not as equivalent math.
    """

    def __init__(self, strategy: tf.distribute.Strategy, spec: ModelSpec, batch_size: int, seed: int):
        self.strategy = strategy
        global_batch = batch_size * strategy.num_replicas_in_sync
        with strategy.scope():
            self.model = spec.build()
            self.optimizer = keras.optimizers.Adam(LEARNING_RATE, global_clipnorm=CLIP_NORM)
        loss_fn = _loss_fn(reduction=None)

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                per_example = loss_fn(y, self.model(x, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return loss

        self.step = tf.function(lambda x, y: strategy.run(replica_step, args=(x, y)))
        batches = strategy.distribute_datasets_from_function(lambda context: dataset_for(spec, batch_size, seed))
        self.batches = iter(batches)

    def run(self, steps: int) -> None:
        loss = None
        for _ in range(steps):
            loss = self.step(*next(self.batches))
        float(self.strategy.experimental_local_results(loss)[0])  # wait for the last step
