"""The srun backend and the sbatch template against a one-node Slurm cluster started on this machine."""

from __future__ import annotations

import subprocess
import sys
import time

from launcher_support import REPO, launch, rank_command


def test_srun_runs_two_ranks_that_allreduce(slurm_env):
    result = launch("-np", "2", "--backend", "srun", "--", *rank_command("allreduce_check.py"), env=slurm_env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"allreduce-check rank={rank} size=2 sum=3 ok=True slurm_procid={rank}" in result.stdout


def test_srun_failing_rank_ends_the_job_promptly_with_no_rank_left(slurm_env, no_rank_left, tmp_path):
    start = time.monotonic()
    command = rank_command("behave.py", "fail", str(tmp_path), no_rank_left)
    result = launch("-np", "2", "--backend", "srun", "--", *command, env=slurm_env)
    assert sorted(p.name for p in tmp_path.glob("ready.*")) == ["ready.0", "ready.1"], result.stderr[-3000:]
    assert result.returncode != 0
    assert time.monotonic() - start < 30


def test_sbatch_template_picks_srun_inside_the_allocation(slurm_env, tmp_path):
    output = tmp_path / "job.out"
    # Command-line options override the template's #SBATCH lines, sized for a real cluster.
    sbatch = [
        "sbatch", "--wait", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
        f"--output={output}", "launch/slurm.sbatch", *rank_command("allreduce_check.py"),
    ]  # fmt: skip
    env = {**slurm_env, "PYTHON": sys.executable}
    result = subprocess.run(sbatch, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    log = output.read_text() if output.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{log[-3000:]}"
    for rank in (0, 1):
        assert f"allreduce-check rank={rank} size=2 sum=3 ok=True slurm_procid={rank}" in log
