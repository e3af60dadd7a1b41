"""The pieces of the rank-consistency checks that need no second rank."""

import numpy as np
import pytest
import tensorflow as tf

from hvdclip.distributed import consistency


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_the_weights_checksum_sees_a_one_ulp_change(dtype):
    value = np.linspace(-3, 3, 101).astype(dtype)
    nudged = value.copy()
    nudged[50] = np.nextafter(nudged[50], dtype(10))
    a = consistency.weights_checksum([tf.Variable(value)])
    b = consistency.weights_checksum([tf.Variable(nudged)])
    assert int(a) != int(b)
    assert int(a) == int(consistency.weights_checksum([tf.Variable(value.copy())]))


def test_first_difference_names_shape_and_count_mismatches():
    reference = [("a", (2, 3), "float32"), ("b", (3,), "float32")]
    shape = consistency._first_difference(reference, [("a", (2, 4), "float32"), ("b", (3,), "float32")])
    assert shape.startswith("variable #0: rank 0 has 'a' shape=[2, 3]") and "shape=[2, 4]" in shape
    count = consistency._first_difference(reference, reference[:1])
    assert count == "variable count: rank 0 has 2, this rank has 1; first extra on rank 0: 'b'"


def test_check_same_structure_passes_on_a_single_rank():
    consistency.check_same_structure([("v", tf.Variable(np.zeros(3, np.float32)))])


def test_rank_local_variables_are_plain_batch_norm_statistics_and_seed_states():
    import keras

    from training_support import batch_norm_cnn, dropout_mlp

    class Synchronised(keras.layers.BatchNormalization):
        synchronized_over_ranks = True

    cnn = batch_norm_cnn(seed=1, blocks=3)
    assert [v.name for v in consistency.local_batch_norm_statistics(cnn)] == ["moving_mean", "moving_variance"] * 3
    assert consistency.seed_generator_states(cnn) == []
    mlp = dropout_mlp(seed=1)
    assert [v.name for v in consistency.rank_local_variables(mlp)] == ["seed_generator_state"]
    synced = keras.Sequential([keras.Input((4,)), Synchronised(), keras.layers.BatchNormalization(synchronized=True)])
    local = consistency.local_batch_norm_statistics(synced)
    assert [v.path for v in local] == [v.path for v in synced.layers[1].non_trainable_variables], "Keras' synchronized= is tf.distribute's only"
