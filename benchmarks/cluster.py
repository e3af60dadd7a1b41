"""`python -m benchmarks.cluster` (`make bench-cluster`): hvdclip across 2 hosts on a shaped link.

Builds the 2-host cluster of tests/cluster (network namespaces, one sshd per host; root only), runs
1 rank per host through `hvdclip-run --gloo`, and for each link rate (token-bucket `tc qdisc tbf` on
each host's egress) measures, side by side in one run:

* allreduce bus bandwidth of a 64 MB float32 tensor: bytes x 2(N-1)/N / time, against the link rate;
* the median step time of hvdclip's `fit`, of the hand-written Horovod loop, and of hvdclip with
  `compression="fp16"` (benchmarks/worker.py, model "medium", 1.32 M parameters);
* the lower bound max(compute, 2(N-1)/N x gradient bytes / link rate), where compute is the step
  time of the same model on 1 rank alone.

The three loops run in interleaved rounds (hvdclip, hand-written, fp16, then again), each job
timing `windows` windows of `steps` steps; a step time is the median over all of a loop's windows,
so a burst of load from elsewhere on the machine lands on every loop alike.

Writes benchmarks/results/cluster.json and cluster.md (the table in docs/multi-node.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from cluster import Cluster, require_root_tools  # noqa: E402

PYTHON = sys.executable
HVDCLIP_RUN = str(Path(sys.executable).parent / "hvdclip-run")
RATES = {"1gbit": 1e9, "10gbit": 1e10}
LOOPS = ("hvdclip", "handwritten", "hvdclip_fp16")
MODEL = "medium"
RESULTS = REPO / "benchmarks" / "results"


def _job(cluster: Cluster, ranks: str, argv: list[str], timeout_s: float = 900) -> None:
    np_ = str(sum(int(h.split(":")[1]) for h in ranks.split(",")))
    flags = cluster.ssh_flags(interface="," in ranks)
    command = [HVDCLIP_RUN, "-np", np_, "-H", ranks, "--gloo", *flags, "--", PYTHON, *argv]
    print("+", shlex.join(command), file=sys.stderr, flush=True)
    result = cluster.run("h1", command, timeout=timeout_s, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"benchmark job failed ({result.returncode}):\n{result.stderr[-4000:]}")


def _step_times(cluster: Cluster, ranks: str, loop: str, steps: int, batch: int, windows: int) -> tuple[list[float], int]:
    """(step seconds of each timed window, parameter count) of `loop` on the model, from rank 0's record."""
    with tempfile.TemporaryDirectory() as out:
        _job(cluster, ranks, [
            "-m", "benchmarks.worker", "--loop", loop, *(["--model", f"{MODEL}:{steps}"] * windows), "--warmup", "5",
            "--batch-size", str(batch), "--intra-op-threads", "1", "--inter-op-threads", "1",
            "--launched-at", str(time.time()), "--out", out,
        ])  # fmt: skip
        records = json.loads((Path(out) / "rank0.json").read_text())["models"]
        return [record["step_s"] for record in records], records[0]["params"]


def _bus_bandwidth(cluster: Cluster, mb: float, iters: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        _job(cluster, "h1:1,h2:1", ["-m", "benchmarks.allreduce_worker", "--mb", str(mb), "--iters", str(iters), "--out", out])
        record = json.loads((Path(out) / "allreduce0.json").read_text())
    n = record["size"]
    return record["bytes"] * 8 * 2 * (n - 1) / n / record["seconds"]  # bits per second


def run(steps: int, batch: int, mb: float, iters: int, rounds: int, windows: int) -> dict:
    results: dict = {"model": MODEL, "batch_per_rank": batch, "steps": steps, "rounds": rounds, "windows": windows,
                     "rates": {}}  # fmt: skip
    with Cluster(2) as cluster:
        compute, results["params"] = _step_times(cluster, "h1:1", "hvdclip", steps, batch, windows)
        results["compute_s"] = statistics.median(compute)
        for name, rate in RATES.items():
            for host in cluster.hosts:
                cluster.limit_rate(host, name)
            row: dict = {"busbw_bps": _bus_bandwidth(cluster, mb, iters), "windows": {loop: [] for loop in LOOPS}}
            for _ in range(rounds):
                for loop in LOOPS:
                    row["windows"][loop] += _step_times(cluster, "h1:1,h2:1", loop, steps, batch, windows)[0]
            for loop in LOOPS:
                row[loop] = statistics.median(row["windows"][loop])
            comm = 2 * (2 - 1) / 2 * results["params"] * 4 * 8 / rate
            row["bound_s"] = max(results["compute_s"], comm)
            results["rates"][name] = row
    return results


def table(results: dict) -> str:
    lines = [
        "| link | allreduce bus bandwidth (% of link) | hvdclip step | hand-written step | hvdclip speed vs hand-written "
        "| lower bound | hvdclip / bound | hvdclip fp16 step (speed-up) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["rates"].items():
        rate = RATES[name]
        h, w, f = row["hvdclip"], row["handwritten"], row["hvdclip_fp16"]
        lines.append(
            f"| {name.replace('gbit', ' Gbit/s')} | {row['busbw_bps'] / 1e9:.2f} Gbit/s ({100 * row['busbw_bps'] / rate:.0f} %) "
            f"| {1e3 * h:.1f} ms | {1e3 * w:.1f} ms | {w / h:.3f}× | {1e3 * row['bound_s']:.1f} ms | {h / row['bound_s']:.2f}× "
            f"| {1e3 * f:.1f} ms ({h / f:.2f}×) |"
        )
    lines.append(f"\nCompute alone (1 rank, no communication): {1e3 * results['compute_s']:.1f} ms per step; "
                 f"model {results['model']} ({results['params']:,} parameters, {results['params'] * 4 / 1e6:.1f} MB of "
                 f"float32 gradient), batch {results['batch_per_rank']} per rank; each step time is the median of "
                 f"{results['rounds']} interleaved rounds x {results['windows']} windows of {results['steps']} steps.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mb", type=float, default=64)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args(argv)
    reason = require_root_tools()
    if reason:
        print(f"benchmarks.cluster: cannot build the cluster: {reason}", file=sys.stderr)
        return 2
    results = run(args.steps, args.batch_size, args.mb, args.iters, args.rounds, args.windows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "cluster.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
