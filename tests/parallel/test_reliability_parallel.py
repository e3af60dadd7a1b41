"""Ranks that disagree fail fast and clearly, on every rank: structure at start-up, weights later."""

import keras
import numpy as np
import pytest

import hvdclip
from support import allgather, make_data, make_mlp


def start_with(model, **kwargs):
    trainer = hvdclip.HvdClipTrainer(model, keras.optimizers.Adam(1e-3), keras.losses.MeanSquaredError(), **kwargs)
    x, y = make_data(seed=0, n=8)
    try:
        trainer.train_step(x, y)
    except hvdclip.RankMismatchError as error:
        return str(error)
    return None


def test_a_shape_mismatch_is_named_on_every_rank_before_the_broadcast(world):
    rank, _ = world
    message = start_with(make_mlp(seed=1, hidden=16 if rank == 0 else 12))
    flags = allgather(np.array([message is not None]))
    assert flags.all(), "every rank must raise, or the others would hang"
    assert "variable #0" in message and "shape=[8, 16]" in message and "shape=[8, 12]" in message
    assert "rank 1" in message


def test_a_variable_count_mismatch_is_named(world):
    rank, _ = world
    if rank == 0:
        model = make_mlp(seed=1)
    else:
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    message = start_with(model)
    flags = allgather(np.array([message is not None]))
    assert flags.all()
    assert "Ranks built different models" in message


def test_a_dtype_mismatch_is_named(world):
    rank, _ = world
    layer_dtype = "float32" if rank == 0 else "float64"
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, dtype=layer_dtype)])
    message = start_with(model)
    flags = allgather(np.array([message is not None]))
    assert flags.all()
    assert "dtype=float32" in message and "dtype=float64" in message


def test_the_divergence_guard_catches_weights_changed_on_one_rank(world):
    rank, _ = world
    model = make_mlp(seed=2)
    trainer = hvdclip.HvdClipTrainer(
        model, keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError(), check_consistency_every=3
    )
    x, y = make_data(seed=rank, n=80)
    raised_at = None
    for step in range(1, 10):
        if step == 5 and rank == 1:
            kernel = model.trainable_variables[0]
            kernel.assign(kernel + 1e-7)  # Tiny, silent drift on one rank only.
        try:
            trainer.train_step(x[step * 8 : (step + 1) * 8], y[step * 8 : (step + 1) * 8])
        except hvdclip.RankMismatchError as error:
            raised_at = (step, str(error))
            break
    steps = allgather(np.array([raised_at[0] if raised_at else -1]))
    assert steps.tolist() == [[6], [6]], "both ranks must raise together at the first check after the drift"
    assert "drifted apart by step 6" in raised_at[1] and "[1]" in raised_at[1]


def test_a_skip_is_logged_once_by_rank_0(world, capfd):
    rank, _ = world
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=3), keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError())
    x, y = make_data(seed=rank, n=16)
    trainer.train_step(x[:8], y[:8])
    bad = x[8:].copy()
    if rank == 1:
        bad[0, 0] = np.inf
    capfd.readouterr()
    skipped = trainer.train_step(bad, y[8:])["skipped"]
    err = capfd.readouterr().err
    lines = allgather(np.array([err.count("hvdclip: skipped a step"), int(skipped)]))
    assert lines.tolist() == [[1, 1], [0, 1]]
