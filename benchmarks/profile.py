"""`python -m benchmarks.profile` (`make profile`): where each step of a 2-rank job goes, per rank.

For each configuration (a launcher, its settings and a training loop) it runs the `medium` model
on 2 ranks twice:

1. **a timing job**: no instrumentation; each rank records its step time and every thread's CPU
   time over the timed window, and then, from one look at the stacks, what each thread is
   (benchmarks/threads.py);
2. **a profiled job**: Horovod's timeline (`HOROVOD_TIMELINE`, written by rank 0 for every rank's
   collectives) and TensorFlow's profiler (`tf.profiler`, host ops of each rank) over
   `--profile-steps` steps. Both use the same wall clock, so each instant of a rank's step is put
   in one bucket, in this order of precedence:

   | bucket | when |
   |---|---|
   | compute | one of the rank's TensorFlow ops (not Horovod's) is running |
   | transport | Horovod's `MPI_ALLREDUCE` / `GLOO_ALLREDUCE` activity |
   | fusion-buffer copies | `MEMCPY_IN_FUSION_BUFFER` / `MEMCPY_OUT_FUSION_BUFFER` |
   | Horovod bookkeeping | the rest of an `ALLREDUCE` span (queueing, buffer set-up) |
   | waiting for the other rank | from this rank's last gradient enqueued to the last rank's |
   | negotiation | `NEGOTIATE_ALLREDUCE` after every rank's gradient is in: the cycle's wait and coordination |
   | hand-back | from the end of the allreduce to TensorFlow's callback on this rank |
   | host, other | none of these: Python, op dispatch, the executor, and waiting for a core |

The timeline's writer thread spins (it yields in a loop), so the profiled job is slower than the
timing job: its buckets say where time goes; the timing job says how long a step takes.

Writes benchmarks/results/profile.json and profile.md (docs/performance.md explains them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import results_doc

__all__ = [
    "BUCKETS",
    "Config",
    "RankTrace",
    "TimelineSpan",
    "attribute",
    "intersect",
    "parse_cycles",
    "parse_timeline",
    "read_xplane",
    "subtract",
    "union",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
MODEL = "medium"
BUCKETS = (
    "compute",
    "transport",
    "fusion-buffer copies",
    "Horovod bookkeeping",
    "waiting for the other rank",
    "negotiation",
    "hand-back",
    "host, other",
)
_TRANSPORT = ("MPI_ALLREDUCE", "GLOO_ALLREDUCE")
_COPIES = ("MEMCPY_IN_FUSION_BUFFER", "MEMCPY_OUT_FUSION_BUFFER")
# A TensorFlow op's host event is "node name:OpType".
_OP_EVENT = re.compile(r"^[^\s:]+:([A-Za-z0-9_]+)$")
_INHERITED_NOT = ("OMPI_", "PMIX_", "PMI_", "HOROVOD_", "TF_CONFIG")

Interval = tuple[float, float]


# ------------------------------------------------------------------------------ interval arithmetic


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same instants."""
    out: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """Instants in both (each argument sorted and disjoint, as `union` returns)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """Instants in `a` but not in `b` (both sorted and disjoint)."""
    out = []
    for start, end in a:
        cursor = start
        for b_start, b_end in b:
            if b_end <= cursor or b_start >= end:
                continue
            if b_start > cursor:
                out.append((cursor, b_start))
            cursor = max(cursor, b_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def _length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in intervals)


# ------------------------------------------------------------------------------ the two traces


@dataclass(frozen=True)
class TimelineSpan:
    """One span of Horovod's timeline: a tensor's phase (`NEGOTIATE_ALLREDUCE`, `ALLREDUCE`) or an
    activity inside it (`MPI_ALLREDUCE`, ...), in seconds of the Unix clock."""

    tensor: str
    name: str
    start: float
    end: float
    top_level: bool


def _timeline_events(text: str) -> tuple[list[dict], float]:
    body = text.strip().rstrip(",")
    if not body.endswith("]"):
        body += "]"
    events = json.loads(body)
    origin = next((e["args"]["start_time_since_epoch_in_micros"] for e in events
                   if e.get("ph") == "M" and "start_time_since_epoch_in_micros" in e.get("args", {})), 0)  # fmt: skip
    return events, origin


def parse_cycles(text: str) -> list[float]:
    """When each of Horovod's cycles started (`HOROVOD_TIMELINE_MARK_CYCLES=1`), in Unix seconds."""
    events, origin = _timeline_events(text)
    return sorted((origin + e["ts"]) / 1e6 for e in events if e.get("ph") == "i" and e.get("name") == "CYCLE_START")


def parse_timeline(text: str) -> list[TimelineSpan]:
    """The spans of a Horovod timeline file (Chrome trace JSON; the closing bracket may be missing).

    Each tensor is one `pid`; its phases are nested `B`/`E` pairs: a top-level phase and the
    activities inside it.
    """
    events, origin = _timeline_events(text)
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name" and "name" in e.get("args", {})}
    stacks: dict[int, list[tuple[str, float]]] = {}
    spans = []
    for event in events:
        phase = event.get("ph")
        if phase not in ("B", "E"):
            continue
        pid, ts = event["pid"], (origin + event["ts"]) / 1e6
        stack = stacks.setdefault(pid, [])
        if phase == "B":
            stack.append((event["name"], ts))
        elif stack:
            name, start = stack.pop()
            spans.append(TimelineSpan(names.get(pid, str(pid)), name, start, ts, top_level=not stack))
    return spans


@dataclass
class RankTrace:
    """One rank's profiled steps, from TensorFlow's profiler, in seconds of the Unix clock.

    `steps`: each step's span; `ops`: spans of TensorFlow ops other than Horovod's; `enqueued`: when
    a Horovod collective op was handed its input; `done`: when Horovod called back.
    """

    steps: list[Interval] = field(default_factory=list)
    ops: list[Interval] = field(default_factory=list)
    enqueued: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)


def read_xplane(path: str) -> RankTrace:
    """The steps, ops and Horovod enqueue/callback times of one rank's `*.xplane.pb`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    start_ns = 0
    for plane in space.planes:
        for stat in plane.stats:
            if plane.stat_metadata[stat.metadata_id].name == "profile_start_time":
                start_ns = stat.int64_value or stat.uint64_value
    host = next(plane for plane in space.planes if plane.name == "/host:CPU")
    kernel_type = next((k for k, m in host.stat_metadata.items() if m.name == "kernel_type"), None)
    steps_by_name: dict[str, list[Interval]] = {}
    trace = RankTrace()
    for line in host.lines:
        base = start_ns + line.timestamp_ns
        for event in line.events:
            name = host.event_metadata[event.metadata_id].name
            begin = (base + event.offset_ps / 1000) / 1e9
            end = begin + event.duration_ps / 1e12
            if name.startswith("EagerLocalExecute: __inference_"):
                steps_by_name.setdefault(name, []).append((begin, end))
                continue
            if name in ("ExecutorState::ProcessAsync::Start", "ExecutorState::ProcessAsync::Done"):
                # Horovod's ops are asynchronous: Start hands the tensor to Horovod, Done is its callback.
                kinds = [host.stat_metadata[s.ref_value].name if s.ref_value else s.str_value
                         for s in event.stats if s.metadata_id == kernel_type]  # fmt: skip
                if any(k.startswith("Horovod") for k in kinds):
                    (trace.enqueued if name.endswith("Start") else trace.done).append(begin)
                continue
            match = _OP_EVENT.match(name)
            if match is not None and not match.group(1).startswith("Horovod"):
                trace.ops.append((begin, end))
    if steps_by_name:
        # The training step is the compiled function that takes the most time (fit also calls small ones).
        trace.steps = sorted(max(steps_by_name.values(), key=_length))
    trace.ops = union(trace.ops)
    trace.enqueued.sort()
    trace.done.sort()
    return trace


def _buckets(rank: int, traces: Sequence[RankTrace], spans: Sequence[TimelineSpan], step: int) -> dict[str, float]:
    """Seconds of rank `rank`'s step `step` in each bucket."""
    window = [traces[rank].steps[step]]
    start, end = window[0]

    def last_enqueue(trace: RankTrace) -> float | None:
        s, e = trace.steps[step]
        inside = [t for t in trace.enqueued if s <= t <= e]
        return max(inside) if inside else None

    compute = intersect(traces[rank].ops, window)
    free = subtract(window, compute)
    mine = last_enqueue(traces[rank])
    everyone = [last_enqueue(trace) for trace in traces]
    latest = max((t for t in everyone if t is not None), default=None)

    def phase(names: Sequence[str], top_level: bool | None = None, after: float | None = None) -> list[Interval]:
        chosen = [(max(s.start, after or s.start), s.end) for s in spans
                  if s.name in names and (top_level is None or s.top_level == top_level) and s.end > start and s.start < end]  # fmt: skip
        return intersect(union(chosen), window)

    layers = {
        "transport": phase(_TRANSPORT),
        "fusion-buffer copies": phase(_COPIES),
        "Horovod bookkeeping": phase(("ALLREDUCE",), top_level=True),
        "waiting for the other rank": [(mine, latest)] if mine is not None and latest > mine else [],
        "negotiation": phase(("NEGOTIATE_ALLREDUCE",), after=latest) if latest is not None else [],
    }
    allreduce_end = max((s.end for s in spans if s.name == "ALLREDUCE" and start <= s.end <= end), default=None)
    callbacks = [t for t in traces[rank].done if start <= t <= end]
    if allreduce_end is not None and callbacks and max(callbacks) > allreduce_end:
        layers["hand-back"] = [(allreduce_end, max(callbacks))]
    out = {"compute": _length(compute)}
    for name in BUCKETS[1:-1]:
        claimed = intersect(union(layers.get(name, [])), free)
        out[name] = _length(claimed)
        free = subtract(free, claimed)
    out["host, other"] = _length(free)
    return out


def attribute(traces: Sequence[RankTrace], spans: Sequence[TimelineSpan], cycles: Sequence[float] = ()) -> list[dict[str, Any]]:
    """Per rank: the mean over the profiled steps of the step time and of each bucket, in ms (the
    buckets add up to the step), and the median step.

    Steps are matched across ranks by position (every rank profiles the same steps). With `cycles`
    (the timeline's cycle marks), also the mean number of Horovod cycles that started per step.
    """
    count = min(len(trace.steps) for trace in traces)
    out = []
    for rank in range(len(traces)):
        per_step = [_buckets(rank, traces, spans, k) for k in range(count)]
        step_ms = [1000 * (e - s) for s, e in traces[rank].steps[:count]]
        out.append({
            "rank": rank,
            "steps": count,
            "step_ms": statistics.mean(step_ms) if step_ms else None,
            "median_step_ms": statistics.median(step_ms) if step_ms else None,
            "buckets_ms": {b: 1000 * statistics.mean(p[b] for p in per_step) for b in BUCKETS} if per_step else {},
            "cycles_per_step": (sum(1 for t in cycles for s, e in traces[rank].steps[:count] if s <= t < e) / count
                                if cycles and count else None),
        })  # fmt: skip
    return out


# ------------------------------------------------------------------------------ the jobs


@dataclass(frozen=True)
class Config:
    """One way to launch the 2-rank job: launcher, its settings, the training loop and the threads.

    `intra`/`inter`: TensorFlow's thread pools (0 leaves them to the launcher's variables and
    TensorFlow's default).
    """

    name: str
    label: str
    launcher: tuple[str, ...]
    loop: str
    intra: int = 1
    inter: int = 0
    env: tuple[tuple[str, str], ...] = ()


def configs() -> dict[str, Config]:
    hvdclip_run = (sys.executable, "-m", "hvdclip.launch", "-np", "2", "--timeout", "900", "--")
    stock = (str(BIN / "horovodrun"), "-np", "2")
    return {
        c.name: c
        for c in (
            # The setting: stock horovodrun (mpirun here), one intra-op and two inter-op threads.
            Config("stock", "stock horovodrun, hand-written loop (intra 1, inter 2)", stock, "handwritten", 1, 2),
            Config("stock-gloo", "stock horovodrun --gloo, hand-written loop (intra 1, inter 2)",
                   (*stock, "--gloo"), "handwritten", 1, 2),  # fmt: skip
            Config("hvdclip-run", "hvdclip-run, HvdClipTrainer (threads: the launcher's)", hvdclip_run, "hvdclip", 0, 0),
            Config("hvdclip-run-handwritten", "hvdclip-run, hand-written loop (threads: the launcher's)",
                   hvdclip_run, "handwritten", 0, 0),  # fmt: skip
            Config("hvdclip-run-gloo", "hvdclip-run --gloo, HvdClipTrainer (threads: the launcher's)",
                   (*hvdclip_run[:-1], "--gloo", "--"), "hvdclip", 0, 0),  # fmt: skip
            Config("hvdclip-run-gloo-handwritten", "hvdclip-run --gloo, hand-written loop (threads: the launcher's)",
                   (*hvdclip_run[:-1], "--gloo", "--"), "handwritten", 0, 0),  # fmt: skip
        )
    }


def worker_argv(loop: str, steps: int, out: Path, intra: int, inter: int, extra: Sequence[str] = (), model: str = MODEL) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.worker", "--loop", loop, "--model", f"{model}:{steps}", "--warmup", "10",
        "--batch-size", "64", "--intra-op-threads", str(intra), "--inter-op-threads", str(inter),
        "--launched-at", repr(time.time()), "--out", str(out), *extra,
    ]  # fmt: skip


def job_env(environ: Mapping[str, str], extra: Mapping[str, str] = ()) -> dict[str, str]:
    """The caller's environment without an enclosing job's launch variables, plus `extra`."""
    env = {k: v for k, v in environ.items() if not k.startswith(_INHERITED_NOT)}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH", "")) if p)
    return {**env, **dict(extra)}


def _run(argv: Sequence[str], env: Mapping[str, str], out: Path, timeout_s: float) -> list[dict]:
    with open(out / "job.log", "w") as log:
        result = subprocess.run(list(argv), env=dict(env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if result.returncode != 0:
        tail = (out / "job.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"benchmarks.profile: job failed ({result.returncode}): {' '.join(argv)}\n{tail}")
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(out / "rank*.json")))]


def _load() -> float:
    return os.getloadavg()[0]


def profile_config(config: Config, steps: int, profile_steps: int, scratch: Path, model: str = MODEL) -> dict[str, Any]:
    """The timing job and the profiled job of one configuration."""
    env = job_env(os.environ, config.env)
    timing = scratch / f"{config.name}-timing"
    timing.mkdir()
    load = _load()
    argv = [*config.launcher, *worker_argv(config.loop, steps, timing, config.intra, config.inter, ["--threads"], model)]
    records = _run(argv, env, timing, 900)
    profiled = scratch / f"{config.name}-profile"
    profiled.mkdir()
    timeline = profiled / "timeline.json"
    extra = ["--tf-profile", str(profiled / "tf"), "--profile-steps", str(profile_steps)]
    argv = [*config.launcher, *worker_argv(config.loop, 20, profiled, config.intra, config.inter, extra, model)]
    profile_records = _run(argv, {**env, "HOROVOD_TIMELINE": str(timeline), "HOROVOD_TIMELINE_MARK_CYCLES": "1"}, profiled, 900)
    traces = [read_xplane(glob.glob(str(profiled / "tf" / f"rank{r}" / "**" / "*.xplane.pb"), recursive=True)[0])
              for r in range(len(profile_records))]  # fmt: skip
    text = timeline.read_text() if timeline.exists() else "[]"
    spans, cycles = parse_timeline(text), parse_cycles(text)
    return {
        "config": config.name,
        "label": config.label,
        "load_1min_at_start": load,
        "timing": [{"rank": r["rank"], "step_ms": 1000 * r["models"][0]["step_s"], "cpu_ms": 1000 * r["models"][0]["cpu_step_s"],
                    "threads": r["models"][0].get("threads", {}), "roles_from_stacks": r["models"][0].get("thread_roles_from_stacks")}
                   for r in sorted(records, key=lambda r: r["rank"])],
        "profiled_step_ms": [1000 * r["models"][0]["step_s"] for r in sorted(profile_records, key=lambda r: r["rank"])],
        "attribution": attribute(traces, spans, cycles),
        "timeline_spans": len(spans),
    }  # fmt: skip


def to_markdown(document: Mapping[str, Any]) -> str:
    parts = []
    for result in document["results"]:
        timing = result["timing"]
        steps = " / ".join(f"{r['step_ms']:.1f}" for r in timing)
        cpu = " / ".join(f"{r['cpu_ms']:.1f}" for r in timing)
        parts += [f"### {result['label']}", "",
                  f"Timing job: {steps} ms per step (rank 0 / rank 1); CPU {cpu} ms "
                  f"per step per rank. Load average at its start: {result['load_1min_at_start']:.2f}.", "",
                  "Where the profiled step goes (mean over the profiled steps, ms; the buckets add up to the step):", "",
                  "| rank | step | " + " | ".join(BUCKETS) + " |", "|---|---|" + "---|" * len(BUCKETS)]  # fmt: skip
        for row in result["attribution"]:
            cells = [f"{row['buckets_ms'].get(b, 0):.2f}" for b in BUCKETS]
            parts.append(f"| {row['rank']} | {row['step_ms']:.2f} | " + " | ".join(cells) + " |")
        cycles = [row.get("cycles_per_step") for row in result["attribution"]]
        if all(c is not None for c in cycles):
            parts += ["", "Horovod cycles per profiled step (the timeline's cycle marks; each runs a coordination collective, "
                      "work or not): " + " / ".join(f"{c:.1f}" for c in cycles) + "."]  # fmt: skip
        parts += ["", "CPU per step by thread (timing job, ms of CPU per step; threads; context switches per step, voluntary / involuntary):", "",
                  "| thread | " + " | ".join(f"rank {r['rank']}" for r in timing) + " |", "|---|" + "---|" * len(timing)]  # fmt: skip
        roles = list(dict.fromkeys(role for r in timing for role in r["threads"]))
        for role in roles:
            cells = []
            for r in timing:
                t = r["threads"].get(role)
                cells.append("–" if t is None else f"{t['cpu_ms_per_step']:.2f} ({t['threads']}; "
                             f"{t['voluntary_switches_per_step']:.1f} / {t['involuntary_switches_per_step']:.1f})")  # fmt: skip
            parts.append(f"| {role} | " + " | ".join(cells) + " |")
        parts.append("")
    parts += ["Set-up:", ""] + [f"- {k}: {v}" for k, v in document["context"].items()]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    chosen = configs()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="stock,hvdclip-run-handwritten,hvdclip-run,hvdclip-run-gloo",
                        help=f"comma-separated, from: {', '.join(chosen)}")  # fmt: skip
    parser.add_argument("--model", default=MODEL, help="a model of benchmarks/models.py")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each timing job")
    parser.add_argument("--profile-steps", type=int, default=30, help="steps under the profilers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="profile")
    parser.add_argument("--keep", type=Path, help="keep the jobs' logs, timelines and traces in this directory")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in chosen]
    if unknown or not names:
        parser.error(f"unknown configuration {unknown or args.configs!r}; choose from {', '.join(chosen)}")
    scratch = Path(tempfile.mkdtemp(prefix="hvdclip-profile-", dir=args.keep))
    before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    try:
        for name in names:
            begin = time.monotonic()
            results.append(profile_config(chosen[name], args.steps, args.profile_steps, scratch, args.model))
            steps = " / ".join(f"{r['step_ms']:.1f}" for r in results[-1]["timing"])
            print(f"[{len(results)}/{len(names)}] {name}: {time.monotonic() - begin:.0f} s, {steps} ms per step",
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    context = {
        "command": "python -m benchmarks.profile " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores",
        "model": f"{args.model}, batch 64 per rank, 2 ranks; timing jobs {args.steps} steps, profiled jobs {args.profile_steps} steps",
        "load average (1/5/15 min) before / after": f"{before} / " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    document = {"context": context, "model": args.model, "results": results}
    results_doc.write(args.out, args.name, document, to_markdown(document))
    print(to_markdown(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
