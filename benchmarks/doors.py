"""`python -m benchmarks.doors` (`make bench-doors`): every door and the clip stage against the
hand-written loop, on every model, inside one job.

`make bench` runs each variant as its own job; between jobs the machine's state moves by 5-10 %,
which is more than the 2-3 % its door and clip-stage targets are about. Here one 2-rank job
builds every loop of a model (`benchmarks/loops.py`: HvdClipTrainer with and without clipping,
the own-loop door, the Keras-fit door and the hand-written Horovod loop) and alternates windows
of steps between them, the order reversed every round, so that the loops share the machine's
state. Each loop's step time is the median of its windows (the slower rank's); the ratios are
taken in the same job. HvdClipTrainer runs one `fit` per window, so its fixed cost per call (15 ms
on 1 rank, more with collectives on 2) is spread over the window's steps, as `make bench` does.

Writes benchmarks/results/doors.json and doors.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import results_doc

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LOOPS = ("hvdclip", "hvdclip_noclip", "own_loop", "own_loop_pertensor", "own_loop_vote", "keras_fit", "handwritten")
LABELS = {
    "hvdclip": "HvdClipTrainer, clip_by_global_norm",
    "hvdclip_noclip": "HvdClipTrainer, no clipping",
    "own_loop": "door 1: own loop + hvdclip.DistributedGradientTape",
    "own_loop_pertensor": "door 1, one allreduce per gradient (groups=0)",
    "own_loop_vote": "door 1 with the has-data vote every step (data of unknown length)",
    "keras_fit": "door 2: Keras fit + hvdclip.keras.DistributedOptimizer",
    "handwritten": "hand-written Horovod loop",
}
# (goal, numerator, denominator, at least): each a ratio of median step times, t(numerator) / t(denominator).
TARGETS = (
    ("clip-stage overhead ≤ 2 % of step time", "hvdclip_noclip", "hvdclip", 0.98),
    ("HvdClipTrainer ≥ 0.97× the hand-written loop", "handwritten", "hvdclip", 0.97),
    ("own-loop door ≥ 0.97× the hand-written loop", "handwritten", "own_loop", 0.97),
    ("Keras-fit door ≥ 0.97× the hand-written loop", "handwritten", "keras_fit", 0.97),
    ("has-data vote ≤ 1 % of step time", "own_loop", "own_loop_vote", 0.99),
)

__all__ = ["LOOPS", "TARGETS", "judge", "main", "to_markdown"]


def _worker(args: argparse.Namespace) -> int:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    import keras

    import hvdclip
    from benchmarks.models import MODELS
    from benchmarks.worker import make_loop

    hvdclip.init()
    rank = hvdclip.rank()
    record: dict[str, Any] = {"rank": rank, "size": hvdclip.size(), "models": {}}
    for model in args.models:
        loops = {}
        for name in args.loops:
            keras.utils.set_random_seed(1234)
            loops[name] = make_loop(name, MODELS[model], args.batch_size, 1000 * rank + 7, None)
            loops[name].run(args.warmup)
        windows: dict[str, list[float]] = {name: [] for name in args.loops}
        for round_ in range(args.rounds):
            for name in args.loops if round_ % 2 == 0 else args.loops[::-1]:
                loops[name].run(2)  # after another loop: its first steps renegotiate Horovod's cache
                start = time.perf_counter()
                loops[name].run(args.steps)
                windows[name].append((time.perf_counter() - start) / args.steps)
        record["models"][model] = windows
        del loops
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    return 0


def judge(windows_by_rank: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Each loop's median step (ms) over its windows, the slower rank's per window, and the targets."""
    step = {}
    for name in windows_by_rank[0]:
        per_window = [max(rank[name][i] for rank in windows_by_rank) for i in range(len(windows_by_rank[0][name]))]
        step[name] = 1000 * statistics.median(per_window)
    targets = []
    for goal, numerator, denominator, at_least in TARGETS:
        if numerator in step and denominator in step:
            ratio = step[numerator] / step[denominator]
            targets.append({"goal": goal, "ratio": ratio, "at_least": at_least, "met": ratio >= at_least})
    return {"step_ms": step, "targets": targets}


def to_markdown(results: Mapping[str, Mapping[str, Any]], context: Mapping[str, str]) -> str:
    models = list(results)
    lines = ["Median step time of each loop's windows, ms (all loops of a model in one 2-rank job, windows alternated):", "",
             "| loop | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]  # fmt: skip
    for name in (n for n in LOOPS if n in results[models[0]]["step_ms"]):
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{results[m]['step_ms'][name]:.2f}" for m in models) + " |")
    lines += ["", "Targets, per model (ratio of the two loops' median steps in the same job):", "",
              "| target | goal | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]  # fmt: skip
    for goal, _, _, at_least in TARGETS:
        if not any(t["goal"] == goal for m in models for t in results[m]["targets"]):
            continue  # Neither loop of this target ran.
        cells = []
        for m in models:
            found = [t for t in results[m]["targets"] if t["goal"] == goal]
            if not found:
                cells.append("–")
                continue
            t = found[0]
            cells.append(f"{t['ratio']:.3f}× {'met' if t['met'] else '**missed**'}")
        lines.append(f"| {goal} | ≥ {at_least:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Set-up:", ""] + [f"- {k}: {v}" for k, v in context.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.models import MODELS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.doors", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, from: {', '.join(LOOPS)}")
    parser.add_argument("--rounds", type=int, default=6)
    # Long windows: HvdClipTrainer's loop is one `fit` call per window, whose entry and exit (the
    # agreed step count, the epoch's metric means) cost 15-40 ms; a user pays that once per epoch.
    parser.add_argument("--steps", type=int, default=150, help="steps per window")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--inter-op-threads", type=int, default=2)
    parser.add_argument("-np", "--num-proc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="doors")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"unknown model {unknown or args.models!r}; choose from {', '.join(MODELS)}")
    args.loops = [n for n in args.loops.split(",") if n]
    unknown = [n for n in args.loops if n not in LOOPS]
    if unknown or not args.loops:
        parser.error(f"unknown loop {unknown or args.loops!r}; choose from {', '.join(LOOPS)}")
    if args.worker:
        args.out = args.worker
        return _worker(args)
    before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.gmtime()
    with tempfile.TemporaryDirectory(prefix="hvdclip-doors-") as scratch:
        worker = [sys.executable, "-m", "benchmarks.doors", "--worker", scratch, "--models", ",".join(args.models),
                  "--loops", ",".join(args.loops),
                  "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--batch-size", str(args.batch_size), "--intra-op-threads", str(args.intra_op_threads),
                  "--inter-op-threads", str(args.inter_op_threads)]  # fmt: skip
        command = [sys.executable, "-m", "hvdclip.launch", "-np", str(args.num_proc), "--gloo", "--timeout", "3000", "--", *worker]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        result = subprocess.run(command, cwd=REPO, env=env, timeout=3100, check=False)
        if result.returncode != 0:
            print(f"benchmarks.doors: the job failed with exit code {result.returncode}", file=sys.stderr)
            return 1
        records = [json.loads((Path(scratch) / f"rank{r}.json").read_text()) for r in range(args.num_proc)]
    results = {m: judge([record["models"][m] for record in records]) for m in args.models}
    context = {
        "command": "python -m benchmarks.doors " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", started),
        "machine": f"{os.cpu_count()} cores",
        "load average (1/5/15 min) before / after": f"{before} / " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "job": f"hvdclip-run -np {args.num_proc} --gloo; batch {args.batch_size} per rank; TensorFlow intra-op "
        f"{args.intra_op_threads}, inter-op {args.inter_op_threads}",
        "windows": f"{args.rounds} per loop of {args.steps} steps, after {args.warmup} warm-up steps",
    }
    document = {"context": context, "results": results}
    results_doc.write(args.out, args.name, document, to_markdown(results, context))
    print(to_markdown(results, context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
