"""The reduction is Horovod's DistributedGradientTape's, and its collectives are named by position:
two ranks whose Keras layers are numbered differently still issue the same collective names."""

import horovod.tensorflow as hvd
import keras
import numpy as np
import pytest
import tensorflow as tf

import hvdclip
from hvdclip.distributed.reduction import Reduction, raised
from support import make_clicks, make_embedding_model, make_mlp


def test_the_reduction_is_the_function_hvd_distributed_gradient_tape_uses():
    reduction = Reduction(compression="fp16", groups=1)
    tape = hvd.DistributedGradientTape(tf.GradientTape(), **reduction.options())
    assert reduction._function is tape._allreduce_grads


def collective_names(make_model, x, y):
    """The node names of the Horovod collectives in a compiled step of the own-loop door."""
    model = make_model()
    clipper = hvdclip.Clipper(keras.optimizers.Adam(), hvdclip.clip_by_global_norm(1.0))
    clipper.broadcast_initial_state(model)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        tape = hvdclip.DistributedGradientTape(tape, clipper, has_data=tf.constant(True))
        grads = tape.gradient(loss, model.trainable_variables)
        tape.apply_gradients(zip(grads, model.trainable_variables))

    graph = step.get_concrete_function(tf.constant(x), tf.constant(y)).graph
    names = set()

    def walk(graph_def_functions, nodes):
        for node in nodes:
            if node.op.startswith("Horovod"):
                names.add((node.op, node.name))

    walk(None, graph.as_graph_def().node)
    for function in graph.as_graph_def().library.function:
        walk(None, function.node_def)
    return names


def test_collective_names_do_not_depend_on_keras_layer_numbering():
    x, y = make_clicks(seed=1, n=8)
    first = collective_names(lambda: make_embedding_model(seed=1, name="a"), x, y)
    for _ in range(3):  # Another rank might have built more layers first: Keras numbers them on.
        keras.layers.Embedding(4, 2)
        keras.layers.Dense(1)
    second = collective_names(lambda: make_embedding_model(seed=1, name="b"), x, y)
    ops = {op for op, _ in first}
    assert any("Allgather" in op for op in ops) and any("Allreduce" in op for op in ops), first
    assert first == second, f"collective names differ between two numberings:\n{sorted(first ^ second)}"
    assert any("hvdclip_sparse_grads" in name for op, name in first if "Allgather" in op), first


def test_dense_collectives_are_named_grad_by_position():
    x = np.zeros((4, 8), "float32")
    y = np.zeros((4, 1), "float32")
    names = collective_names(lambda: make_mlp(seed=1), x, y)
    assert any(name.endswith("grad_0") for _, name in names), names


# ---------------------------------------------------------------- the has-data vote at any scale


def horovod_average(flags: np.ndarray, dtype) -> np.ndarray:
    """What Horovod's averaging allreduce returns for one element per rank, emulated in `dtype`:
    the values (cast, as fp16 compression casts them) summed in a ring, then scaled by 1/N."""
    total = dtype(0)
    for value in flags.astype(dtype):
        total = dtype(total + value)
    return np.array([dtype(total * dtype(1.0 / len(flags)))])


@pytest.mark.parametrize("size", [2, 1024, 4096, 2**20])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "fp16 compression"])
def test_one_rank_out_of_data_is_seen_at_any_number_of_ranks_with_or_without_fp16(size, dtype):
    for out_of_data in (0, 1, 2, size):
        missing = np.zeros(size)
        missing[:out_of_data] = 1  # Each rank sends "I have no next batch".
        answer = bool(raised(tf.constant(horovod_average(missing, dtype).astype(np.float32)), 1)[0])
        assert answer == (out_of_data > 0), (size, out_of_data)


def test_a_threshold_on_the_mean_of_has_data_flags_misses_the_rank_that_is_out():
    """Why hvdclip counts: the rule it replaced (mean of "has data" > 0.999) says every rank has data
    when one of 1024 has none, in float32 and under fp16 compression alike."""
    has_data = np.ones(1024)
    has_data[0] = 0
    for dtype in (np.float32, np.float16):
        assert float(horovod_average(has_data, dtype)[0]) > 0.999, dtype


def test_flags_ride_in_the_smallest_dense_gradient_and_cost_no_collective_of_their_own():
    model = make_mlp(seed=1)
    clipper = hvdclip.Clipper(keras.optimizers.SGD(), hvdclip.clip_by_global_norm(1.0))
    clipper.broadcast_initial_state(model)
    x, y = np.zeros((4, 8), "float32"), np.zeros((4, 1), "float32")

    def collectives(has_data):
        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
            tape = hvdclip.DistributedGradientTape(tape, clipper, has_data=has_data)
            grads = tape.gradient(loss, model.trainable_variables)
            return tape.apply_gradients(zip(grads, model.trainable_variables))

        graph = step.get_concrete_function(tf.constant(x), tf.constant(y)).graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        return sorted((n.op, [i for i in n.input if not i.startswith("^")]) for n in nodes if n.op.startswith("Horovod"))

    without, with_vote = collectives(None), collectives(tf.constant(True))
    assert len(without) == len(with_vote) == 1, with_vote  # One grouped allreduce either way.
    assert without[0][0] == with_vote[0][0] == "HorovodGroupedAllreduce"


def test_the_default_grouping_is_one_group_on_cpu_and_per_gradient_on_a_gpu_with_nccl(monkeypatch):
    assert Reduction().resolved_groups == 1  # This machine: no GPU.
    assert Reduction(groups=0).resolved_groups == 0 and Reduction(groups=3).resolved_groups == 3
    stand_in = [tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: stand_in if kind == "GPU" else [])
    monkeypatch.setattr(hvd, "nccl_built", lambda: True)
    assert Reduction().resolved_groups == 0 and Reduction().options()["groups"] is None  # Horovod's "per gradient".
    assert Reduction(groups=1).resolved_groups == 1, "an explicit choice wins"
