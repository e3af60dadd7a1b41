"""Fixtures for tests/cluster: a 4-host cluster (see cluster.py) shared by the session (most tests use h1
and h2; the elastic test all four), and the launcher flags of each backend."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Cluster, ClusterError, require_root_tools  # noqa: E402


def _unavailable(reason: str):
    # `make test-cluster` runs as root with the tools installed and sets HVDCLIP_REQUIRE_CLUSTER=1:
    # there a missing cluster is a failure. A bare `pytest tests/cluster` elsewhere skips.
    if os.environ.get("HVDCLIP_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"cannot build the test cluster: {reason} (HVDCLIP_REQUIRE_CLUSTER=1)")
    pytest.skip(f"cannot build the test cluster: {reason}")


@pytest.fixture(scope="session")
def cluster():
    reason = require_root_tools()
    if reason:
        _unavailable(reason)
    try:
        with Cluster(4) as built:
            yield built
    except ClusterError as err:
        pytest.fail(f"the test cluster did not come up: {err}")


@pytest.fixture
def hosts(cluster):
    """The cluster, with no job process left on any host after the test (killed if the test did not check)."""
    yield cluster
    for host in cluster.hosts:
        cluster.link(host, up=True)
        for pid in cluster.job_pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
