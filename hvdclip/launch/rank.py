"""`python -m hvdclip.launch.rank [--verbose] -- COMMAND...`: what `hvdclip-run` runs on each rank.

It sets the rank up, then replaces itself with COMMAND (same pid, so signals and the exit status are
the command's own):

- **Thread limits.** With at least as many ranks on a host as cores, every rank's TensorFlow would
  start a thread per core in two pools, and OpenMP as many again: the ranks then spend their time
  switching, and Horovod's background thread finds no core free. Unless the user set them,
  OMP_NUM_THREADS, TF_NUM_INTRAOP_THREADS and TF_NUM_INTEROP_THREADS become cores // ranks-on-this-host
  (at least 1), and rank 0 says so once.
- **Open MPI yields when idle** on such a host (`OMPI_MCA_mpi_yield_when_idle=1`, unless set): a
  rank waiting in an MPI call polls, and without yielding it holds a core the other rank's compute
  needs (docs/performance.md measures it). It changes nothing under Gloo.
- **Quiet start-up.** TensorFlow writes INFO lines (oneDNN, CPU features) through absl before its
  logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot silence them: 4-6 lines per rank. Unless
  `--verbose`, stderr goes through a small filter process that drops exactly those lines and passes
  everything else on unchanged. `HVDCLIP_STARTUP_LOGS=1` keeps them too.

Importing this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping, Sequence

__all__ = ["NOISE", "THREAD_VARIABLES", "YIELD_VARIABLE", "local_ranks", "main", "thread_limits"]

THREAD_VARIABLES = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
YIELD_VARIABLE = "OMPI_MCA_mpi_yield_when_idle"
# How each launcher tells a rank how many ranks share its host, and which rank it is.
_LOCAL_SIZE_VARIABLES = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")
_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
# TensorFlow's start-up lines: absl's notice that logging is not initialised, INFO lines in absl's
# format (`I0000 00:00:1700000000.000000   1234 port.cc:153] ...`) and the CPU-feature line's continuation.
NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\n"
    rb"|I\d{4} [\d:. ]+\d+ [\w.]+\.cc:\d+\] .*\n"
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow with the appropriate compiler flags\.\n"
)


def local_ranks(environ: Mapping[str, str]) -> int | None:
    """How many ranks share this host, as the launcher says; None when it does not."""
    for name in _LOCAL_SIZE_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_limits(environ: Mapping[str, str], cores: int) -> dict[str, str]:
    """The variables to set on a host whose cores the ranks fill: the thread pools' sizes and Open
    MPI's yield when idle. None unless ranks >= cores, and never one the user set."""
    ranks = local_ranks(environ)
    if ranks is None or ranks < cores or ranks == 1:
        return {}
    per_rank = str(max(1, cores // ranks))
    limits = {name: per_rank for name in THREAD_VARIABLES}
    limits[YIELD_VARIABLE] = "1"
    return {name: value for name, value in limits.items() if name not in environ}


def _filter_stderr() -> None:
    """Points fd 2 at a pipe read by a forked filter that drops `NOISE` lines and copies the rest.

    The filter is a child of the rank; it ends when the last writer (the rank and anything it
    started) closes the pipe, and it ignores SIGINT/SIGTERM so that a signal to the rank's group
    cannot lose the rank's last words.
    """
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the filter
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        os.close(write_end)
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except InterruptedError:
                continue
            if not chunk:
                break
            pending += chunk
            lines, _, pending = pending.rpartition(b"\n")
            if lines:
                kept = NOISE.sub(b"", lines + b"\n")
                if kept:
                    os.write(2, kept)
            elif len(pending) > 65536:  # a very long unterminated line: pass it on as it is
                os.write(2, pending)
                pending = b""
        if pending:
            os.write(2, pending)
        os._exit(0)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.close(read_end)


def main(argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    verbose = argv[:1] == ["--verbose"]
    argv = argv[1:] if verbose else argv
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print("hvdclip.launch.rank: usage: python -m hvdclip.launch.rank [--verbose] -- COMMAND...", file=sys.stderr)
        return 2
    limits = thread_limits(environ, _cores())
    environ.update(limits)
    rank = next((environ[v] for v in _RANK_VARIABLES if v in environ), None)
    if limits and rank == "0":
        settings = " ".join(f"{name}={value}" for name, value in limits.items())
        print(
            f"hvdclip-run: {local_ranks(environ)} ranks share {_cores()} cores on this host; each rank runs with "
            f"{settings} (set them yourself to choose otherwise).",
            file=sys.stderr,
            flush=True,
        )
    if not verbose and environ.get("HVDCLIP_STARTUP_LOGS") != "1":
        sys.stderr.flush()
        _filter_stderr()
    try:
        os.execvpe(command[0], command, environ)
    except OSError as err:
        print(f"hvdclip-run: cannot run {command[0]!r} on this rank: {err.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main())
