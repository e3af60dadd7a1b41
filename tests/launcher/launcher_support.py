"""Helpers for tests that start real jobs with the real `hvdclip-run`, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
RANKS = Path(__file__).resolve().parent / "ranks"
HVDCLIP_RUN = str(Path(sys.executable).parent / "hvdclip-run")
# Two CPU ranks share the machine with other work: one thread pool each, TensorFlow's C++ log quiet.
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def launch(*args: str, env: dict | None = None, timeout: float = 180, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs `hvdclip-run ARGS...` to completion and returns its exit code and output."""
    return subprocess.run(
        [HVDCLIP_RUN, *args], env=env or JOB_ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def rank_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(RANKS / script), *args]


def still_running(marker: str) -> list[psutil.Process]:
    """Live processes whose command line carries `marker`."""
    return [
        proc
        for proc in psutil.process_iter(["cmdline", "status"])
        if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE
    ]
