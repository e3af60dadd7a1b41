"""A rank-side watchdog: a step or collective that cannot finish within a bound ends the process.

A rank cut off from its peers (a network partition, a peer host lost without a reset) can wait in a
collective for ever: its launcher may be on the other side of the cut, and nothing on its own host
tells it to stop. Each blocking section of the training loop is therefore armed with a deadline; a
daemon thread ends the process, with a message naming the section and the bound, when a deadline
passes.

    watchdog = Watchdog.from_env()                 # HVDCLIP_STEP_TIMEOUT, default 300 s
    with watchdog.section("step 17"):
        compiled_step(x, y)

The bound comes from `HVDCLIP_STEP_TIMEOUT` (seconds; `off` or `0` disables the watchdog, e.g. under
a debugger). `hvdclip-run --step-timeout S` sets it for every rank. A disarmed watchdog starts no
thread, and its sections are one shared no-op context manager.

A compiled step cannot enter a Python `with`, so the core step reports where it is through a
`CollectiveMarker`: two small variable writes around its gradient allreduce (which entry, which
optimizer step), which the watchdog's thread reads a few times per bound. An entry still open after
the bound ends the process like a section does. This is how every door's step is watched, your own
`tf.function` loop included, at the cost of three scalar variable writes per step.

The thread needs the GIL to act; TensorFlow releases it while an op (a Horovod collective, a
compiled step) runs, which is where a rank waits.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ContextManager, TextIO

__all__ = [
    "COMPILE_FACTOR", "DEFAULT_TIMEOUT_S", "ENV_VAR", "EXIT_CODE", "CollectiveMarker", "Watchdog", "default_watchdog",
    "timeout_from_env",
]  # fmt: skip

ENV_VAR = "HVDCLIP_STEP_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
# EX_TEMPFAIL: the job may well succeed when restarted from its last checkpoint.
EXIT_CODE = 75
# A section that traces and compiles (a process's first step) may take this many times the bound.
COMPILE_FACTOR = 10
_OFF = ("off", "0", "none")
_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_DISARMED = contextlib.nullcontext()
# How many times per bound the thread reads the markers of compiled steps (at most once a second).
_POLLS_PER_BOUND = 10


def timeout_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog bound in seconds from `HVDCLIP_STEP_TIMEOUT`; None when it is `off` or `0`.

    Raises:
        ValueError: the variable is neither a number of seconds > 0 nor `off`.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_VAR)
    if text is None or text.strip() == "":
        return DEFAULT_TIMEOUT_S
    if text.strip().lower() in _OFF:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`{ENV_VAR}` must be a number of seconds > 0, or `off`. Received: {ENV_VAR}={text}")
    return value


class _Section:
    """One armed section; `__exit__` disarms it whether the body returned or raised."""

    __slots__ = ("_watchdog", "_name", "_timeout_s", "_source", "_token")

    def __init__(self, watchdog: Watchdog, name: str, timeout_s: float, source: str) -> None:
        self._watchdog, self._name, self._timeout_s, self._source = watchdog, name, timeout_s, source

    def __enter__(self) -> None:
        self._token = self._watchdog._arm(self._name, self._timeout_s, self._source)

    def __exit__(self, *exc_info: object) -> None:
        self._watchdog._disarm(self._token)


class CollectiveMarker:
    """Where a compiled step is: inside its gradient allreduce, or not; written by the step, read by the watchdog.

    `enter(step)` and `leave(tensors, step)` are called while a step is traced: `enter` writes
    `[entry number, step]` into a small int64 variable, `leave` writes `[0, step]` once `tensors`
    (the reduced gradients) exist. The watchdog's thread reads the variable; an entry that stays
    open longer than the bound ends the process. The first entry after the marker is made (or
    after `expect_compile`), found by its number, gets `COMPILE_FACTOR` times the bound: the peers
    may still be compiling their own first step.
    """

    def __init__(self, name: str) -> None:
        import tensorflow as tf

        self.name = name
        self._tf = tf
        # On the host: a read of a GPU variable would queue behind the very kernel that is stuck.
        with tf.device("/CPU:0"):
            self._entries = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvdclip_watchdog_entries")
            self._where = tf.Variable([0, 0], dtype=tf.int64, trainable=False, name="hvdclip_watchdog_marker")
        self.compiling_entry = 1  # The entry that may wait for peers' first compile.

    def enter(self, step: Any) -> Any:
        """An op (to depend on) that marks the allreduce as entered at `step`; call it while tracing."""
        tf = self._tf
        entry = self._entries.assign_add(1)
        return self._where.assign(tf.stack([entry, tf.cast(step, tf.int64)]))

    def leave(self, tensors: Any, step: Any) -> Any:
        """An op that marks the allreduce as done once `tensors` (its outputs) exist; call it while tracing.

        A compiled function runs every stateful op it holds, so nothing needs to consume it.
        """
        tf = self._tf
        done = [t for t in tf.nest.flatten(tensors, expand_composites=True) if t is not None]
        with tf.control_dependencies(done):
            return self._where.assign(tf.stack([tf.constant(0, tf.int64), tf.cast(step, tf.int64)]))

    def expect_compile(self) -> None:
        """The next entry may wait for peers that are compiling (an elastic job retraced its step)."""
        self.compiling_entry = int(self._entries.numpy()) + 1

    def read(self) -> tuple[int, int]:
        entry, step = self._where.numpy().tolist()
        return int(entry), int(step)


@dataclass
class _Watched:
    """The watchdog thread's view of one marker: the open entry it last saw, since when, and its bound."""

    marker: Any
    entry: int = 0
    since: float = 0.0
    bound: float = 0.0
    source: str = ""


class Watchdog:
    """Ends this process when an armed section outlives its bound.

    Args:
        timeout_s: the bound of each section in seconds; None disarms the watchdog.
        exit_code: the process's exit status when a bound runs out.
        stream: where the message goes; defaults to `sys.stderr` at the time it fires.
        source: how the message names where the bound came from.

    Example:
        >>> with Watchdog(60.0).section("start-up broadcast"):
        ...     pass
    """

    def __init__(
        self,
        timeout_s: float | None,
        *,
        exit_code: int = EXIT_CODE,
        stream: TextIO | None = None,
        source: str = ENV_VAR,
    ) -> None:
        if timeout_s is not None and (
            isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0
        ):
            error = ValueError if isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) else TypeError
            raise error(f"`timeout_s` must be a number of seconds > 0, or None. Received: timeout_s={timeout_s!r}")
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self._exit_code, self._stream, self._source = exit_code, stream, source
        self._wake = threading.Condition(threading.Lock())
        self._armed: dict[int, tuple[str, float, str, float]] = {}  # token -> (name, bound, source, deadline)
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._watched: list[_Watched] = []

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Watchdog:
        """A watchdog with the bound of `HVDCLIP_STEP_TIMEOUT` (see `timeout_from_env`)."""
        return cls(timeout_from_env(environ))

    @property
    def armed(self) -> bool:
        return self.timeout_s is not None

    def section(self, name: str, timeout_s: float | None = None, *, compiling: bool = False) -> ContextManager[None]:
        """A context manager that ends the process if its body runs longer than the bound.

        Args:
            name: what the section does, for the message (e.g. "step 17", "epoch 2 metric means").
            timeout_s: this section's bound; defaults to the watchdog's.
            compiling: the section traces and compiles (a first step): its bound is `COMPILE_FACTOR`
                times longer.
        """
        if self.timeout_s is None:
            return _DISARMED
        bound, source = self.timeout_s if timeout_s is None else timeout_s, self._source
        if compiling:
            bound, source = bound * COMPILE_FACTOR, f"{COMPILE_FACTOR} x {source}, as the first step compiles"
        return _Section(self, name, bound, source)

    def marker(self, name: str) -> CollectiveMarker | None:
        """A `CollectiveMarker` for a compiled step's collective named `name`, watched by this watchdog.

        None when the watchdog is disarmed: the step then writes nothing. Make it outside any
        compiled function (it creates variables), once per step owner.
        """
        if self.timeout_s is None:
            return None
        marker = CollectiveMarker(name)
        with self._wake:
            self._watched.append(_Watched(marker))
            self._start_thread()
        return marker

    # ------------------------------------------------------------------ the thread

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hvdclip-watchdog", daemon=True)
            self._thread.start()
        else:
            self._wake.notify()  # It may sleep with no deadline, or a later one than a new section's.

    def _arm(self, name: str, timeout_s: float, source: str) -> int:
        token = next(self._tokens)
        with self._wake:
            self._armed[token] = (name, timeout_s, source, time.monotonic() + timeout_s)
            self._start_thread()
        return token

    def _disarm(self, token: int) -> None:
        with self._wake:
            self._armed.pop(token, None)

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / _POLLS_PER_BOUND)
        next_poll = time.monotonic()
        while True:
            with self._wake:
                watched = list(self._watched)
                waits = [deadline - time.monotonic() for (_, _, _, deadline) in self._armed.values()]
                if watched:
                    waits.append(next_poll - time.monotonic())
                if not waits:
                    self._wake.wait()
                    continue
                token = min(self._armed, key=lambda t: self._armed[t][3], default=None)
                if token is not None and self._armed[token][3] <= time.monotonic():
                    name, bound, source, _ = self._armed[token]
                    self._expire(name, bound, source)
                if min(waits) > 0:
                    # A section that ends early just makes this wake-up find nothing to do.
                    self._wake.wait(min(waits))
                    continue
            # Markers are read outside the lock: a read is a TensorFlow op.
            next_poll = time.monotonic() + poll
            for view in watched:
                self._check(view)

    def _check(self, view: _Watched) -> None:
        """Ends the process if `view`'s marker has had the same entry open for longer than its bound."""
        try:
            entry, step = view.marker.read()
        except Exception:  # noqa: BLE001 - a marker whose variables are gone (interpreter shutting down)
            return
        now = time.monotonic()
        if entry == 0:
            view.entry = 0
            return
        if entry != view.entry:
            view.entry, view.since = entry, now
            view.bound, view.source = self.timeout_s, self._source
            if entry == view.marker.compiling_entry:
                view.bound = self.timeout_s * COMPILE_FACTOR
                view.source = f"{COMPILE_FACTOR} x {self._source}, as the first step may still compile on a peer"
            return
        if now - view.since > view.bound:
            what = f"of optimizer step {step}" if step > 0 else f"(its call {entry})"  # A tape that knows no step.
            self._expire(f"{view.marker.name} {what}", view.bound, view.source)

    def _expire(self, name: str, bound: float, source: str) -> None:
        rank = next((os.environ[v] for v in _RANK_VARIABLES if v in os.environ), "?")
        message = (
            f"hvdclip watchdog: {name} did not complete within {bound:g} s ({source}); "
            f"ending rank {rank} on {socket.gethostname()} (pid {os.getpid()}) with exit code {self._exit_code}: "
            "a peer is lost or the network between ranks is cut. Resume from the last checkpoint; "
            f"raise the bound for slow steps, or set {ENV_VAR}=off to debug.\n"
        )
        stream = self._stream or sys.stderr
        with contextlib.suppress(Exception):
            stream.write(message)
            stream.flush()
        # The main thread is blocked in a collective that will never return: no clean shutdown is possible.
        os._exit(self._exit_code)


_default: Watchdog | None = None
_default_lock = threading.Lock()


def default_watchdog() -> Watchdog:
    """This process's watchdog, built from `HVDCLIP_STEP_TIMEOUT` on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Watchdog.from_env()
    return _default
