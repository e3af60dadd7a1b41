"""Which threads of a rank burn CPU, and what each one is: Linux's per-thread counters plus one look
at every thread's stack.

`sample()` reads each thread's CPU time and context switches from `/proc/self/task` (cheap, no
effect on the run); `delta()` turns two samples into per-thread usage over a window. `identify()`
names each thread by what runs at the bottom of its stack, from one `gdb -batch` look at the
process (a second or two with every thread stopped; the profile does it once, after the timed
steps). TensorFlow names its pool threads, but Horovod's background thread, Gloo's transport
loops, Open MPI's and the timeline writer are all called "python"; their stacks tell them apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ROLES", "ThreadUsage", "delta", "identify", "role_of", "sample", "summarize"]

_TICK = os.sysconf("SC_CLK_TCK")

# (role, pattern in the thread's stack), the first that matches wins. The main thread is found by its id.
ROLES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (role, re.compile(pattern))
    for role, pattern in (
        ("Horovod timeline writer", r"TimelineWriter::WriterLoop"),
        ("Horovod background thread", r"horovod::common::.*BackgroundThreadLoop"),
        ("Gloo TCP transport loop", r"gloo::transport::tcp::Loop::run"),
        ("Open MPI runtime", r"opal_progress_threads|progress_engine|opal_libevent|pmix|event_base_loop|listen_thread_fn"),
        ("tf.data", r"tensorflow::data::|tf_data"),
        ("TensorFlow compute pool", r"Eigen::ThreadPoolTempl|tsl::thread::EigenEnvironment"),
    )
)
MAIN = "Python main thread"
OTHER = "other"


@dataclass(frozen=True)
class ThreadUsage:
    """One thread's name and counters over a window: CPU seconds and context switches."""

    name: str
    cpu_s: float
    voluntary_switches: int
    involuntary_switches: int


def _read(tid: int) -> ThreadUsage | None:
    base = f"/proc/self/task/{tid}"
    try:
        with open(f"{base}/comm") as f:
            name = f.read().strip()
        with open(f"{base}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"{base}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, IndexError):
        return None  # the thread ended while we looked
    cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return ThreadUsage(name, cpu, int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"]))


def sample() -> dict[int, ThreadUsage]:
    """Every thread of this process now: thread id -> its counters since it started."""
    out = {}
    for entry in os.listdir("/proc/self/task"):
        usage = _read(int(entry))
        if usage is not None:
            out[int(entry)] = usage
    return out


def delta(before: Mapping[int, ThreadUsage], after: Mapping[int, ThreadUsage]) -> dict[int, ThreadUsage]:
    """Per-thread usage between two samples (a thread started in between counts from zero)."""
    out = {}
    for tid, end in after.items():
        start = before.get(tid, ThreadUsage(end.name, 0.0, 0, 0))
        out[tid] = ThreadUsage(
            end.name,
            end.cpu_s - start.cpu_s,
            end.voluntary_switches - start.voluntary_switches,
            end.involuntary_switches - start.involuntary_switches,
        )
    return out


def role_of(stack: str, name: str, is_main: bool) -> str:
    """What a thread is, from its stack (gdb's backtrace) and its name."""
    if is_main:
        return MAIN
    for role, pattern in ROLES:
        if pattern.search(stack):
            return role
    if name.startswith("tf_Compute"):
        return "TensorFlow compute pool"
    if name.startswith("tf_data"):
        return "tf.data"
    return OTHER


def identify(timeout_s: float = 120.0) -> dict[int, str] | None:
    """Thread id -> role for every thread of this process, from gdb's backtraces; None without gdb.

    gdb attaches to this very process from a child; every thread, the caller's included, is stopped
    for the second or two it takes, then resumed.
    """
    gdb = shutil.which("gdb")
    if gdb is None:
        return None
    pid = os.getpid()
    try:
        result = subprocess.run(
            [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "set pagination off", "-ex", "thread apply all bt 40"],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    stacks: dict[int, list[str]] = {}
    current = None
    for line in result.stdout.splitlines():
        header = re.match(r"Thread \d+ \(.*?LWP (\d+)\)", line)
        if header:
            current = int(header.group(1))
            stacks[current] = []
        elif current is not None and line.startswith("#"):
            stacks[current].append(line)
    if not stacks:
        return None
    names = sample()
    roles = {tid: role_of("\n".join(lines), names[tid].name if tid in names else "", tid == pid) for tid, lines in stacks.items()}
    # Threads started from Python (hvdclip's watchdog, say) carry their Python name.
    python_names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    for tid, name in python_names.items():
        if tid != pid and roles.get(tid) == OTHER:
            roles[tid] = f"Python thread '{name}'"
    return roles


def summarize(usage: Mapping[int, ThreadUsage], roles: Mapping[int, str] | None, steps: int) -> dict[str, dict]:
    """Per role: CPU ms per step, threads, and context switches per step, largest CPU first.

    Without `roles` (no gdb) threads are grouped by their names, the main thread apart.
    """
    pid = os.getpid()
    groups: dict[str, list[ThreadUsage]] = {}
    for tid, use in usage.items():
        if roles is not None:
            role = roles.get(tid, OTHER)
        else:
            role = MAIN if tid == pid else role_of("", use.name, False) if use.name.startswith("tf_") else f"thread '{use.name}'"
        groups.setdefault(role, []).append(use)
    rows = {
        role: {
            "cpu_ms_per_step": 1000 * sum(u.cpu_s for u in uses) / steps,
            "threads": len(uses),
            "busy_threads": sum(u.cpu_s > 0 for u in uses),
            "voluntary_switches_per_step": sum(u.voluntary_switches for u in uses) / steps,
            "involuntary_switches_per_step": sum(u.involuntary_switches for u in uses) / steps,
        }
        for role, uses in groups.items()
    }
    return dict(sorted(rows.items(), key=lambda item: -item[1]["cpu_ms_per_step"]))
