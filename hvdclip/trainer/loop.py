"""The `fit` loop: epochs of agreed length over each rank's shard, callbacks, validation, resume.

Per epoch, on every rank, in lock-step:

    shard -> shuffle (seed from the checkpointed RNG) -> batch -> steps -> epoch means over ranks
    -> validation over all ranks' shards -> callbacks -> agree whether to stop

Every collective here (step allreduces, epoch means, validation, the stop vote) runs the same
number of times on every rank, because every rank runs the same steps (`hvdclip.core.lockstep`):
with every rank's length known, the shortest one's; with some rank's unknown, until the first
step after which some rank has no next batch, found by the has-data vote that rides in the step's
own gradient allreduce. Rank 0 then warns with each rank's count.

A step is the next batch and one call of the engine's compiled step, which also advances the step
counters and adds the metrics to the epoch's sums: besides taking the batch, `fit` runs no
TensorFlow op per step (callbacks given by the user may).

The loop drives an `Engine` (`hvdclip.trainer.engine`) with a `FitConfig`; the trainer facade is
passed only to hand it to callbacks (their `self.trainer`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import tensorflow as tf

from hvdclip.core.lockstep import EpochLength, Lockstep
from hvdclip.distributed import runtime
from hvdclip.distributed.collectives import agree_any, allgather_int64, sum_variables_over_ranks
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip.trainer.callbacks import CallbackList, ProgressBar
from hvdclip.trainer.config import FitConfig
from hvdclip.trainer.data import InputPlan, batch_size_of, with_class_weight
from hvdclip.trainer.elastic import ElasticState, run_elastic
from hvdclip.trainer.engine import Engine
from hvdclip.trainer.evaluation import Evaluator

if TYPE_CHECKING:  # The facade imports this module.
    from hvdclip.trainer.trainer import History, HvdClipTrainer

__all__ = ["fit"]


def fit(engine: Engine, config: FitConfig, trainer: HvdClipTrainer, history: History) -> None:
    """Runs `HvdClipTrainer.fit` (whose docstring describes it) with the checked `config`, filling `history`."""
    progress = [ProgressBar(config.verbose, engine.fit_state.epoch_sums)] if config.verbose else []
    hooks = CallbackList(progress + list(config.callbacks), trainer, {"epochs": config.epochs, "steps": None, "verbose": config.verbose})
    evaluate = Evaluator(engine, list(config.validation_metrics)) if config.validation_data is not None else None
    engine.stop_training = False
    engine.model.stop_training = False  # What Keras callbacks set to stop.
    loop = _Epochs(engine, config, hooks, evaluate, history)
    first_world = (runtime.rank(), runtime.size())
    first_plans = config.plans(*first_world)

    def resolved_plans() -> tuple[InputPlan, InputPlan | None]:
        """This world's shards (a collective: ranks agree how to shard); re-made after an elastic resize."""
        world = (runtime.rank(), runtime.size())
        plan, validation = first_plans if world == first_world else config.plans(*world)
        return plan.resolved("dataset"), validation and validation.resolved("validation_data")

    if config.elastic is None:
        logs = loop.run(*resolved_plans(), None)
    else:
        # No collective before the elastic loop's first sync (a joining rank's sync would meet it):
        # the sample batch that builds the model comes from the plan before `resolved` agrees on it.
        state = ElasticState(engine, config.elastic, history, first_plans[0].sample_batch())
        engine.elastic_state = state
        logs = run_elastic(state, lambda state: loop.run(*resolved_plans(), state))
    hooks.on_train_end(logs)


class _Epochs:
    """The epochs of one `fit`, from the position in `engine.fit_state` (0, a checkpoint's, or a commit's)."""

    def __init__(self, engine: Engine, config: FitConfig, hooks: CallbackList, evaluate: Evaluator | None, history: History) -> None:
        self.engine, self.config, self.hooks, self.evaluate, self.history = engine, config, hooks, evaluate, history
        self.began = False  # on_train_begin ran (once, even if an elastic job re-enters `run`).

    def run(self, plan: InputPlan, validation: InputPlan | None, elastic: ElasticState | None) -> dict[str, float]:
        engine, hooks, history, config = self.engine, self.hooks, self.history, self.config
        rank = runtime.rank()
        plan.warn_if_orders_differ()
        length = engine.epoch_length(plan.for_epoch(), config.steps_per_epoch)
        if rank == 0:
            length.warn_if_uneven()
        if not self.began or length.steps != hooks.params["steps"]:  # An elastic resize changes the shards' length.
            hooks.set_params({**hooks.params, "steps": length.steps})
        engine.start(plan.sample_batch())
        state = engine.fit_state
        start_epoch, start_step = state.take_position()
        global_step = int(state.global_step.numpy())
        logs: dict[str, float] = {}
        names: set[str] = set()
        if not self.began or elastic is not None:
            # In an elastic job every entry (a reset's too) runs it on every rank, so a callback's
            # collective there (CheckpointSaver's directory check) meets a joining rank's.
            hooks.on_train_begin()
            self.began = True

        for epoch in range(start_epoch, config.epochs):
            first = start_step if epoch == start_epoch else 0
            # A resumed epoch reuses its seed, so it continues the same order where it stopped.
            seed = state.new_shuffle_seed() if first == 0 else int(state.shuffle_seed.numpy())
            state.epoch_sums.reset()
            for metric in engine.metrics:
                metric.reset_state()
            hooks.on_epoch_begin(epoch, {"first_step": first})
            batches = plan.for_epoch(seed)
            if config.class_weights is not None:
                batches = with_class_weight(batches, config.class_weights)
            if length.steps is not None:
                batches = batches.take(length.steps)
            global_step = self._steps(batches.skip(first), length, epoch, first, global_step, elastic)
            state.epoch.assign_add(1)
            state.epoch_step.assign(0)

            names |= state.epoch_sums.names()  # The same on every rank: all ran the same steps.
            with default_watchdog().section(f"epoch {epoch}'s metric means"):
                logs = state.epoch_sums.rank_means(sorted(names))
                if engine.metrics:  # Over all ranks' examples: the metrics' sums are added up first.
                    sum_variables_over_ranks([v for metric in engine.metrics for v in metric.variables], "train_metric")
                    logs.update({metric.name: float(metric.result()) for metric in engine.metrics})
            if self.evaluate is not None:
                logs.update({f"val_{name}": value for name, value in self.evaluate(validation.for_epoch()).items()})
            hooks.on_epoch_end(epoch, logs)
            for name, value in logs.items():
                history.history.setdefault(name, []).append(value)
            history.epochs.append(epoch)
            with default_watchdog().section(f"epoch {epoch}'s stop vote"):
                stop = agree_any(engine.stop_training or bool(engine.model.stop_training), "stop_training")
            if stop:
                engine.stop_training = True
                break
            if elastic is not None and epoch + 1 < config.epochs:
                elastic.maybe_commit(global_step, epoch_end=True)
        return logs

    def _steps(self, batches: tf.data.Dataset, length: EpochLength, epoch: int, first: int, global_step: int,
               elastic: ElasticState | None) -> int:  # fmt: skip
        """One epoch's steps from step `first`; returns the global step after them."""
        engine, hooks = self.engine, self.hooks
        lockstep = Lockstep(batches, engine.clipper) if length.watch else None
        done = first
        for batch, has_next in lockstep if lockstep is not None else ((batch, None) for batch in batches):
            metrics = engine.run_step(*batch, has_data=has_next)  # Also advances the counters in `fit_state`.
            done += 1
            global_step += 1
            hooks.on_step_end(global_step, {**metrics, "samples": batch_size_of(batch[0])})
            # Not on the epoch's last step: the epoch-end commit follows it (a commit there would
            # resume into an epoch with no steps left and nothing to average).
            last = (length.steps is not None and done >= length.steps) or (
                lockstep is not None and not bool(metrics["all_have_data"])
            )
            if elastic is not None and not last:
                elastic.maybe_commit(global_step)
        if lockstep is not None and lockstep.ran_out:
            _warn_ran_out(runtime.rank(), epoch, lockstep.steps, lockstep.had_more)
        return global_step


def _warn_ran_out(rank: int, epoch: int, steps: int, had_more: bool) -> None:
    """After an epoch some rank's data ended: rank 0 warns with each rank's count (one allgather)."""
    more = allgather_int64([int(had_more)], "ran_out")
    if rank != 0 or not more.any():
        return  # Every rank ran out at the same step: the data simply ended.
    counts = ", ".join(f"rank {r}: {'more than ' if m else ''}{steps}" for r, m in enumerate(more.tolist()))
    warnings.warn(
        f"Epoch {epoch}: rank(s) {[r for r, m in enumerate(more.tolist()) if not m]} ran out of data after {steps} "
        f"batches, so every rank ended the epoch at step {steps} (batches per rank: {counts}). The other ranks' "
        "remaining batches were not used this epoch; shards of equal length use them all.",
        stacklevel=3,
    )
