"""Fixtures for tests/launcher: a per-test marker that must not outlive the launcher, and a one-node
Slurm cluster for the srun backend.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from launcher_support import JOB_ENV, still_running

SLURM_PROGRAMS = ("slurmctld", "slurmd", "srun", "sbatch", "sinfo")


@pytest.fixture
def no_rank_left():
    """A marker to put on the ranks' command lines; the test fails if a process carrying it outlives it."""
    marker = f"hvdclip-launch-test-{uuid.uuid4().hex[:12]}"
    yield marker
    survivors = still_running(marker)
    for proc in survivors:
        proc.kill()
    assert [proc.info["cmdline"] for proc in survivors] == [], "ranks left running after the launcher exited"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unavailable(reason: str):
    # `make test-launch` installs Slurm and sets HVDCLIP_REQUIRE_SLURM=1, so there a missing cluster is
    # a failure; a bare `pytest tests/launcher` on a machine without Slurm skips these tests.
    if os.environ.get("HVDCLIP_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason} (HVDCLIP_REQUIRE_SLURM=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_env():
    """Starts slurmctld and slurmd for a one-node cluster on this machine; yields the job environment."""
    missing = [name for name in SLURM_PROGRAMS if shutil.which(name) is None]
    if missing:
        _unavailable(f"Slurm is not installed (no {', '.join(missing)}); run tests/launcher/install_slurm.sh")
    if os.geteuid() != 0:
        _unavailable("a local slurmd must run as root")
    root = Path(tempfile.mkdtemp(prefix="hvdclip-slurm-"))
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            ClusterName=hvdclip-test
            SlurmctldHost={node}(127.0.0.1)
            SlurmctldPort={_free_port()}
            SlurmdPort={_free_port()}
            # No munge daemon: this cluster never leaves the machine.
            AuthType=auth/none
            CredType=cred/none
            SlurmUser=root
            StateSaveLocation={root}/state
            SlurmdSpoolDir={root}/spool
            SlurmctldPidFile={root}/slurmctld.pid
            SlurmdPidFile={root}/slurmd.pid
            MailProg=/bin/true
            # Containers have no usable cgroup hierarchy for Slurm.
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            MpiDefault=none
            ReturnToService=2
            KillWait=5
            NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
            PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
            """
        )
    )
    (root / "state").mkdir()
    (root / "spool").mkdir()
    env = {**JOB_ENV, "SLURM_CONF": str(conf)}
    env.pop("SLURM_JOB_ID", None)
    daemons = []
    for program, extra in (("slurmctld", ["-i"]), ("slurmd", ["-N", node])):
        with open(root / f"{program}.log", "w") as log:
            daemons.append(subprocess.Popen([program, "-D", "-f", str(conf), *extra], stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline and state != "idle":
            time.sleep(0.5)
            sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            state = sinfo.stdout.strip()
        if state != "idle":
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log")))
            pytest.fail(f"the local Slurm cluster did not come up (node state {state!r})\n{logs}")
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(root, ignore_errors=True)
