"""The scripts in launch/ are thin: they run `python -m hvdclip.launch` from the checkout."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dry_run(script, *args):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": "/elsewhere"}
    result = subprocess.run(
        [REPO / "launch" / script, *args, "--dry-run", "--", "python", "train.py"],
        env=env, cwd="/", capture_output=True, text=True,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    return shlex.split(result.stdout)


@pytest.mark.parametrize("script, program", [("horovodrun.sh", "hvdclip.launch.horovodrun"), ("mpirun.sh", "mpirun")])
def test_wrapper_picks_its_backend(script, program):
    argv = dry_run(script, "-np", "2")
    assert program in (Path(argv[0]).name, argv[2])
    assert (argv[argv.index("-np") + 1], argv[-2:]) == ("2", ["python", "train.py"])


def test_checkout_comes_first_on_the_pythonpath_mpirun_forwards():
    # The ranks must import this checkout's hvdclip, ahead of whatever PYTHONPATH held.
    probe = [sys.executable, "-c", "import os; print(os.environ['PYTHONPATH'])"]
    result = subprocess.run(
        [REPO / "launch" / "hvdclip-run", "-np", "1", "--backend", "mpirun", "--", *probe],
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": "/elsewhere"}, cwd="/", capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"{REPO}:/elsewhere"]
    assert "PYTHONPATH" in dry_run("mpirun.sh", "-np", "2")


def test_sbatch_template_without_a_command_prints_usage():
    result = subprocess.run(["bash", REPO / "launch" / "slurm.sbatch"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: sbatch ")
