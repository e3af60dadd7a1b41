"""Where `fit` is in a run, and its random state: the counters a checkpoint needs to resume exactly.

They are `tf.Variable`s, so the start-up broadcast makes them identical on every rank and a
checkpoint saves and restores them with the model. `fit`'s compiled step advances them itself
(`record_step`), together with the epoch's metric sums, so a step costs no eager op for them.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import tensorflow as tf

from hvdclip.distributed import bridge as horovod_bridge
from hvdclip.core.step_sums import StepSums

__all__ = ["FitState"]


class FitState:
    """Counters and RNG of the training loop.

    Attributes:
        global_step: steps run by `fit` over the trainer's life, skipped steps included.
        epoch: the epoch `fit` is in (0-based), or the number done once it has finished.
        epoch_step: steps done in that epoch.
        shuffle_seed: the seed the current epoch's shuffle used (kept to resume mid-epoch).
        seed_generator: the RNG that draws each epoch's shuffle seed. Created from Keras' global
            seed (`keras.utils.set_random_seed`), if one is set; rank 0's state is broadcast.
        epoch_sums: this rank's sums of the step metrics of the epoch so far. Not broadcast nor
            checkpointed: the means of an epoch resumed mid-way are over the steps run since.

    Whether the next `fit` continues from the position held here (a restored checkpoint, an
    elastic commit) or starts at epoch 0 is one flag, set by `resume_here` and consumed by
    `take_position`.
    """

    def __init__(self) -> None:
        def counter(name: str) -> tf.Variable:
            return tf.Variable(0, dtype=tf.int64, trainable=False, name=f"hvdclip_{name}")

        self.global_step = counter("global_step")
        self.epoch = counter("epoch")
        self.epoch_step = counter("epoch_step")
        self.shuffle_seed = counter("shuffle_seed")
        self.seed_generator = keras.random.SeedGenerator(name="hvdclip_shuffle_seed_generator")
        self._resume = False
        self.epoch_sums = StepSums()

    def resume_here(self, resume: bool = True) -> None:
        """The next `fit` continues from the held position (True: after a restore or an elastic reset)."""
        self._resume = bool(resume)

    @property
    def resuming(self) -> bool:
        return self._resume

    def take_position(self) -> tuple[int, int]:
        """(epoch, step in it) where `fit` starts: the held position if resuming (once), else (0, 0)."""
        if not self._resume:
            self.epoch.assign(0)
            self.epoch_step.assign(0)
        self._resume = False
        return int(self.epoch.numpy()), int(self.epoch_step.numpy())

    @property
    def variables(self) -> list[tf.Variable]:
        """What the start-up broadcast sends and a checkpoint holds (not `epoch_sums`)."""
        rng_state = horovod_bridge.as_tf_variables([self.seed_generator.state])
        return [self.global_step, self.epoch, self.epoch_step, self.shuffle_seed, *rng_state]

    def record_step(self, metrics: Mapping[str, tf.Tensor]) -> None:
        """Counts one step of `fit` and adds its metrics to the epoch's sums; call it inside the compiled step."""
        self.global_step.assign_add(1)
        self.epoch_step.assign_add(1)
        self.epoch_sums.add(metrics)

    def new_shuffle_seed(self) -> int:
        """Draws the next epoch's shuffle seed (the same on every rank, whose RNG states agree)."""
        seed = keras.random.randint((), 0, 2**31 - 1, seed=self.seed_generator, dtype="int32")
        self.shuffle_seed.assign(tf.cast(seed, tf.int64))
        return int(seed)
