"""`hvdclip-run` starting real 2-rank jobs on this machine with horovodrun (Gloo) and Open MPI's mpirun."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from launcher_support import HVDCLIP_RUN, JOB_ENV, REPO, launch, rank_command, still_running

# The launcher flags that pick each backend; Gloo needs no MPI at all, mpirun no horovodrun.
BACKENDS = {"horovodrun-gloo": ["--gloo"], "mpirun": ["--backend", "mpirun", "--env", "OMP_NUM_THREADS"]}
# horovodrun waits up to 5 s for a failed job's other ranks to exit after SIGTERM; allow for a busy machine.
PROMPTLY_S = 30


@pytest.mark.parametrize("flags", BACKENDS.values(), ids=BACKENDS.keys())
def test_two_ranks_see_each_other_and_allreduce(flags):
    result = launch("-np", "2", *flags, "--", *rank_command("allreduce_check.py"))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"allreduce-check rank={rank} size=2 sum=3 ok=True" in result.stdout


@pytest.mark.parametrize("flags", BACKENDS.values(), ids=BACKENDS.keys())
def test_a_failing_rank_ends_the_job_promptly_with_no_rank_left(flags, no_rank_left, tmp_path):
    start = time.monotonic()
    result = launch("-np", "2", *flags, "--", *rank_command("behave.py", "fail", str(tmp_path), no_rank_left))
    elapsed = time.monotonic() - start
    assert sorted(p.name for p in tmp_path.glob("ready.*")) == ["ready.0", "ready.1"], result.stderr[-3000:]
    assert result.returncode != 0
    assert elapsed < PROMPTLY_S


def test_timeout_stops_every_rank_and_exits_124(no_rank_left, tmp_path):
    start = time.monotonic()
    result = launch("-np", "2", "--gloo", "--timeout", "8", "--", *rank_command("behave.py", "wait", str(tmp_path), no_rank_left))
    assert result.returncode == 124, result.stderr[-3000:]
    assert "hvdclip-run: the job ran longer than --timeout=8 seconds; stopping all ranks." in result.stderr
    assert 8 <= time.monotonic() - start < 8 + PROMPTLY_S
    assert sorted(p.name for p in tmp_path.glob("ready.*")) == ["ready.0", "ready.1"]


def _wait_for(paths, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"the ranks did not start (launcher exit code {proc.returncode})\n{err[-3000:]}")
        time.sleep(0.2)


@pytest.mark.parametrize(
    "flags, signum",
    [(BACKENDS["horovodrun-gloo"], signal.SIGTERM), (BACKENDS["mpirun"], signal.SIGTERM), (BACKENDS["mpirun"], signal.SIGINT)],
    ids=["horovodrun-gloo-SIGTERM", "mpirun-SIGTERM", "mpirun-SIGINT"],
)
def test_a_signal_to_the_launcher_reaches_every_rank(flags, signum, no_rank_left, tmp_path):
    proc = subprocess.Popen(
        [HVDCLIP_RUN, "-np", "2", *flags, "--", *rank_command("behave.py", "wait", str(tmp_path), no_rank_left)],
        env=JOB_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for([tmp_path / "ready.0", tmp_path / "ready.1"], 60, proc)
        proc.send_signal(signum)
        proc.communicate(timeout=PROMPTLY_S)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (tmp_path / f"signal.{rank}").read_text() == signum.name
    assert still_running(no_rank_left) == []
