"""`python -m benchmarks` (`make bench`): launch every variant, interleaved, and write the report.

Each variant runs as its own job: a Horovod job started by `hvdclip-run` (Gloo controller), or,
for MultiWorkerMirroredStrategy, one process per worker with `TF_CONFIG` on loopback ports.
Repeats are interleaved (A B C A B C ...) so that machine noise falls on every variant alike.
Every job gets the same thread settings, and its ranks write their timings as JSON to a
private directory, from which the runner builds the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import results_doc
from benchmarks.models import MODELS
from benchmarks.report import summarize, to_markdown
from benchmarks.variants import BASELINE, DEFAULT_STEPS, VARIANTS, Variant

__all__ = ["BenchSettings", "BenchmarkError", "job_commands", "main", "plan", "run", "run_processes"]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# hvdclip-run's flags per Horovod backend; mpirun forwards only the variables it is told about.
_LAUNCHER_FLAGS = {"gloo": ["--gloo"], "mpi": ["--backend", "mpirun", "--env", "OMP_NUM_THREADS"]}
# Launch variables of an enclosing MPI job (e.g. a test process that initialised Horovod) would
# confuse the jobs' own launchers; TF_CONFIG is set only for the workers that need it.
_INHERITED_NOT = ("OMPI_", "PMIX_", "PMI_", "TF_CONFIG")


class BenchmarkError(RuntimeError):
    """A benchmark job failed or timed out."""


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run; every job of the run uses the same values."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    models: tuple[str, ...] = tuple(MODELS)
    repeats: int = 5
    steps: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_STEPS))
    warmup: int = 10
    batch_size: int = 64
    num_proc: int = 2
    intra_op_threads: int = 1
    inter_op_threads: int = 2
    backend: str = "gloo"  # Horovod's transport for the Horovod variants: "gloo" or "mpi"
    job_timeout_s: float = 600.0
    out_dir: Path = RESULTS
    name: str = "latest"


@dataclass(frozen=True)
class Job:
    """One launch of one variant."""

    variant: Variant
    repeat: int


def plan(settings: BenchSettings) -> list[Job]:
    """Every variant once per repeat, repeats one after another: A B C A B C, never A A B B."""
    return [Job(VARIANTS[name], r) for r in range(settings.repeats) for name in settings.variants]


def _ranks(settings: BenchSettings, variant: Variant) -> int:
    return 1 if variant.single_rank else settings.num_proc


def worker_argv(settings: BenchSettings, variant: Variant, out_dir: Path, launched_at: float) -> list[str]:
    """The command each rank runs."""
    argv = [sys.executable, "-m", "benchmarks.worker", "--loop", variant.loop]
    for model in settings.models:
        argv += ["--model", f"{model}:{settings.steps[model]}"]
    return argv + [
        "--warmup", str(settings.warmup),
        "--batch-size", str(settings.batch_size),
        "--intra-op-threads", str(settings.intra_op_threads),
        "--inter-op-threads", str(settings.inter_op_threads),
        "--launched-at", repr(launched_at),
        "--out", str(out_dir),
    ]  # fmt: skip


def job_env(settings: BenchSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of every job: the caller's, minus launch leftovers, plus the thread settings."""
    env = {k: v for k, v in environ.items() if not k.startswith(_INHERITED_NOT)}
    env["OMP_NUM_THREADS"] = str(settings.intra_op_threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH", "")) if p)
    return env


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def job_commands(
    settings: BenchSettings,
    variant: Variant,
    out_dir: Path,
    env: Mapping[str, str],
    *,
    launched_at: float,
    ports: Sequence[int] = (),
    gpus: int = 0,
) -> list[tuple[list[str], dict[str, str]]]:
    """The processes one job starts, as (argv, env) pairs.

    A Horovod variant is one `hvdclip-run` command; MultiWorkerMirroredStrategy is one process per
    worker, each with its own `TF_CONFIG` (the cluster on `ports` of 127.0.0.1).
    """
    ranks = _ranks(settings, variant)
    worker = worker_argv(settings, variant, out_dir, launched_at)
    if not variant.uses_tf_config:
        launcher = [sys.executable, "-m", "hvdclip.launch", "-np", str(ranks), *_LAUNCHER_FLAGS[settings.backend]]
        launcher += ["--timeout", f"{settings.job_timeout_s:g}", "--"]  # the launcher stops every rank
        return [(launcher + worker, dict(env))]
    if len(ports) != ranks:
        raise ValueError(f"`ports` must hold one port per worker ({ranks}). Received: ports={list(ports)}")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands = []
    for index in range(ranks):
        worker_env = {**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        if gpus:  # one GPU per worker, as Horovod's ranks get
            worker_env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        commands.append((worker, worker_env))
    return commands


def run_processes(commands: Sequence[tuple[list[str], dict[str, str]]], logs: Path, timeout_s: float) -> None:
    """Starts every command and waits for all; on a failure or timeout stops the rest and raises."""
    procs = []
    for i, (argv, env) in enumerate(commands):
        with open(logs / f"process{i}.log", "w") as log:
            procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    problem = None
    while problem is None and any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed:
            problem = (failed[0], f"exit code {failed[0].returncode}")
        elif time.monotonic() > deadline:
            problem = (next(p for p in procs if p.returncode is None), f"still running after {timeout_s:g} s")
        else:
            time.sleep(0.2)
    failed = [p for p in procs if p.returncode not in (None, 0)]
    if problem is None and failed:
        problem = (failed[0], f"exit code {failed[0].returncode}")
    for p in procs:  # a worker whose peer died would otherwise wait in a collective forever
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if problem is not None:
        proc, what = problem
        i = procs.index(proc)
        tail = (logs / f"process{i}.log").read_text(errors="replace")[-4000:]
        raise BenchmarkError(
            f"benchmark job failed ({what}): {shlex.join(commands[i][0])}\n"
            f"--- end of its output (all logs in {logs}) ---\n{tail}"
        )


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _spread(values: Sequence[float]) -> str:
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2]:.2f}, min {ordered[0]:.2f}, max {ordered[-1]:.2f}"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(settings: BenchSettings, *, command: str = "python -m benchmarks", log=sys.stderr) -> dict[str, Any]:
    """Runs every job, writes `<out_dir>/<name>.json` and `.md`, and returns the JSON document."""
    gpus = _gpu_count()
    env = job_env(settings, os.environ)
    jobs = plan(settings)
    scratch = Path(tempfile.mkdtemp(prefix="hvdclip-bench-"))
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = _load()
    results = []
    for number, job in enumerate(jobs, 1):
        out = scratch / f"job{number:03d}-{job.variant.name}"
        out.mkdir()
        ranks = _ranks(settings, job.variant)
        ports = _free_ports(ranks) if job.variant.uses_tf_config else ()
        begin, load = time.monotonic(), os.getloadavg()[0]
        commands = job_commands(settings, job.variant, out, env, launched_at=time.time(), ports=ports, gpus=gpus)
        # Past the launcher's own --timeout: it gets the first chance to stop its ranks cleanly.
        run_processes(commands, out, settings.job_timeout_s + 60)
        records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
        results.append({"variant": job.variant.name, "repeat": job.repeat, "load_1min_at_start": load, "ranks": records})
        times = "  ".join(f"{m['model']} {1000 * m['step_s']:.2f} ms" for m in records[0]["models"])
        print(f"[{number}/{len(jobs)}] repeat {job.repeat + 1}/{settings.repeats}  {job.variant.name:<15} "
              f"{time.monotonic() - begin:5.1f} s  {times}", file=log, flush=True)  # fmt: skip
    shutil.rmtree(scratch)

    summary = summarize(results, settings.models)
    versions = results[0]["ranks"][0]["versions"]
    context = {
        "command": command,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {gpus} GPUs, {platform.system()} {platform.release()}",
        "load average (1/5/15 min) before / after": f"{load_before} / {_load()}",
        "1-min load average at the jobs' starts": _spread([job["load_1min_at_start"] for job in results]),
        "ranks": f"{settings.num_proc} ({'one GPU each' if gpus else 'CPU'}); Horovod jobs via hvdclip-run "
        + " ".join(_LAUNCHER_FLAGS[settings.backend]),
        "threads per rank": f"TensorFlow intra-op {settings.intra_op_threads}, inter-op {settings.inter_op_threads}, "
        f"OMP_NUM_THREADS={settings.intra_op_threads}",
        "per-rank batch": str(settings.batch_size),
        "timed steps": ", ".join(f"{m} {settings.steps[m]}" for m in settings.models)
        + f", after {settings.warmup} warm-up steps; {settings.repeats} repeats, interleaved",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }
    document = {"context": context, "settings": _settings_json(settings), **summary, "jobs": results}
    results_doc.write(settings.out_dir, settings.name, document, to_markdown(summary, context))
    return document


def _settings_json(settings: BenchSettings) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()}


def _names(kind: str, known: Mapping[str, Any]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.split(",") if n)
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {kind} {unknown or text!r}; choose from {', '.join(known)}")
        return names

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str]) -> BenchSettings:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=_names("variant", VARIANTS), default=defaults.variants,
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--models", type=_names("model", MODELS), default=defaults.models,
                        help=f"comma-separated, from: {', '.join(MODELS)} (default: all)")
    parser.add_argument("--repeats", type=_positive, default=defaults.repeats)
    parser.add_argument("--steps", type=_positive, help="timed steps for every model "
                        f"(default: {', '.join(f'{m} {s}' for m, s in DEFAULT_STEPS.items())})")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=_positive, default=defaults.batch_size, help="per rank")
    parser.add_argument("--backend", choices=sorted(_LAUNCHER_FLAGS), default=defaults.backend,
                        help="Horovod transport: gloo (horovodrun --gloo) or mpi (Open MPI's mpirun)")
    parser.add_argument("-np", "--num-proc", type=_positive, help="ranks (default: one per GPU, else 2)")
    parser.add_argument("--out", type=Path, default=defaults.out_dir, help="directory for NAME.json and NAME.md")
    parser.add_argument("--name", default=defaults.name)
    parser.add_argument("--job-timeout", type=float, default=defaults.job_timeout_s, metavar="S")
    args = parser.parse_args(list(argv))  # fmt: skip
    if BASELINE not in args.variants:
        parser.error(f"--variants must include the baseline {BASELINE!r}: every ratio is relative to it")
    steps = dict(DEFAULT_STEPS) if args.steps is None else {m: args.steps for m in MODELS}
    return BenchSettings(
        variants=args.variants, models=args.models, repeats=args.repeats, steps=steps, warmup=args.warmup,
        batch_size=args.batch_size, num_proc=args.num_proc or _gpu_count() or 2, backend=args.backend, out_dir=args.out,
        name=args.name, job_timeout_s=args.job_timeout,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_args(argv)
    try:
        document = run(settings, command=shlex.join(["python", "-m", "benchmarks", *argv]))
    except BenchmarkError as err:
        print(f"benchmarks: {err}", file=sys.stderr)
        return 1
    print(to_markdown(document, document["context"]))
    print(f"written: {settings.out_dir / (settings.name + '.json')} and .md", file=sys.stderr)
    return 0
