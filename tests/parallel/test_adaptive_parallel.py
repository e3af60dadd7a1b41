"""Adaptive clipping on 2 ranks: each rank trains on its own data, and the model, the optimizer
slots and the clip state (AutoClip's history, ZClip's statistics, zero_nonfinite's counters) stay
bit-identical, because every statistic is computed from the reduced gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.distributed import bridge as horovod_bridge
from support import allgather, checksum, make_data, make_mlp

STEPS = 30
BATCH = 16
SPIKE_STEPS = (12, 20)  # targets scaled up 30x on both ranks: a gradient-norm spike for ZClip


def train(clip, rank, *, nan_step=None, skip_nonfinite=True):
    trainer = hvdclip.HvdClipTrainer(
        make_mlp(seed=9), keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=clip,
        skip_nonfinite=skip_nonfinite,
    )  # fmt: skip
    x, y = make_data(seed=300 + rank, n=STEPS * BATCH)
    for step in SPIKE_STEPS:
        y[step * BATCH : (step + 1) * BATCH] *= 30.0
    if nan_step is not None and rank == 0:
        x[nan_step * BATCH, 0] = np.nan  # one rank's NaN makes the reduced gradient NaN everywhere
    metrics = [trainer.train_step(x[s * BATCH : (s + 1) * BATCH], y[s * BATCH : (s + 1) * BATCH]) for s in range(STEPS)]
    return trainer, metrics


def fingerprints(trainer):
    """Per-rank SHA-256s of model, optimizer and clip state, gathered from every rank."""
    optimizer_variables = horovod_bridge.as_tf_variables(trainer.optimizer.variables)
    return (
        allgather(checksum(trainer.model.variables)),
        allgather(checksum(optimizer_variables)),
        allgather(checksum(tf.nest.flatten(trainer.clip_state))),
    )


def engaged_steps(metrics):
    # Steps whose norm the clip really lowered. Not `clip_active` alone: the trainer's two norms
    # come from differently fused graphs and can differ by an ulp when nothing was clipped.
    return [step for step, m in enumerate(metrics) if m["clipped_grad_norm"] < m["grad_norm"] * (1 - 1e-4)]


METHODS = {
    "agc": lambda: hvdclip.adaptive_grad_clip(0.01),
    "autoclip": lambda: hvdclip.autoclip(10, history=8),  # 30 steps wrap the 8-slot ring buffer
    "zclip": lambda: hvdclip.zclip(alpha=0.9, z_threshold=2.5, warmup_steps=5),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_adaptive_clipping_keeps_model_optimizer_and_clip_state_identical(world, method):
    rank, _ = world
    trainer, metrics = train(METHODS[method](), rank)
    model_sums, optimizer_sums, clip_sums = fingerprints(trainer)
    losses = allgather(np.array([m["loss"] for m in metrics]))
    active = engaged_steps(metrics)
    state = [v.numpy() for v in tf.nest.flatten(trainer.clip_state)]

    assert (model_sums == model_sums[0]).all(), "model variables differ between ranks"
    assert (optimizer_sums == optimizer_sums[0]).all(), "optimizer slots differ between ranks"
    assert (clip_sums == clip_sums[0]).all(), "clip state differs between ranks"
    assert not np.array_equal(losses[0], losses[1]), "ranks should have seen different data"
    if method == "zclip":
        assert set(SPIKE_STEPS) <= set(active), f"ZClip should clip the injected spikes; clipped steps: {active}"
        assert int(state[-1]) == STEPS and np.isfinite(state[:2]).all()
    else:
        assert len(active) >= STEPS // 2, f"{method} clipped only on steps {active}"
    if method == "autoclip":
        assert int(state[1]) == STEPS and np.all(state[0] > 0), "the ring buffer wrapped and holds 8 norms"


def test_zero_nonfinite_keeps_autoclip_history_clean_on_every_rank(world):
    rank, _ = world
    # The trainer's own skip is off, so the wrapper is what holds the NaN step back.
    clip = hvdclip.zero_nonfinite(hvdclip.autoclip(10, history=8))
    trainer, metrics = train(clip, rank, nan_step=7, skip_nonfinite=False)
    model_sums, optimizer_sums, clip_sums = fingerprints(trainer)
    state = trainer.clip_state

    assert (model_sums == model_sums[0]).all() and (optimizer_sums == optimizer_sums[0]).all()
    assert (clip_sums == clip_sums[0]).all(), "clip state (history and counters) differs between ranks"
    assert np.isnan(metrics[7]["grad_norm"]) and metrics[7]["clipped_grad_norm"] == 0.0
    assert int(state.skipped.numpy()) == 1 and int(state.consecutive.numpy()) == 0
    assert int(state.inner.count.numpy()) == STEPS - 1, "the NaN step must not enter AutoClip's history"
    assert np.isfinite(state.inner.norms.numpy()).all()
    assert all(np.isfinite(v.numpy()).all() for v in trainer.model.variables)
