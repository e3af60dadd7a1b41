"""Running podman with the test configuration (tests/images/containers.sh), for tests/images."""

from __future__ import annotations

import subprocess
import time
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


def wait_for_sshd(container: str, bound: float) -> None:
    """Until the container's sshd logs that it listens; fails naming the bound when it runs out."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        logs = podman("logs", container, timeout=30, check=False)
        if "Server listening" in logs.stdout + logs.stderr:
            return
        state = podman("inspect", "--format", "{{.State.Status}}", container, timeout=30, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            pytest.fail(f"{container} stopped ({state}) before its sshd listened:\n{logs.stdout}{logs.stderr}")
        time.sleep(1)
    pytest.fail(f"{container}'s sshd did not listen within the {bound:.0f} s bound")
