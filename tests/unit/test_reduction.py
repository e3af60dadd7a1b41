"""The reduction is Horovod's DistributedGradientTape's, and its collectives are named by position:
two ranks whose Keras layers are numbered differently still issue the same collective names."""

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import hvdclip
from hvdclip.distributed.reduction import Reduction
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
