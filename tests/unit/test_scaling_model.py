"""The step cost model of docs/scaling.md (benchmarks/scaling_model.py): its formulas, its simulation
of Horovod's cycles, fusion and overlap, and that the document shows what the model computes."""

from __future__ import annotations

import math

import pytest

from benchmarks import scaling_model as sm
from benchmarks.scaling_model import Layer, Link, Network, Reduction, fuse, ready_times, ring_allreduce_s, simulate, units

FREE = Link(gbit_s=1e12, efficiency=1.0, inter_hop_s=0.0, intra_hop_s=0.0)  # communication costs nothing


def net(*layers: tuple[int, float], step_s: float = 0.3) -> Network:
    return Network("toy", tuple(Layer(f"l{i}", p, f) for i, (p, f) in enumerate(layers)), 64, step_s)


def test_ring_allreduce_has_the_latency_and_the_bandwidth_term():
    link = Link(gbit_s=8.0, efficiency=0.5, gpus_per_node=4, inter_hop_s=10e-6, intra_hop_s=1e-6)  # 0.5 GB/s
    assert ring_allreduce_s(1e9, 1, link) == 0.0
    # 8 GPUs on 2 nodes: a pass around the ring is 2 hops between nodes and 6 inside them.
    assert link.ring_latency_s(8) == pytest.approx(2 * 10e-6 + 6 * 1e-6)
    latency = 2 * 7 / 8 * (2 * 10e-6 + 6 * 1e-6)
    assert ring_allreduce_s(1e6, 8, link) == pytest.approx(latency + 2 * 7 / 8 * 1e6 / 0.5e9)
    # The bandwidth term grows to 2 B / rate with the GPU count, and is linear in the bytes.
    no_latency = Link(gbit_s=8.0, efficiency=0.5, inter_hop_s=0.0, intra_hop_s=0.0)
    assert ring_allreduce_s(1e6, 2, no_latency) == pytest.approx(1e6 / 0.5e9)
    assert ring_allreduce_s(1e6, 4096, no_latency) == pytest.approx(2 * 4095 / 4096 * 1e6 / 0.5e9)
    assert ring_allreduce_s(2e6, 64, no_latency) == pytest.approx(2 * ring_allreduce_s(1e6, 64, no_latency))
    # NCCL >= 2.4's trees: 2 log2(N) hops between nodes when that is less than the ring's latency.
    tree = Link(gbit_s=8.0, efficiency=0.5, gpus_per_node=4, inter_hop_s=10e-6, intra_hop_s=1e-6, tree_latency=True)
    assert ring_allreduce_s(1e6, 512, tree) == pytest.approx(2 * 9 * 10e-6 + 2 * 511 / 512 * 1e6 / 0.5e9)
    with pytest.raises(ValueError, match="`gpus` must be >= 1. Received: gpus=0"):
        ring_allreduce_s(1.0, 0, link)


def test_gradients_are_ready_in_reverse_order_after_the_forward_pass_in_proportion_to_flops():
    network = net((10, 1.0), (0, 2.0), (30, 3.0), step_s=0.6)  # forward 0.2 s, backward 0.4 s
    times = ready_times(network)
    assert times[2] == pytest.approx(0.2 + 0.4 * 3 / 6)  # the last layer's gradient comes first
    assert times[1] == pytest.approx(0.2 + 0.4 * 5 / 6)
    assert times[0] == pytest.approx(0.6)  # the first layer's last, when the backward pass ends
    assert ready_times(network, stretch=2.0)[0] == pytest.approx(1.2)


def test_units_follow_horovods_grouping():
    network = net((1, 1.0), (2, 1.0), (0, 1.0), (3, 1.0), (4, 1.0), step_s=0.5)
    times = ready_times(network)
    per_gradient = units(network, 0)
    assert [b for _, b in per_gradient] == [(16,), (12,), (8,), (4,)]  # in ready order; l2 has no weights
    assert units(network, 1) == [(pytest.approx(0.5), (16, 12, 8, 4))]
    # Horovod's split_list on the gradient list in the model's order: [l0, l1], [l3, l4]; a group is
    # ready when its last gradient is.
    assert units(network, 2) == [(times[3], (16, 12)), (times[0], (8, 4))]
    assert len(units(network, 9)) == 4  # no more groups than gradients
    with pytest.raises(ValueError, match="`groups` must be an integer >= 0. Received: groups=-1"):
        units(network, -1)


def test_fusion_packs_consecutive_tensors_up_to_the_threshold():
    assert fuse([4, 4, 4, 9, 1, 20, 2], 10) == [8, 4, 10, 20, 2]
    assert fuse([], 10) == []
    assert sum(fuse([3, 7, 5, 5, 11], 12)) == 31


def test_free_communication_scales_perfectly_and_one_gpu_never_communicates():
    network = net((100, 1.0), (200, 2.0))
    for groups in (0, 1, 2):
        assert sm.efficiency(network, 64, FREE, Reduction(groups, cycle_s=0.0)) == pytest.approx(1.0)
    assert simulate(network, 1, Link(1.0), Reduction(1)).step_s == network.step_s


def test_one_group_waits_for_the_backward_pass_then_the_next_cycle_then_the_allreduce():
    network = net((1_000_000, 1.0), (1_000_000, 1.0), step_s=0.3001)
    link = Link(gbit_s=8.0, efficiency=1.0, inter_hop_s=0.0, intra_hop_s=0.0)  # 1 GB/s
    reduction = Reduction(groups=1, cycle_s=1e-3, fusion_bytes=1 << 30, negotiation_s=2e-4)
    step = simulate(network, 2, link, reduction)
    comm = ring_allreduce_s(8_000_000, 2, link)
    assert step.allreduces == 1
    assert step.step_s == pytest.approx(math.ceil(0.3001 / 1e-3) * 1e-3 + 2e-4 + comm)
    # Above the fusion threshold the group goes in several buffers, one after another.
    split = simulate(network, 2, link, Reduction(groups=1, cycle_s=0.0, fusion_bytes=4_000_000))
    assert split.allreduces == 2 and split.step_s == pytest.approx(0.3001 + 2 * ring_allreduce_s(4_000_000, 2, link))


def test_per_gradient_reduction_overlaps_the_backward_pass():
    # A big last layer (ready early) and a small first layer: per gradient, the big allreduce runs
    # while the backward pass continues; as one group it starts after it.
    network = net((10_000, 1.0), (5_000_000, 1.0), step_s=0.3)
    link = Link(gbit_s=8.0, efficiency=1.0, inter_hop_s=0.0, intra_hop_s=0.0)
    per_gradient = simulate(network, 8, link, Reduction(groups=0, cycle_s=0.0))
    one_group = simulate(network, 8, link, Reduction(groups=1, cycle_s=0.0))
    assert one_group.exposed_s == pytest.approx(ring_allreduce_s(5_010_000 * 4, 8, link))
    assert per_gradient.step_s < one_group.step_s
    assert per_gradient.exposed_s == pytest.approx(ring_allreduce_s(10_000 * 4, 8, link))  # only the small one shows
    # When communication dwarfs compute, efficiency approaches compute / (compute + communication).
    slow = Link(gbit_s=0.001, efficiency=1.0, inter_hop_s=0.0, intra_hop_s=0.0)
    expected = 0.3 / (0.3 + ring_allreduce_s(5_010_000 * 4, 8, slow))
    assert sm.efficiency(network, 8, slow, Reduction(groups=1, cycle_s=0.0)) == pytest.approx(expected)
    assert sm.efficiency(network, 8, slow, Reduction(groups=0, cycle_s=0.0)) == pytest.approx(expected, rel=0.01)


def test_compute_overhead_stretches_the_multi_gpu_step():
    network = net((10, 1.0))
    link = Link(gbit_s=1e12, efficiency=1.0, inter_hop_s=0.0, intra_hop_s=0.0, compute_overhead=0.1)
    assert sm.efficiency(network, 8, link, Reduction(1, cycle_s=0.0)) == pytest.approx(1 / 1.1)


def test_step_times_of_the_models_follow_their_sources():
    nets = sm.networks(sm.load_profiles())
    per_image = {name: n.step_s / n.batch for name, n in nets.items()}
    assert per_image["ResNet-50"] == pytest.approx(1 / 219) and per_image["VGG-16"] == pytest.approx(1 / 154)
    assert 1 / 219 < per_image["ResNet-101"] < 1 / 91.8
    flops = {name: sum(layer.flops for layer in n.layers) for name, n in nets.items()}
    rate = 3 * flops["ResNet-50"] * 219
    assert nets[sm.TRANSFORMER].step_s == pytest.approx(3 * flops[sm.TRANSFORMER] * 32 / rate)
    # The counts match the models' published sizes.
    assert round(nets["ResNet-50"].params / 1e5) == 256 and round(nets["VGG-16"].params / 1e6) == 138


def test_transformer_profile_counts_its_sublayers():
    layers = sm.transformer_layers(layers=2, width=8, ffn=32, vocab=100, sequence=4)
    assert [layer.name for layer in layers] == ["embeddings", "layer0/attention", "layer0/ffn", "layer1/attention", "layer1/ffn"]
    assert layers[1].params == 4 * 64 + 4 * 8 + 2 * 8
    assert layers[2].params == 2 * 8 * 32 + 32 + 8 + 2 * 8
    assert layers[2].flops == 4 * 2 * 2 * 8 * 32


def test_keras_layer_flops_for_convolutions_and_dense_layers():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="dense")(x)
    layers = {layer.name: layer for layer in sm.keras_layers(keras.Model(inputs, outputs))}
    assert layers["conv"].params == 3 * 3 * 3 * 4 + 4 and layers["conv"].flops == 2 * 3 * 3 * 3 * 4 * 8 * 8
    assert layers["dense"].params == 256 * 5 + 5 and layers["dense"].flops == 2 * 256 * 5


def test_docs_scaling_shows_what_the_model_computes():
    document = sm.DOC.read_text()
    assert sm.render(document, sm.generated_sections()) == document, (
        "docs/scaling.md is out of date: run `python -m benchmarks.scaling_model --write`"
    )
    with pytest.raises(ValueError, match="has no block for"):
        sm.render("no blocks here", {"inputs": "x"})
