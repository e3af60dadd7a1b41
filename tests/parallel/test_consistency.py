"""Ranks train on different data and stay bit-identical, with one broadcast at start-up."""

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import hvdclip
from hvdclip.distributed import bridge as horovod_bridge
from hvdclip.distributed import collectives
from support import allgather, checksum, make_data, make_mlp


def test_ranks_stay_bit_identical_with_active_global_norm_clipping(world):
    rank, _ = world
    model = make_mlp(seed=7)
    trainer = hvdclip.HvdClipTrainer(
        model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(0.5)
    )
    x, y = make_data(seed=100 + rank, n=50 * 16)
    active, norms, losses = [], [], []
    for step in range(50):
        rows = slice(step * 16, (step + 1) * 16)
        metrics = trainer.train_step(x[rows], y[rows])
        active.append(metrics["clip_active"])
        norms.append(metrics["grad_norm"])
        losses.append(metrics["loss"])

    model_sums = allgather(checksum(model.variables))
    optimizer_sums = allgather(checksum(optimizer_variables(trainer)))
    norm_rows = allgather(np.array(norms))
    loss_rows = allgather(np.array(losses))

    assert sum(active) >= 40, f"clipping was active on only {sum(active)} of 50 steps; the test needs it to bite"
    assert (model_sums == model_sums[0]).all(), "model variables differ between ranks"
    assert (optimizer_sums == optimizer_sums[0]).all(), "optimizer slots differ between ranks"
    assert np.array_equal(norm_rows[0], norm_rows[1]), "grad_norm must be the reduced gradient's, the same everywhere"
    assert not np.array_equal(loss_rows[0], loss_rows[1]), "ranks should have seen different data"
    assert trainer.broadcast_count == 1


def optimizer_variables(trainer):
    return horovod_bridge.as_tf_variables(trainer.optimizer.variables)


def test_fit_from_different_initial_weights_broadcasts_once(world, monkeypatch):
    rank, _ = world
    calls = []
    real_broadcast = collectives.broadcast_from_root

    def counting_broadcast(variables, root_rank=0):
        calls.append(len(variables))
        return real_broadcast(variables, root_rank)

    # Every start-up broadcast goes through this one function (the core step's and the trainer's).
    monkeypatch.setattr(collectives, "broadcast_from_root", counting_broadcast)
    model = make_mlp(seed=rank + 1)  # Different random weights on each rank.
    before = allgather(checksum(model.variables))
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    trainer = hvdclip.HvdClipTrainer(model, optimizer, keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0))
    x, y = make_data(seed=200 + rank, n=96)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    history = trainer.fit(dataset, epochs=3)
    after = allgather(checksum(model.variables))
    after_optimizer = allgather(checksum(optimizer_variables(trainer)))

    assert not (before == before[0]).all(), "ranks must start from different weights for this test to mean anything"
    assert (after == after[0]).all()
    assert (after_optimizer == after_optimizer[0]).all()
    assert len(calls) == 1, f"expected exactly one broadcast for 18 steps, saw {len(calls)}"
    # The single broadcast carried everything together: model, optimizer and the counters fit checkpoints.
    assert calls[0] == len(trainer.engine.named_state_variables()) > len(model.variables) + len(optimizer.variables)
    assert trainer.broadcast_count == 1
    assert len(history.history["loss"]) == 3


def test_the_compiled_step_allreduces_and_never_broadcasts(world):
    rank, _ = world
    trainer = hvdclip.HvdClipTrainer(
        make_mlp(seed=5), keras.optimizers.Adam(1e-3), keras.losses.MeanSquaredError(), clip=hvdclip.clip_by_global_norm(1.0)
    )
    x, y = make_data(seed=rank, n=8)
    trainer.train_step(x, y)
    # train_step's compiled step, and fit's (the same step plus its counters and metric sums).
    for step in (trainer.engine._compiled,):
        graph_def = step.get_concrete_function(tf.constant(x), tf.constant(y)).graph.as_graph_def()
        # Horovod's allreduce sits in nested functions, so look through the function library too.
        op_types = {node.op for node in graph_def.node}
        op_types |= {node.op for function in graph_def.library.function for node in function.node_def}
        assert any("Allreduce" in t for t in op_types), sorted(t for t in op_types if "Horovod" in t)
        assert not any("Broadcast" in t for t in op_types if t.startswith("Horovod")), sorted(op_types)
