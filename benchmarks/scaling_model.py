"""A cost model of one data-parallel step, and the tables of docs/scaling.md it generates.

    python -m benchmarks.scaling_model             # print the tables
    python -m benchmarks.scaling_model --write     # rewrite the generated parts of docs/scaling.md
    python -m benchmarks.scaling_model --profiles  # rebuild the layer profiles from Keras (slow)

The model, per step and GPU:

* **compute**: the one-GPU step time, a third forward and two thirds backward. The backward pass
  visits the layers in reverse order and spends time on each in proportion to its forward FLOPs;
  a layer's gradient is ready when the backward pass leaves it.
* **reduction**: Horovod's background thread wakes every `cycle_s`. At each wake-up it takes
  the *units* that are ready (a unit is one gradient with `groups=0`, one group of consecutive
  gradients with `groups=k`, every gradient at once with `groups=1`), negotiates them
  (`negotiation_s`), packs them in ready order into fusion buffers of at most `fusion_bytes`
  and queues one ring allreduce per buffer. Allreduces run one after another.
* **ring allreduce** of B bytes over N GPUs: `2 (N-1) * hop + 2 (N-1)/N * B / (efficiency * rate)`,
  where `hop` is the mean latency of a ring step (a hop between nodes once per node, the other hops
  inside a node). Every node's NIC carries the whole 2 (N-1)/N * B, however many GPUs share the node.
* **overlap**: an allreduce runs while the backward pass continues (GPU compute and NCCL's
  transfers proceed in parallel); the step ends when both the backward pass and the last
  allreduce are done. Applying the update waits for every gradient (hvdclip clips by the global
  norm of the reduced gradient).

Scaling efficiency is the one-GPU step time divided by the N-GPU step time (weak scaling, the
same batch per GPU). The layer profiles (parameters and forward FLOPs of every layer) are counted
from the Keras models and kept in benchmarks/results/scaling_profiles.json; the one-GPU step
times are TensorFlow's published P100 numbers (see `NETWORKS`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "Layer",
    "Link",
    "Network",
    "Reduction",
    "Step",
    "efficiency",
    "fuse",
    "ready_times",
    "ring_allreduce_s",
    "simulate",
    "units",
]

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "benchmarks" / "results" / "scaling_profiles.json"
DOC = REPO / "docs" / "scaling.md"
BYTES_PER_PARAM = 4  # float32 gradients
FORWARD_FRACTION = 1 / 3  # backward costs about twice the forward pass


@dataclass(frozen=True)
class Layer:
    """One layer: its trainable parameters (its gradient has `params * 4` bytes) and forward FLOPs per example."""

    name: str
    params: int
    flops: float


@dataclass(frozen=True)
class Network:
    """A model as the step sees it: layers in forward order, and one GPU's step time at `batch` per GPU."""

    name: str
    layers: tuple[Layer, ...]
    batch: int
    step_s: float
    source: str = ""

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def gradient_bytes(self) -> int:
        return self.params * BYTES_PER_PARAM


@dataclass(frozen=True)
class Link:
    """The cluster: each node's NIC rate, the fraction of it a ring allreduce reaches, the latency
    of one ring step inside a node and between nodes, and `compute_overhead`, the fraction by which
    a GPU's compute is slower in a multi-GPU job than alone (input pipeline, NCCL kernels sharing the
    GPU, synchronisation jitter; fitted to the Horovod paper below). `tree_latency`: the latency
    term of NCCL >= 2.4, which sends small messages along binary trees (2 log2(N) hops between
    nodes) instead of around the ring; the bandwidth term stays the ring's."""

    gbit_s: float
    efficiency: float = 0.9
    gpus_per_node: int = 4
    inter_hop_s: float = 10e-6
    intra_hop_s: float = 2e-6
    compute_overhead: float = 0.0
    tree_latency: bool = False

    @property
    def bytes_per_s(self) -> float:
        return self.gbit_s * 1e9 / 8 * self.efficiency

    def ring_latency_s(self, gpus: int) -> float:
        """One pass around the ring: a hop between nodes per node, the rest inside nodes."""
        nodes = max(1, math.ceil(gpus / self.gpus_per_node))
        inter = nodes if nodes > 1 else 0
        return inter * self.inter_hop_s + (gpus - inter) * self.intra_hop_s


@dataclass(frozen=True)
class Reduction:
    """How gradients are reduced: grouping, Horovod's cycle time, fusion buffer and negotiation cost.

    `groups`: 0 is one allreduce per gradient (Horovod fuses what is ready in a cycle); k >= 1
    splits the gradient list, in the model's (forward) order, into k groups of consecutive
    gradients as Horovod's `split_list` does; each group is reduced once all its gradients are ready.
    """

    groups: int = 1
    cycle_s: float = 1e-3
    fusion_bytes: int = 128 * 1024 * 1024
    negotiation_s: float = 0.0


@dataclass(frozen=True)
class Step:
    """One simulated step: when compute ends, when the last allreduce ends, and the step time."""

    compute_s: float
    reduced_s: float
    allreduces: int

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.reduced_s)

    @property
    def exposed_s(self) -> float:
        """Reduction time not hidden behind compute."""
        return self.step_s - self.compute_s


def ring_allreduce_s(nbytes: float, gpus: int, link: Link) -> float:
    """Time of one ring allreduce of `nbytes` over `gpus` GPUs: latency and bandwidth terms."""
    if gpus < 1:
        raise ValueError(f"`gpus` must be >= 1. Received: gpus={gpus}")
    if gpus == 1 or nbytes <= 0:
        return 0.0
    # Reduce-scatter then allgather: 2 (N-1) ring steps, each moving 1/N of the buffer over every link.
    steps_latency = 2 * (gpus - 1) / gpus * link.ring_latency_s(gpus)
    if link.tree_latency:
        steps_latency = min(steps_latency, 2 * math.ceil(math.log2(gpus)) * link.inter_hop_s)
    return steps_latency + 2 * (gpus - 1) / gpus * nbytes / link.bytes_per_s


def ready_times(network: Network, stretch: float = 1.0) -> list[float]:
    """When each layer's gradient is ready (seconds from the step's start), in the layers' order.

    `stretch` scales the compute (1 + a multi-GPU overhead).
    """
    total = sum(layer.flops for layer in network.layers) or 1.0
    forward = network.step_s * stretch * FORWARD_FRACTION
    backward = network.step_s * stretch - forward
    times, elapsed = [0.0] * len(network.layers), forward
    for index in reversed(range(len(network.layers))):
        elapsed += backward * network.layers[index].flops / total
        times[index] = elapsed
    return times


def _split(items: Sequence, parts: int) -> list[list]:
    """Horovod's `split_list`: `parts` consecutive chunks whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    return [list(items[i * size + min(i, extra) : (i + 1) * size + min(i + 1, extra)]) for i in range(parts)]


def units(network: Network, groups: int, stretch: float = 1.0) -> list[tuple[float, tuple[int, ...]]]:
    """The reduction's units as (ready time, bytes of each gradient in it), in ready order.

    A unit is reduced once all its gradients are ready; within a cycle, fusion packs the gradients
    of every ready unit.
    """
    if not isinstance(groups, int) or groups < 0:
        raise ValueError(f"`groups` must be an integer >= 0. Received: groups={groups!r}")
    ready = ready_times(network, stretch)
    tensors = [(t, layer.params * BYTES_PER_PARAM) for t, layer in zip(ready, network.layers) if layer.params]
    if groups == 0:
        chosen = [[tensor] for tensor in tensors]
    else:
        chosen = [chunk for chunk in _split(tensors, min(groups, len(tensors))) if chunk]
    # Within a unit, the gradients in the order the backward pass produces them.
    return sorted((max(t for t, _ in chunk), tuple(b for _, b in sorted(chunk, key=lambda c: c[0]))) for chunk in chosen)


def fuse(sizes: Sequence[int], threshold: int) -> list[int]:
    """Packs consecutive tensors into fusion buffers of at most `threshold` bytes (a larger tensor goes alone)."""
    buffers: list[int] = []
    for size in sizes:
        if buffers and buffers[-1] + size <= threshold:
            buffers[-1] += size
        else:
            buffers.append(size)
    return buffers


def simulate(network: Network, gpus: int, link: Link, reduction: Reduction) -> Step:
    """One step of `network` on `gpus` GPUs: the backward pass, Horovod's cycles and the allreduces."""
    if gpus == 1:
        return Step(network.step_s, network.step_s, 0)
    stretch = 1 + link.compute_overhead
    compute = network.step_s * stretch
    pending = units(network, reduction.groups, stretch)
    comm_free, count, index = 0.0, 0, 0
    while index < len(pending):
        ready = pending[index][0]
        # The first wake-up at or after `ready` (cycle 0: the thread never sleeps).
        wake = ready if reduction.cycle_s == 0 else math.ceil(ready / reduction.cycle_s - 1e-9) * reduction.cycle_s
        batch: list[int] = []
        while index < len(pending) and pending[index][0] <= wake:
            batch.extend(pending[index][1])
            index += 1
        start = wake + reduction.negotiation_s
        for size in fuse(batch, reduction.fusion_bytes):
            comm_free = max(start, comm_free) + ring_allreduce_s(size, gpus, link)
            count += 1
    return Step(compute, comm_free, count)


def efficiency(network: Network, gpus: int, link: Link, reduction: Reduction) -> float:
    """Weak-scaling efficiency: one GPU's step time over the step time on `gpus` GPUs."""
    return network.step_s / simulate(network, gpus, link, reduction).step_s


# ---------------------------------------------------------------------------------------------
# Layer profiles: counted from Keras models (slow: builds them), kept in PROFILES.


def _layer_flops(layer) -> float:
    """Forward FLOPs per example of a convolution or dense layer (a multiply-add is 2); others 0."""
    import keras

    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = layer.input.shape[-1] // layer.groups
        _, h, w, cout = layer.output.shape
        return 2.0 * kh * kw * cin * cout * h * w
    if isinstance(layer, keras.layers.Dense):
        positions = math.prod(layer.output.shape[1:-1]) if len(layer.output.shape) > 2 else 1
        return 2.0 * layer.input.shape[-1] * layer.units * positions
    return 0.0


def keras_layers(model) -> list[Layer]:
    """Every layer of a functional Keras model with its trainable parameters and forward FLOPs."""
    out = []
    for layer in model.layers:
        params = sum(math.prod(w.shape) for w in layer.trainable_weights)
        flops = _layer_flops(layer)
        if params or flops:
            out.append(Layer(layer.name, int(params), flops))
    return out


def transformer_layers(layers: int, width: int, ffn: int, vocab: int, sequence: int) -> list[Layer]:
    """An encoder-only Transformer (BERT's shape), one unit per sublayer, FLOPs per sequence.

    Attention: Q, K, V and output projections (4 w^2 + 4 w) plus the score and weighted-sum
    products (2 * 2 * s^2 * w per sequence); feed-forward: 2 w f + f + w; each sublayer's LayerNorm
    adds 2 w. The token and position embeddings come first, so their gradient is ready last.
    """
    out = [Layer("embeddings", (vocab + 512 + 2) * width + 2 * width, 0.0)]
    for index in range(layers):
        attention_params = 4 * width * width + 4 * width + 2 * width
        attention_flops = sequence * 2 * 4 * width * width + 2 * 2 * sequence * sequence * width
        out.append(Layer(f"layer{index}/attention", attention_params, float(attention_flops)))
        ffn_params = 2 * width * ffn + ffn + width + 2 * width
        out.append(Layer(f"layer{index}/ffn", ffn_params, float(sequence * 2 * 2 * width * ffn)))
    return out


def build_profiles() -> dict[str, list[list]]:
    """The layer profiles of every model in `NETWORKS`, from Keras (and `transformer_layers`)."""
    import keras

    apps = {
        "ResNet-50": keras.applications.ResNet50,
        "ResNet-101": keras.applications.ResNet101,
        "ResNet-152": keras.applications.ResNet152,
        "Inception V3": keras.applications.InceptionV3,
        "VGG-16": keras.applications.VGG16,
    }
    profiles = {}
    for name, build in apps.items():
        model = build(weights=None)
        profiles[name] = [[layer.name, layer.params, layer.flops] for layer in keras_layers(model)]
        del model
        keras.backend.clear_session()
    bert = transformer_layers(layers=24, width=1024, ffn=4096, vocab=30522, sequence=128)
    profiles["Transformer (BERT-Large)"] = [[layer.name, layer.params, layer.flops] for layer in bert]
    return profiles


# ---------------------------------------------------------------------------------------------
# The models, the settings, the calibration and the tables.

# One P100's images/s at batch 64 with synthetic data: TensorFlow's published benchmarks
# (tensorflow/docs_src/performance/benchmarks.md, DGX-1, May 2017), the GPUs of the Horovod paper.
P100_IMAGES_PER_S = {"ResNet-50": 219.0, "ResNet-152": 91.8, "Inception V3": 142.0, "VGG-16": 154.0}
P100_SOURCE = "TensorFlow's P100 benchmark (DGX-1, batch 64, synthetic data, 2017)"
BATCH = 64
TRANSFORMER = "Transformer (BERT-Large)"
TRANSFORMER_BATCH = 32  # sequences of 128 tokens


def _forward_flops(profile: Sequence[Sequence]) -> float:
    return sum(float(flops) for _, _, flops in profile)


def load_profiles(path: Path = PROFILES) -> dict[str, tuple[Layer, ...]]:
    raw = json.loads(path.read_text())
    return {name: tuple(Layer(n, int(p), float(f)) for n, p, f in layers) for name, layers in raw.items()}


def networks(profiles: dict[str, tuple[Layer, ...]]) -> dict[str, Network]:
    """Every model with its one-GPU step time on a P100.

    ResNet-101 has no published P100 number: its time per image is interpolated between ResNet-50's
    and ResNet-152's in proportion to forward FLOPs. The Transformer's step takes 3x its forward FLOPs
    at the FLOP rate ResNet-50 reaches on a P100 (forward + backward = 3 forward passes).
    """
    flops = {name: sum(layer.flops for layer in layers) for name, layers in profiles.items()}
    per_image = {name: 1 / rate for name, rate in P100_IMAGES_PER_S.items()}
    slope = (per_image["ResNet-152"] - per_image["ResNet-50"]) / (flops["ResNet-152"] - flops["ResNet-50"])
    per_image["ResNet-101"] = per_image["ResNet-50"] + slope * (flops["ResNet-101"] - flops["ResNet-50"])
    rate = 3 * flops["ResNet-50"] * P100_IMAGES_PER_S["ResNet-50"]  # FLOP/s
    out = {}
    for name in ("ResNet-50", "ResNet-101", "Inception V3", "VGG-16"):
        source = P100_SOURCE if name in P100_IMAGES_PER_S else "interpolated by FLOPs between ResNet-50 and ResNet-152"
        out[name] = Network(name, profiles[name], BATCH, BATCH * per_image[name], source)
    step = 3 * flops[TRANSFORMER] * TRANSFORMER_BATCH / rate
    out[TRANSFORMER] = Network(TRANSFORMER, profiles[TRANSFORMER], TRANSFORMER_BATCH, step, "ResNet-50's P100 FLOP rate")
    return out


def negotiation_s(gpus: int, message_s: float) -> float:
    """Horovod's coordination of one cycle: a tree allreduce of its small bit vector (response cache)."""
    return 0.0 if gpus == 1 else 2 * math.ceil(math.log2(gpus)) * message_s


@dataclass(frozen=True)
class Era:
    """Horovod's defaults of a release, and the control network's message latency."""

    name: str
    cycle_s: float
    fusion_bytes: int
    message_s: float = 25e-6

    def reduction(self, groups: int, gpus: int) -> Reduction:
        return Reduction(groups, self.cycle_s, self.fusion_bytes, negotiation_s(gpus, self.message_s))


# Horovod 0.11 (the paper, early 2018): the background thread slept 5 ms per cycle, 64 MB fusion buffer,
# and DistributedOptimizer reduced each gradient on its own. Horovod 0.28.1: 1 ms, 128 MB.
PAPER = Era("Horovod 0.11 (paper)", 5e-3, 64 * 1024 * 1024)
TODAY = Era("Horovod 0.28.1", 1e-3, 128 * 1024 * 1024)
# The Horovod paper (docs/benchmarks.rst): 4 Pascal GPUs per server, RoCE 25 Gbit/s. 512 GPUs from
# the current page; 128 GPUs from the README of the 32-server run (Horovod 0.11).
PAPER_MEASURED = {
    ("Inception V3", 512): 0.90, ("ResNet-101", 512): 0.90, ("VGG-16", 512): 0.68,
    ("Inception V3", 128): 0.90, ("ResNet-101", 128): 0.90, ("VGG-16", 128): 0.79,
}  # fmt: skip
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512)


def paper_link(link_efficiency: float, compute_overhead: float) -> Link:
    return Link(25.0, efficiency=link_efficiency, gpus_per_node=4, compute_overhead=compute_overhead)


def paper_error(nets: dict[str, Network], link_efficiency: float, compute_overhead: float) -> float:
    """Sum of squared differences between the model and the paper's measured efficiencies."""
    link = paper_link(link_efficiency, compute_overhead)
    return sum(
        (efficiency(nets[m], n, link, PAPER.reduction(0, n)) - measured) ** 2 for (m, n), measured in PAPER_MEASURED.items()
    )


def fit_paper(nets: dict[str, Network]) -> tuple[float, float]:
    """(link efficiency, compute overhead) that fit the paper's six points best: least squares on a
    grid of 0.05, then of 0.01 around the best point (efficiency 0.3-1.0, overhead 0-0.3)."""
    coarse = [(e / 100, o / 100) for e in range(30, 101, 5) for o in range(0, 31, 5)]
    e0, o0 = min(coarse, key=lambda c: paper_error(nets, *c))
    fine = [(e / 100, o / 100) for e in range(max(30, round(100 * e0) - 5), min(100, round(100 * e0) + 5) + 1)
            for o in range(max(0, round(100 * o0) - 5), min(30, round(100 * o0) + 5) + 1)]  # fmt: skip
    return min(fine, key=lambda c: paper_error(nets, *c))


# ---------------------------------------------------------------------------------------------
# The tables of docs/scaling.md.

PREDICTED = ("ResNet-50", "ResNet-101", TRANSFORMER)
GROUPINGS = (1, 0, 8)  # hvdclip's default, one allreduce per gradient, and eight groups
COMPUTE_SPEEDUPS = (1.0, 3.0)  # a P100, and a GPU three times faster (V100-class with mixed precision)
LINK_RATES = (25.0, 100.0)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _grouping(groups: int) -> str:
    return {1: "groups=1 (one group)", 0: "groups=0 (per gradient)"}.get(groups, f"groups={groups}")


def inputs_table(nets: dict[str, Network]) -> list[str]:
    rows = []
    for net in nets.values():
        tensors = sum(1 for layer in net.layers if layer.params)
        flops = sum(layer.flops for layer in net.layers) / 1e9
        rows.append([net.name, f"{net.params / 1e6:.1f} M", f"{net.gradient_bytes / 1e6:.0f}", str(tensors), f"{flops:.1f}",
                     str(net.batch), f"{1e3 * net.step_s:.0f}", net.source])  # fmt: skip
    header = ["model", "parameters", "gradient, MB", "layers with weights", "forward GFLOPs per example", "batch per GPU",
              "one-GPU step, ms", "step time from"]  # fmt: skip
    return _table(header, rows)


def paper_table(nets: dict[str, Network], fit: tuple[float, float]) -> list[str]:
    link = paper_link(*fit)
    rows = []
    for (name, gpus), measured in PAPER_MEASURED.items():
        model = efficiency(nets[name], gpus, link, PAPER.reduction(0, gpus))
        grouped = efficiency(nets[name], gpus, link, PAPER.reduction(1, gpus))
        rows.append([name, str(gpus), f"{100 * measured:.0f} %", f"{100 * model:.0f} %", f"{100 * grouped:.0f} %"])
    header = ["model", "GPUs", "measured (Horovod paper)", "model: per gradient, as Horovod 0.11 reduced", "model: one group"]
    return _table(header, rows)


def cluster_table(cluster: dict) -> list[str]:
    """The 2-host benchmark against the model, from benchmarks/results/cluster.json."""
    medium = medium_network(cluster["compute_s"])
    rows = []
    for name, row in cluster["rates"].items():
        rate = float(name.replace("gbit", ""))
        link = Link(rate, efficiency=row["busbw_bps"] / (rate * 1e9), gpus_per_node=1)
        predicted = {g: simulate(medium, 2, link, TODAY.reduction(g, 2)).step_s for g in (1, 0)}
        rows.append([f"{rate:g} Gbit/s", f"{row['busbw_bps'] / 1e9:.2f} Gbit/s", f"{1e3 * row['hvdclip']:.1f}",
                     f"{1e3 * predicted[1]:.1f}", f"{1e3 * row['handwritten']:.1f}", f"{1e3 * predicted[0]:.1f}"])  # fmt: skip
    header = ["link", "measured allreduce bus bandwidth", "hvdclip (one group): measured step, ms", "model, ms",
              "hand-written loop (per gradient): measured, ms", "model, ms"]  # fmt: skip
    return _table(header, rows)


def medium_network(step_s: float) -> Network:
    """benchmarks/models.py's `medium` MLP (256-1024-1024-10) as the model sees it."""
    sizes = (256, 1024, 1024, 10)
    layers = tuple(Layer(f"dense_{i}", a * b + b, 2.0 * a * b) for i, (a, b) in enumerate(zip(sizes, sizes[1:])))
    return Network("medium", layers, 64, step_s)


def prediction_tables(nets: dict[str, Network], fit: tuple[float, float]) -> list[str]:
    lines = []
    for speedup in COMPUTE_SPEEDUPS:
        for rate in LINK_RATES:
            link = Link(rate, efficiency=fit[0], compute_overhead=fit[1], tree_latency=True)
            gpu = "P100" if speedup == 1 else f"a GPU {speedup:g}x a P100"
            lines += [f"**{rate:g} Gbit/s, {gpu}** (scaling efficiency):", ""]
            header = ["model", "grouping"] + [str(n) for n in GPU_COUNTS]
            rows = []
            for name in PREDICTED:
                net = replace(nets[name], step_s=nets[name].step_s / speedup)
                for groups in GROUPINGS:
                    cells = [f"{100 * efficiency(net, n, link, TODAY.reduction(groups, n)):.0f} %" for n in GPU_COUNTS]
                    rows.append([name, _grouping(groups)] + cells)
            lines += _table(header, rows) + [""]
    return lines[:-1]


def ring_table(nets: dict[str, Network], fit: tuple[float, float]) -> list[str]:
    """The same at 512 GPUs with the ring's latency for every message (NCCL before 2.4)."""
    rows = []
    for rate in LINK_RATES:
        for speedup in COMPUTE_SPEEDUPS:
            link = Link(rate, efficiency=fit[0], compute_overhead=fit[1], tree_latency=False)
            for name in PREDICTED:
                net = replace(nets[name], step_s=nets[name].step_s / speedup)
                cells = [f"{100 * efficiency(net, 512, link, TODAY.reduction(g, 512)):.0f} %" for g in GROUPINGS]
                rows.append([f"{rate:g} Gbit/s", "P100" if speedup == 1 else f"{speedup:g}x P100", name] + cells)
    return _table(["link", "GPU", "model"] + [_grouping(g) for g in GROUPINGS], rows)


def machine_table(profile: dict | None) -> list[str]:
    """This machine's timeline (benchmarks/results/profile.json) against the model's terms."""
    if profile is None:
        return ["(No `benchmarks/results/profile.json` yet: run `make profile`, then `make scaling-doc`.)"]
    medium_bytes = medium_network(1.0).gradient_bytes
    rows = []
    for result in profile["results"]:
        ranks = result["attribution"]
        mean = {b: statistics.mean(r["buckets_ms"][b] for r in ranks) for b in ranks[0]["buckets_ms"]}
        transport_ms = mean["transport"]
        # 2 (N-1)/N = 1 for N = 2: the bus bandwidth is the gradient's bytes over the transport time.
        bus = f"{medium_bytes / (transport_ms / 1e3) / 1e9:.2f} GB/s" if transport_ms > 0 and profile.get("model") == "medium" else "–"
        rows.append([result["label"], f"{statistics.mean(r['step_ms'] for r in ranks):.1f}", f"{mean['compute']:.1f}",
                     f"{mean['negotiation']:.2f}", f"{1e3 * (TODAY.cycle_s / 2 + negotiation_s(2, TODAY.message_s)):.2f}",
                     f"{transport_ms:.2f}", bus, f"{mean['fusion-buffer copies']:.2f}"])  # fmt: skip
    header = ["configuration", "profiled step, ms", "compute, ms", "negotiation, ms", "model: half a cycle + coordination, ms",
              "transport, ms", "bus bandwidth reached", "fusion copies, ms"]  # fmt: skip
    context = profile.get("context", {})
    note = f"From `make profile` ({context.get('date', '?')}; load average before / after: {context.get('load average (1/5/15 min) before / after', '?')})."
    return _table(header, rows) + ["", note]


def _results(name: str) -> dict | None:
    path = REPO / "benchmarks" / "results" / name
    return json.loads(path.read_text()) if path.exists() else None


def generated_sections(
    profiles: dict[str, tuple[Layer, ...]] | None = None, cluster: dict | None = None, profile: dict | None = None
) -> dict[str, str]:
    """Section name -> Markdown, for the `<!-- scaling_model:NAME -->` blocks of docs/scaling.md."""
    nets = networks(profiles if profiles is not None else load_profiles())
    fit = fit_paper(nets)
    if cluster is None:
        cluster = _results("cluster.json")
    if profile is None:
        profile = _results("profile.json")
    error = paper_error(nets, *fit)
    fit_line = (f"Fitted: allreduce efficiency {fit[0]:.2f} of the line rate, compute overhead {100 * fit[1]:.0f} % "
                f"(root-mean-square error {100 * math.sqrt(error / len(PAPER_MEASURED)):.1f} points).")  # fmt: skip
    return {
        "inputs": "\n".join(inputs_table(nets)),
        "machine": "\n".join(machine_table(profile)),
        "paper": "\n".join(paper_table(nets, fit) + ["", fit_line]),
        "cluster": "\n".join(cluster_table(cluster)),
        "predictions": "\n".join(prediction_tables(nets, fit)),
        "ring": "\n".join(ring_table(nets, fit)),
    }


_BLOCK = re.compile(r"(<!-- scaling_model:(\w+) -->\n)(.*?)(<!-- /scaling_model -->)", re.S)


def render(document: str, sections: dict[str, str]) -> str:
    """`document` with each generated block replaced by its section."""
    missing = [name for name in sections if f"<!-- scaling_model:{name} -->" not in document]
    if missing:
        raise ValueError(f"`document` has no block for {missing}: add `<!-- scaling_model:NAME -->` ... `<!-- /scaling_model -->`")
    return _BLOCK.sub(lambda m: m.group(1) + sections[m.group(2)] + "\n" + m.group(4), document)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling_model", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the generated blocks of {DOC.relative_to(REPO)}")
    parser.add_argument("--profiles", action="store_true", help=f"rebuild {PROFILES.relative_to(REPO)} from Keras first")
    args = parser.parse_args(argv)
    if args.profiles:
        profiles = build_profiles()
        lines = ",\n".join(f" {json.dumps(name)}: [\n" + ",\n".join("  " + json.dumps(layer) for layer in layers) + "\n ]"
                           for name, layers in profiles.items())  # fmt: skip
        PROFILES.write_text("{\n" + lines + "\n}\n")
    sections = generated_sections()
    if args.write:
        DOC.write_text(render(DOC.read_text(), sections))
        print(f"written: {DOC}", file=sys.stderr)
    else:
        for name, text in sections.items():
            print(f"## {name}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
