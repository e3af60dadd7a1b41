"""One rank of one benchmark job: `python -m benchmarks.worker --loop NAME --out DIR ...`.

The runner starts it (under `hvdclip-run`, or once per worker with `TF_CONFIG` for the
MultiWorkerMirroredStrategy loop). For each model in turn it builds the loop, times the first
step (model construction through the first finished step: build, start-up broadcast, tracing),
runs the warm-up steps, times `steps` steps, and reads the process's peak RSS for that model.
It writes `DIR/rank<r>.json`.

For `make profile` and `make bench-colocated` (benchmarks/profile.py, benchmarks/colocated.py) it
can also: start each timed window together with other jobs (`--barrier`), record every thread's
CPU time over the window and, at the end, what each thread is (`--threads`), and run a few more
steps under TensorFlow's profiler (`--tf-profile`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

_STARTED = time.time()  # before TensorFlow is imported: start-up cost counts from here

LOOPS = ("hvdclip", "hvdclip_noclip", "hvdclip_fp16", "own_loop", "own_loop_pertensor", "own_loop_vote", "keras_fit", "handwritten", "seed", "mwms")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME:STEPS", help="repeatable; run in order")
    parser.add_argument("--warmup", type=int, required=True, help="untimed steps after the first one")
    parser.add_argument("--batch-size", type=int, required=True, help="per rank")
    parser.add_argument("--intra-op-threads", type=int, required=True, help="0: TensorFlow's default (or TF_NUM_INTRAOP_THREADS)")
    parser.add_argument("--inter-op-threads", type=int, required=True, help="0: TensorFlow's default (or TF_NUM_INTEROP_THREADS)")
    parser.add_argument("--launched-at", type=float, required=True, help="time.time() when the runner started the job")
    parser.add_argument("--out", required=True, help="directory for rank<r>.json")
    parser.add_argument("--barrier", metavar="DIR:N", help="start each timed window once N processes have reached it")
    parser.add_argument("--threads", action="store_true", help="record each thread's CPU time over the window, and its role")
    parser.add_argument("--tf-profile", metavar="DIR", help="after the last window, run --profile-steps steps under tf.profiler into DIR/rank<r>")
    parser.add_argument("--profile-steps", type=int, default=20)
    return parser.parse_args(argv)


_BARRIER_TIMEOUT_S = 300.0


def _wait_at_barrier(spec: str, name: str) -> None:
    """Marks this process as arrived at barrier `name` in DIR and waits (bounded) until N have."""
    directory, _, count = spec.rpartition(":")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.{os.getpid()}"), "w"):
        pass
    deadline = time.monotonic() + _BARRIER_TIMEOUT_S
    while sum(entry.startswith(f"{name}.") for entry in os.listdir(directory)) < int(count):
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmarks.worker: {count} processes did not reach barrier {name!r} within {_BARRIER_TIMEOUT_S:g} s")
        time.sleep(0.005)


def _reset_peak_rss() -> bool:
    """Resets this process's peak-RSS mark (Linux `clear_refs`), so each model gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _mirrored_strategy():
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    return strategy, int(task["index"]), strategy.num_replicas_in_sync


def make_loop(name: str, spec, batch_size: int, seed: int, strategy):
    from benchmarks import loops

    if name == "mwms":
        return loops.MirroredLoop(strategy, spec, batch_size, seed)
    if name in ("hvdclip", "hvdclip_noclip", "hvdclip_fp16"):
        compression = "fp16" if name == "hvdclip_fp16" else None
        return loops.HvdClipLoop(spec, batch_size, seed, clip=name != "hvdclip_noclip", compression=compression)
    if name in ("own_loop", "own_loop_pertensor", "own_loop_vote"):
        return loops.OwnLoopDoor(spec, batch_size, seed, groups=0 if name == "own_loop_pertensor" else 1, vote=name == "own_loop_vote")
    if name == "keras_fit":
        return loops.KerasFitDoor(spec, batch_size, seed)
    if name == "handwritten":
        return loops.HandWrittenLoop(spec, batch_size, seed)
    return loops.SeedLoop(spec, batch_size, seed)


def _profile(loop, steps: int, directory: str) -> None:
    """`steps` more steps under TensorFlow's profiler (host ops, no Python tracing), into `directory`."""
    import tensorflow as tf

    options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2, python_tracer_level=0, device_tracer_level=0)
    tf.profiler.experimental.start(directory, options=options)
    try:
        loop.run(steps)
    finally:
        tf.profiler.experimental.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import tensorflow as tf

    # Before any op runs: thread pools are fixed when TensorFlow's runtime starts.
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    import horovod
    import keras

    import hvdclip
    from benchmarks.models import MODELS

    if args.loop == "mwms":
        strategy, rank, size = _mirrored_strategy()
    else:
        hvdclip.init()
        strategy, rank, size = None, hvdclip.rank(), hvdclip.size()
    ready = time.time()
    seed = 1000 * rank + 7
    # One-time costs of the process (Keras, tf.function and Horovod lazy set-up) are paid on a
    # throwaway model, so they do not land on the first measured model's time to first step.
    make_loop(args.loop, MODELS["small"], args.batch_size, seed, strategy).run(2)

    from benchmarks import threads as benchmark_threads

    results, usage = [], {}
    for index, item in enumerate(args.model):
        name, steps = item.split(":")
        spec, steps = MODELS[name], int(steps)
        keras.utils.set_random_seed(1234)
        gc.collect()
        per_model_peak = _reset_peak_rss()
        start = time.perf_counter()
        loop = make_loop(args.loop, spec, args.batch_size, seed, strategy)
        loop.run(1)
        first_step = time.perf_counter() - start
        if args.warmup:
            loop.run(args.warmup)
        if args.barrier:
            _wait_at_barrier(args.barrier, f"window{len(results)}")
        threads_before = benchmark_threads.sample() if args.threads else None
        wall_start = time.time()
        start, cpu_start = time.perf_counter(), time.process_time()
        loop.run(steps)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if threads_before is not None:
            usage[len(results)] = (benchmark_threads.delta(threads_before, benchmark_threads.sample()), steps)
        results.append(
            {
                "window_start_unix_s": wall_start,
                "model": name,
                "params": int(loop.model.count_params()),
                "steps": steps,
                "step_s": elapsed / steps,
                "cpu_step_s": cpu / steps,  # all of this process's threads
                "first_step_s": first_step,
                "peak_rss_mb": _peak_rss_mb(),
                "peak_rss_is_per_model": per_model_peak,
            }
        )
        if args.tf_profile and index == len(args.model) - 1:
            _profile(loop, args.profile_steps, os.path.join(args.tf_profile, f"rank{rank}"))
        del loop

    if args.threads:
        roles = benchmark_threads.identify()
        for index, model in enumerate(results):
            window, steps = usage[index]
            model["threads"] = benchmark_threads.summarize(window, roles, steps)
            model["thread_roles_from_stacks"] = roles is not None
    record = {
        "rank": rank,
        "size": size,
        "loop": args.loop,
        "launch_to_ready_s": ready - args.launched_at,
        "import_to_ready_s": ready - _STARTED,
        "versions": {"python": sys.version.split()[0], "tensorflow": tf.__version__, "keras": keras.__version__,
                     "horovod": horovod.__version__},
        "threads": {"intra_op": args.intra_op_threads, "inter_op": args.inter_op_threads,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "models": results,
    }  # fmt: skip
    path = os.path.join(args.out, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
