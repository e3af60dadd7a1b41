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
from typing import ContextManager, TextIO

__all__ = [
    "COMPILE_FACTOR", "DEFAULT_TIMEOUT_S", "ENV_VAR", "EXIT_CODE", "Watchdog", "default_watchdog", "timeout_from_env",
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

    # ------------------------------------------------------------------ the thread

    def _arm(self, name: str, timeout_s: float, source: str) -> int:
        token = next(self._tokens)
        with self._wake:
            self._armed[token] = (name, timeout_s, source, time.monotonic() + timeout_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="hvdclip-watchdog", daemon=True)
                self._thread.start()
            else:
                self._wake.notify()  # It may sleep with no deadline, or a later one than this section's.
        return token

    def _disarm(self, token: int) -> None:
        with self._wake:
            self._armed.pop(token, None)

    def _watch(self) -> None:
        with self._wake:
            while True:
                if not self._armed:
                    self._wake.wait()
                    continue
                token = min(self._armed, key=lambda t: self._armed[t][3])
                name, bound, source, deadline = self._armed[token]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    # A section that ends early just makes this wake-up find nothing to do.
                    self._wake.wait(remaining)
                    continue
                self._expire(name, bound, source)

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
