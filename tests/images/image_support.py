"""Running podman with the test configuration (tests/images/containers.sh), for tests/images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONTAINERS = ["bash", str(HERE / "containers.sh")]


def podman(*args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """podman ARGS with the test configuration; fails with the output when it fails or when its
    `timeout` bound runs out."""
    command = [*CONTAINERS, "podman", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"podman {args[0]} ran out of its {timeout:.0f} s bound: {command}\n{e.stdout}\n{e.stderr}")
    if check and result.returncode != 0:
        pytest.fail(f"{command} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result
