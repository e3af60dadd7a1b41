"""Gradient accumulation as state: k micro-batches per optimizer step, held in variables the core owns.

With `accumulation_steps=k`, the first k - 1 calls of the step (micro-steps) add this rank's local
gradient to its accumulators and communicate nothing; the k-th sums the window, divides by k
(`average=True`, the mean of the k micro-batch gradients: the gradient of the mean loss over the
k micro-batches) or not (Horovod's default `average_aggregated_gradients=False`: their sum), and
sends that through the reduction, clip, guard and apply like any step. Which call is the k-th is
decided by the micro-step counter, a variable that is identical on every rank (broadcast at
start-up, checkpointed), so every rank skips or runs the allreduce at the same calls.

The counter is shared state, like the weights. The accumulators are not: each rank sums its own
micro-batches, so they are *rank-local* state (like a random layer's seed): never broadcast (a
broadcast would give every rank rank 0's partial sums), saved per rank by whoever checkpoints
them. Inside a window they hold the only record of the micro-batches already seen, so a checkpoint
taken there must keep every rank's (`HvdClipTrainer`'s `CheckpointSaver` gathers them; Keras'
`BackupAndRestore` needs one directory per rank) for a resume to be exact. `owner` records which
rank's sums a rank holds, so a restore that gave a rank someone else's sums, or none, is caught
before the next step instead of training on the wrong sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from hvdclip.distributed.bridge import as_tf_variables
from hvdclip.validation import check_bool, check_int

__all__ = ["Accumulation"]


class Accumulation:
    """The accumulators and micro-step counter of one step owner (a `Clipper`).

    Args:
        steps: micro-batches per optimizer step (>= 2; 1 means no accumulation and no object).
        average: divide the window's sum by `steps` before the reduction.
    """

    def __init__(self, steps: int, average: bool = True) -> None:
        self.steps = check_int("accumulation_steps", steps, ge=2)
        self.average = check_bool("average_accumulated", average)
        self.micro_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_micro_step")
        # The rank whose micro-batches the accumulators hold (-1: none yet; rank-local, like them).
        self.owner = tf.Variable(-1, dtype=tf.int64, trainable=False, name="hvdclip_accumulators_owner")
        self.accumulators: list[tf.Variable] = []

    def build(self, variables: Sequence) -> None:
        """One dense accumulator per trainable variable, zero (no communication)."""
        self.accumulators = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="hvdclip_accumulator")
            for v in as_tf_variables(variables)
        ]

    @property
    def shared_variables(self) -> list[tuple[str, tf.Variable]]:
        """State identical on every rank: broadcast, checkpointed once."""
        return [("accumulation/micro_step", self.micro_step)]

    @property
    def local_variables(self) -> list[tuple[str, tf.Variable]]:
        """This rank's own sums and whose they are: checkpointed per rank, never broadcast."""
        return [("accumulation/owner", self.owner)] + [
            (f"accumulation/sum[{i}]", accumulator) for i, accumulator in enumerate(self.accumulators)
        ]

    def closes_window(self) -> tf.Tensor:
        """Whether this call is the window's last micro-batch (a bool scalar, the same on every rank)."""
        return tf.equal(self.micro_step, self.steps - 1)

    def window_gradient(self, local: Sequence) -> list:
        """The window's gradient: the sums plus this last micro-batch's, divided by `steps` if averaging.

        Dense, whatever the local gradient was (an embedding's rows land in a dense accumulator).
        `None` stays `None` (a variable the loss never reaches).
        """
        out = []
        for accumulator, grad in zip(self.accumulators, local):
            if grad is None:
                out.append(None)
                continue
            total = accumulator + tf.convert_to_tensor(grad)
            out.append(total / tf.cast(self.steps, total.dtype) if self.average else total)
        return out

    def add(self, local: Sequence, rank: int) -> tf.Operation:
        """A micro-step: adds this rank's local gradient to its sums."""
        updates = [self.owner.assign(rank)]
        updates += [a.assign_add(tf.convert_to_tensor(g)) for a, g in zip(self.accumulators, local) if g is not None]
        with tf.control_dependencies(updates):
            return self.micro_step.assign_add(1)

    def reset(self) -> tf.Operation:
        """After the window's step: zero sums, counter back to 0."""
        updates = [a.assign(tf.zeros_like(a)) for a in self.accumulators] + [self.owner.assign(-1)]
        with tf.control_dependencies(updates):
            return self.micro_step.assign(0)
