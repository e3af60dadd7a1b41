"""The `fit` loop: epochs of agreed length over each rank's shard, callbacks, validation, resume.

Per epoch, on every rank, in lock-step:

    shard -> shuffle (seed from the checkpointed RNG) -> batch -> steps -> epoch means over ranks
    -> validation over all ranks' shards -> callbacks -> agree whether to stop

Every collective here (step allreduces, epoch means, validation, the stop vote) runs the same
number of times on every rank, because every rank runs the same steps. When every rank knows its
shard's length, the ranks agree on the shortest at the start. When some rank does not (a generator,
TFRecord files), each rank fetches the next batch *before* the step and hands the step a has-data
flag; the flag rides in the step's own gradient allreduce, and when any rank has no next batch
every rank ends the epoch after that step. Rank 0 then warns with each rank's count.

A step is the next batch and one call of the trainer's compiled step, which also advances the step
counters and adds the metrics to the epoch's sums: besides taking the batch, `fit` runs no
TensorFlow op per step (callbacks given by the user may).
"""

from __future__ import annotations

import warnings
from typing import Any

import tensorflow as tf

from hvdclip.distributed import runtime
from hvdclip.distributed.collectives import agree_any, agree_min, allgather_int64, sum_variables_over_ranks
from hvdclip.distributed.watchdog import default_watchdog
from hvdclip.trainer.callbacks import CallbackList, ProgressBar
from hvdclip.trainer.elastic import ElasticState, check_elastic, check_rescalable, launched_elastically, run_elastic
from hvdclip.trainer.data import InputPlan, batch_size_of, check_class_weight, with_class_weight
from hvdclip.trainer.evaluation import Evaluator, check_metrics
from hvdclip.validation import check_int

__all__ = ["fit"]


def fit(
    trainer: Any,
    dataset: Any,
    *,
    epochs: Any,
    steps_per_epoch: Any,
    batch_size: Any,
    shuffle_buffer: Any,
    shard: Any,
    validation_data: Any,
    validation_metrics: Any,
    callbacks: Any,
    class_weight: Any,
    verbose: Any,
    elastic: Any,
    history: Any,
) -> None:
    """Runs `HvdClipTrainer.fit` (whose docstring describes the arguments), filling `history`."""
    runtime.require_initialized("HvdClipTrainer.fit")

    def plans() -> tuple[InputPlan, InputPlan | None]:
        """The data split for the current world (again after an elastic resize)."""
        rank, size = runtime.rank(), runtime.size()
        plan = InputPlan.checked(
            "dataset", dataset, rank=rank, size=size, shard=shard, batch_size=batch_size, shuffle_buffer=shuffle_buffer
        )
        validation = None
        if validation_data is not None:
            validation = InputPlan.checked(
                "validation_data", validation_data, rank=rank, size=size, shard=shard, batch_size=batch_size,
                drop_remainder=False,
            )
        return plan, validation

    plan, validation = plans()  # Checks the data arguments before anything runs.
    epochs = check_int("epochs", epochs, ge=1)
    if steps_per_epoch is not None:
        steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, ge=1)
    metrics = check_metrics("validation_metrics", validation_metrics)
    if metrics and validation is None:
        raise ValueError(f"`validation_metrics` needs `validation_data`. Received: validation_metrics={metrics!r}")
    user_callbacks = CallbackList.checked(callbacks)
    class_weights = check_class_weight(class_weight)
    verbose = check_int("verbose", verbose, ge=0, le=2)
    policy = check_elastic(elastic)
    if policy is not None and not launched_elastically():
        if runtime.rank() == 0:
            warnings.warn(
                "fit(elastic=...) in a job that was not launched elastically: training without elastic recovery. "
                "Launch with `hvdclip-run --elastic --min-np N --max-np M --host-discovery-script S -- ...`.",
                stacklevel=3,
            )
        policy = None
    if policy is not None and policy.learning_rate == "scale":
        check_rescalable(trainer.optimizer)

    progress = [ProgressBar(verbose)] if verbose else []
    hooks = CallbackList(progress + user_callbacks, trainer, {"epochs": epochs, "steps": None, "verbose": verbose})
    evaluate = Evaluator(trainer, metrics) if validation is not None else None
    trainer.stop_training = False
    trainer.model.stop_training = False  # What Keras callbacks set to stop.
    loop = _Epochs(trainer, hooks, evaluate, history, epochs, steps_per_epoch, class_weights)
    first_world = (runtime.rank(), runtime.size())

    def resolved_plans() -> tuple[InputPlan, InputPlan | None]:
        """This world's shards (a collective: ranks agree how to shard); re-made after an elastic resize."""
        current = (plan, validation) if (runtime.rank(), runtime.size()) == first_world else plans()
        return current[0].resolved("dataset"), current[1] and current[1].resolved("validation_data")

    if policy is None:
        logs = loop.run(*resolved_plans(), None)
    else:
        # No collective before the elastic loop's first sync (a joining rank's sync would meet it):
        # the sample batch that builds the model comes from the plan before `resolved` agrees on it.
        state = ElasticState(trainer, policy, history, plan.sample_batch())
        trainer.elastic_state = state
        logs = run_elastic(state, lambda state: loop.run(*resolved_plans(), state))
    hooks.on_train_end(logs)


class _Epochs:
    """The epochs of one `fit`, from the position in `trainer.fit_state` (0, a checkpoint's, or a commit's)."""

    def __init__(self, trainer, hooks, evaluate, history, epochs, steps_per_epoch, class_weights) -> None:
        self.trainer, self.hooks, self.evaluate, self.history = trainer, hooks, evaluate, history
        self.epochs, self.steps_per_epoch, self.class_weights = epochs, steps_per_epoch, class_weights
        self.began = False  # on_train_begin ran (once, even if an elastic job re-enters `run`).

    def run(self, plan: InputPlan, validation: InputPlan | None, elastic: ElasticState | None) -> dict[str, float]:
        trainer, hooks, history = self.trainer, self.hooks, self.history
        rank = runtime.rank()
        plan.warn_if_orders_differ()
        with default_watchdog().section("agreeing on the steps per epoch"):
            length = trainer.agreed_steps(plan.for_epoch(), self.steps_per_epoch)
        steps = length.steps
        if rank == 0:
            length.warn_if_uneven()
        if not self.began or steps != hooks.params["steps"]:  # An elastic resize changes the shards' length.
            hooks.set_params({**hooks.params, "steps": steps})
        trainer.start_on(plan)
        state = trainer.fit_state
        if state.resume_pending:
            state.resume_pending = False
        else:
            state.epoch.assign(0)
            state.epoch_step.assign(0)
        start_epoch, start_step = int(state.epoch.numpy()), int(state.epoch_step.numpy())
        global_step = int(state.global_step.numpy())
        logs: dict[str, float] = {}
        names: set[str] = set()
        if not self.began or elastic is not None:
            # In an elastic job every entry (a reset's too) runs it on every rank, so a callback's
            # collective there (CheckpointSaver's directory check) meets a joining rank's.
            hooks.on_train_begin()
            self.began = True

        for epoch in range(start_epoch, self.epochs):
            first = start_step if epoch == start_epoch else 0
            # A resumed epoch reuses its seed, so it continues the same order where it stopped.
            seed = state.new_shuffle_seed() if first == 0 else int(state.shuffle_seed.numpy())
            state.epoch_sums.reset()
            for metric in trainer.metrics:
                metric.reset_state()
            hooks.on_epoch_begin(epoch, {"first_step": first})
            batches = plan.for_epoch(seed)
            if self.class_weights is not None:
                batches = with_class_weight(batches, self.class_weights)
            if steps is not None:
                batches = batches.take(steps)
            batches = iter(batches.skip(first))
            batch = next(batches, None)
            if length.watch and not agree_min(batch is not None, "first_batch"):
                batch = None  # Some rank has nothing at all this epoch: no rank steps.
            done = first
            while batch is not None:
                last = steps is not None and done + 1 >= steps
                # Fetch the next batch before the step, so the step can tell the others whether there is one.
                following = None if last else next(batches, None)
                if length.watch and not last:
                    metrics_now = trainer.run_step(*batch, has_data=following is not None)
                else:
                    metrics_now = trainer.run_step(*batch)  # Also advances the counters in `state`.
                done += 1
                global_step += 1
                hooks.on_step_end(global_step, {**metrics_now, "samples": batch_size_of(batch[0])})
                ran_out = length.watch and not last and not bool(state.all_have_data.numpy())
                if ran_out:
                    _warn_ran_out(rank, epoch, done, following is not None)
                    break
                if elastic is not None and not last:
                    elastic.maybe_commit(global_step)
                batch = following
            state.epoch.assign_add(1)
            state.epoch_step.assign(0)

            names |= state.epoch_sums.names()  # The same on every rank: all ran the same steps.
            with default_watchdog().section(f"epoch {epoch}'s metric means"):
                logs = state.epoch_sums.rank_means(sorted(names))
                if trainer.metrics:  # Over all ranks' examples: the metrics' sums are added up first.
                    sum_variables_over_ranks([v for metric in trainer.metrics for v in metric.variables], "train_metric")
                    logs.update({metric.name: float(metric.result()) for metric in trainer.metrics})
            if self.evaluate is not None:
                logs.update({f"val_{name}": value for name, value in self.evaluate(validation.for_epoch()).items()})
            hooks.on_epoch_end(epoch, logs)
            for name, value in logs.items():
                history.history.setdefault(name, []).append(value)
            history.epochs.append(epoch)
            with default_watchdog().section(f"epoch {epoch}'s stop vote"):
                stop = agree_any(trainer.stop_training or bool(trainer.model.stop_training), "stop_training")
            if stop:
                trainer.stop_training = True
                break
            if elastic is not None and epoch + 1 < self.epochs:
                elastic.maybe_commit(global_step, epoch_end=True)
        return logs


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
