"""A rank killed with SIGKILL mid-training: the job ends promptly and non-zero, no rank is left,
the last checkpoint loads, and resuming from it gives the weights of an uninterrupted run."""

from __future__ import annotations

import time

import numpy as np
import pytest
from launcher_support import launch, rank_command

BACKENDS = {"horovodrun-gloo": ["--gloo"], "mpirun": ["--backend", "mpirun", "--env", "OMP_NUM_THREADS"]}
PROMPTLY_S = 30


def final_weights(out_dir):
    with np.load(out_dir / "final.npz") as data:
        return [data[key] for key in sorted(data.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.parametrize("flags", BACKENDS.values(), ids=BACKENDS.keys())
def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes_exactly(flags, no_rank_left, tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    reference.mkdir()
    crashed.mkdir()
    job = ["-np", "2", *flags, "--"]

    whole = launch(*job, *rank_command("train_and_die.py", str(reference), no_rank_left))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = launch(*job, *rank_command("train_and_die.py", str(crashed), no_rank_left, "--die-rank", "1", "--die-at-step", "13"))
    ended = time.time()
    assert killed.returncode != 0
    killed_at = float((crashed / "killed_at").read_text())
    assert ended - killed_at < PROMPTLY_S, f"the job took {ended - killed_at:.0f} s to end after rank 1 died"
    assert not (crashed / "final.npz").exists()
    checkpoints = sorted(p.name for p in (crashed / "ckpts").glob("ckpt-*.index"))
    assert "ckpt-12.index" in checkpoints, checkpoints  # The epoch-end save before the death at step 13.
    assert not any(name.startswith("ckpt-13") for name in checkpoints)

    resumed = launch(*job, *rank_command("train_and_die.py", str(crashed), no_rank_left, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(final_weights(reference), final_weights(crashed)):
        assert np.array_equal(a, b), "resuming from the checkpoint must give the uninterrupted run's weights"
