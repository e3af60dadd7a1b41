"""Runs a launch command and owns every process it starts.

horovodrun's per-rank helpers call `setsid()`, and mpirun puts ranks in their own process groups, so
signalling the launcher's process group does not reach every rank. `run_job` therefore makes this
process a child subreaper (Linux): a rank whose parent dies is re-parented here instead of to init,
and the job's whole process tree stays visible under /proc. Signals are forwarded to the whole tree,
and when the launcher exits, whatever is left of the tree is terminated.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TextIO

__all__ = ["Executor", "TIMEOUT_EXIT_CODE", "run_job"]

# What a test or an embedding program passes instead of `run_job`: (argv, env, timeout) -> exit code.
Executor = Callable[[Sequence[str], Mapping[str, str], "float | None"], int]

TIMEOUT_EXIT_CODE = 124  # as coreutils' `timeout`
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
_POLL_S = 0.1
_KILL_WAIT_S = 10.0  # a process in uninterruptible sleep may outlive SIGKILL for a while


def _set_subreaper(on: bool) -> bool:
    """Sets this process's child-subreaper flag; returns the previous value (False off Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = ctypes.c_int(0)
        libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
        return bool(previous.value)
    except (OSError, AttributeError):
        return False


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process, read from /proc (empty without /proc)."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses; the fields after it may not.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        table[int(entry)] = (int(ppid), state)
    return table


class _JobTree:
    """The processes of one job: children of this process started after `__init__`, and their descendants."""

    def __init__(self) -> None:
        self._me = os.getpid()
        self._before = {pid for pid, (ppid, _) in _process_table().items() if ppid == self._me}
        self.leader: subprocess.Popen | None = None  # reaped by its Popen, never here

    def _children(self, table: dict[int, tuple[int, str]]) -> list[int]:
        return [pid for pid, (ppid, _) in table.items() if ppid == self._me and pid not in self._before]

    def pids(self) -> list[int]:
        """The job's live processes (zombies excluded)."""
        table = _process_table()
        found = self._children(table)
        for pid in found:  # grows while iterating: a breadth-first walk
            found += [child for child, (ppid, _) in table.items() if ppid == pid]
        return [pid for pid in found if table[pid][1] not in "ZX"]

    def signal(self, signum: int) -> None:
        # The leader's own session too: without /proc (not Linux) that is all the job one can find.
        # Only while the leader is unreaped, so that its pid cannot belong to someone else yet.
        if self.leader is not None and self.leader.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.leader.pid, signum)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def reap(self) -> None:
        """Collects the exit status of re-parented ranks, so none stays a zombie of this process."""
        table = _process_table()
        for pid in self._children(table):
            if (self.leader is None or pid != self.leader.pid) and table[pid][1] in "ZX":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def stop(self, grace_s: float) -> None:
        """SIGTERM, up to `grace_s` seconds to exit, then SIGKILL for what is left."""
        for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, _KILL_WAIT_S)):
            self.signal(signum)
            deadline = time.monotonic() + wait_s
            while self.pids() and time.monotonic() < deadline:
                self.reap()
                time.sleep(_POLL_S)
        self.reap()


@contextlib.contextmanager
def _forwarding_signals(tree: _JobTree, grace_s: float) -> Iterator[list[float]]:
    """Forwards SIGINT/SIGTERM/SIGHUP to the job; yields a list that receives the SIGKILL time."""
    kill_at: list[float] = []

    def forward(signum: int, frame: object) -> None:
        if kill_at:  # a second signal: the user is not waiting any longer
            tree.signal(signal.SIGKILL)
        else:
            kill_at.append(time.monotonic() + grace_s)
            tree.signal(signum)

    # Python only lets the main thread install handlers; elsewhere the caller keeps its own.
    on_main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED} if on_main else {}
    try:
        yield kill_at
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_job(
    argv: Sequence[str],
    env: Mapping[str, str],
    timeout: float | None = None,
    *,
    grace_s: float = 10.0,
    stderr: TextIO | None = None,
) -> int:
    """Runs `argv` without a shell and returns its exit code, leaving none of its processes behind.

    SIGINT, SIGTERM and SIGHUP received meanwhile go to every process of the job; if the job has not
    ended `grace_s` seconds later it is killed, and a second signal kills it at once.

    Args:
        argv: the launcher command, program first.
        env: the environment of the launcher process.
        timeout: seconds after which the whole job is stopped; None waits for ever.
        grace_s: seconds between SIGTERM and SIGKILL when stopping the job.
        stderr: where to report a timeout; defaults to `sys.stderr`.

    Returns:
        The job's exit code; 128 + N when it died of signal N; 124 after a timeout.
    """
    stderr = stderr or sys.stderr
    was_subreaper = _set_subreaper(True)
    tree = _JobTree()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        # A session of its own: the terminal's Ctrl-C reaches the job only through `forward`.
        proc = subprocess.Popen(list(argv), env=dict(env), start_new_session=True)
        tree.leader = proc
        with _forwarding_signals(tree, grace_s) as kill_at:
            while True:
                try:
                    code = proc.wait(timeout=_POLL_S)
                    return code if code >= 0 else 128 - code
                except subprocess.TimeoutExpired:
                    pass
                if kill_at and time.monotonic() >= kill_at[0]:
                    tree.signal(signal.SIGKILL)
                if deadline is not None and time.monotonic() >= deadline:
                    print(
                        f"hvdclip-run: the job ran longer than --timeout={timeout:g} seconds; stopping all ranks.",
                        file=stderr,
                        flush=True,
                    )
                    tree.stop(grace_s)
                    proc.wait()
                    return TIMEOUT_EXIT_CODE
    finally:
        # The launcher is done; a rank still running would have lost its supervisor.
        tree.stop(grace_s)
        _set_subreaper(was_subreaper)
