"""`python -m benchmarks.colocated` (`make bench-colocated`): 2 ranks on one host against two independent jobs.

On a host whose cores the ranks share, the best a 2-rank job can do is what two independent
1-rank jobs running at the same time do: the same compute on the same cores, with no
communication. This runs, in interleaved rounds (A B C ... A B C ...), on the `medium` model:

* two independent 1-rank jobs at once (each `hvdclip-run -np 1`; their timed windows start
  together), for the hand-written loop and for HvdClipTrainer;
* one rank alone;
* 2-rank jobs: stock `horovodrun` (its defaults, and with `--gloo`) with the hand-written Horovod
  loop, the anchor; `hvdclip-run` with its defaults, with the hand-written loop and with
  HvdClipTrainer; and `hvdclip-run --gloo` with HvdClipTrainer.

Stock horovodrun runs with the threads the issue measured (TensorFlow intra-op 1, inter-op 2,
`OMP_NUM_THREADS=1`); hvdclip-run's jobs take their threads from the launcher. The target: a
2-rank job's step is at most 1.5x the independent jobs' step of the same loop.

Writes benchmarks/results/colocated.json and colocated.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import results_doc
from benchmarks.profile import BIN, MODEL, RESULTS, job_env, worker_argv
from benchmarks.runner import BenchmarkError, run_processes

__all__ = ["TARGET", "VARIANTS", "Variant", "main", "summarize", "to_markdown"]

TARGET = 1.5  # a 2-rank step at most this many times the independent jobs' step


@dataclass(frozen=True)
class Variant:
    """One job set: `jobs` launches of `launcher` at once, each of `ranks` ranks running `loop`.

    `reference`: the independent-jobs variant a 2-rank variant is compared with (same loop).
    """

    name: str
    label: str
    launcher: tuple[str, ...]
    loop: str
    ranks: int
    intra: int
    inter: int
    jobs: int = 1
    reference: str | None = None


def _hvdclip_run(ranks: int, *flags: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "hvdclip.launch", "-np", str(ranks), *flags, "--timeout", "900", "--")


_STOCK = (str(BIN / "horovodrun"), "-np", "2")
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("independent_handwritten", "two independent 1-rank jobs, hand-written loop", _hvdclip_run(1), "handwritten", 1, 1, 2, jobs=2),
        Variant("independent_hvdclip", "two independent 1-rank jobs, HvdClipTrainer", _hvdclip_run(1), "hvdclip", 1, 1, 2, jobs=2),
        Variant("alone", "1 rank alone, hand-written loop", _hvdclip_run(1), "handwritten", 1, 1, 2),
        Variant("stock", "stock horovodrun, hand-written loop (the anchor)", _STOCK, "handwritten", 2, 1, 2,
                reference="independent_handwritten"),
        Variant("stock_gloo", "stock horovodrun --gloo, hand-written loop", (*_STOCK, "--gloo"), "handwritten", 2, 1, 2,
                reference="independent_handwritten"),
        Variant("hvdclip_run_handwritten", "hvdclip-run, hand-written loop", _hvdclip_run(2), "handwritten", 2, 0, 0,
                reference="independent_handwritten"),
        Variant("hvdclip_run", "hvdclip-run, HvdClipTrainer", _hvdclip_run(2), "hvdclip", 2, 0, 0, reference="independent_hvdclip"),
        Variant("hvdclip_run_gloo", "hvdclip-run --gloo, HvdClipTrainer", _hvdclip_run(2, "--gloo"), "hvdclip", 2, 0, 0,
                reference="independent_hvdclip"),
    )
}  # fmt: skip


def _commands(variant: Variant, steps: int, out: Path, env: Mapping[str, str]) -> list[tuple[list[str], dict[str, str]]]:
    commands = []
    for job in range(variant.jobs):
        job_out = out / f"job{job}"
        job_out.mkdir()
        extra = ["--barrier", f"{out / 'barrier'}:{variant.jobs}"] if variant.jobs > 1 else []
        worker = worker_argv(variant.loop, steps, job_out, variant.intra, variant.inter, extra)
        commands.append(([*variant.launcher, *worker], dict(env)))
    return commands


def _records(out: Path, variant: Variant) -> list[dict]:
    records = []
    for job in range(variant.jobs):
        for rank in range(variant.ranks):
            records.append(json.loads((out / f"job{job}" / f"rank{rank}.json").read_text()))
    return records


def summarize(samples: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per variant: median step (the slowest process of each repeat), its range, CPU, and the ratio
    to its reference's median step."""
    rows = {}
    for name, repeats in samples.items():
        steps = [r["step_ms"] for r in repeats]
        rows[name] = {
            "step_ms": statistics.median(steps),
            "step_ms_min": min(steps),
            "step_ms_max": max(steps),
            "cpu_ms": statistics.median(r["cpu_ms"] for r in repeats),
            "repeats": len(repeats),
        }
    for name, row in rows.items():
        reference = VARIANTS[name].reference
        row["vs_independent"] = row["step_ms"] / rows[reference]["step_ms"] if reference in rows else None
        row["met"] = None if row["vs_independent"] is None else row["vs_independent"] <= TARGET
    return rows


def to_markdown(rows: Mapping[str, Mapping[str, Any]], context: Mapping[str, str]) -> str:
    lines = [
        f"Median step time over the repeats (min–max), `medium` model, batch 64 per rank. *÷ independent* is a "
        f"2-rank job's step over the step of two independent 1-rank jobs of the same loop run at the same "
        f"time; the target is ≤ {TARGET:.2f}.",
        "",
        "| variant | ranks | ms/step (min–max) | CPU ms/step per process | ÷ independent | ≤ 1.5 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        variant = VARIANTS[name]
        ratio = "–" if row["vs_independent"] is None else f"{row['vs_independent']:.2f}×"
        met = {None: "–", True: "met", False: "**missed**"}[row["met"]]
        ranks = f"{variant.ranks}" if variant.jobs == 1 else f"{variant.jobs} × {variant.ranks}"
        lines.append(f"| {variant.label} | {ranks} | {row['step_ms']:.2f} ({row['step_ms_min']:.2f}–{row['step_ms_max']:.2f}) "
                     f"| {row['cpu_ms']:.2f} | {ratio} | {met} |")  # fmt: skip
    lines += ["", "Set-up:", ""] + [f"- {k}: {v}" for k, v in context.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.colocated", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="colocated")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names or args.repeats < 1 or args.steps < 1:
        parser.error(f"unknown variant {unknown or args.variants!r} (choose from {', '.join(VARIANTS)}), or --repeats/--steps < 1")
    env = job_env(os.environ, {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    scratch = Path(tempfile.mkdtemp(prefix="hvdclip-colocated-"))
    started, before = time.gmtime(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    loads = []
    try:
        for repeat in range(args.repeats):
            for name in names:
                variant, out = VARIANTS[name], scratch / f"r{repeat}-{name}"
                out.mkdir()
                loads.append(os.getloadavg()[0])
                begin = time.monotonic()
                run_processes(_commands(variant, args.steps, out, env), out, 960)
                models = [r["models"][0] for r in _records(out, variant)]
                sample = {"step_ms": 1000 * max(m["step_s"] for m in models),
                          "cpu_ms": 1000 * statistics.mean(m["cpu_step_s"] for m in models), "load": loads[-1]}  # fmt: skip
                samples[name].append(sample)
                print(f"[{repeat + 1}/{args.repeats}] {name:<24} {time.monotonic() - begin:5.1f} s  {sample['step_ms']:.2f} ms/step "
                      f"(load {loads[-1]:.2f})", file=sys.stderr, flush=True)  # fmt: skip
    except BenchmarkError as err:
        print(f"benchmarks.colocated: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = summarize(samples)
    context = {
        "command": "python -m benchmarks.colocated " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", started),
        "machine": f"{os.cpu_count()} cores",
        "load average (1/5/15 min) before / after": f"{before} / " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "1-min load average at the jobs' starts": f"median {statistics.median(loads):.2f}, max {max(loads):.2f}",
        "timed steps": f"{args.steps} after 10 warm-up steps; {args.repeats} repeats, interleaved",
        "model": MODEL,
    }
    document = {"context": context, "rows": rows, "samples": samples}
    results_doc.write(args.out, args.name, document, to_markdown(rows, context))
    print(to_markdown(rows, context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
