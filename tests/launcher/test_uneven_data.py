"""Uneven and unknown-length per-rank data end every rank's epoch at the same step, in every door, as
a real 2-rank job under both launchers; a job that hangs is ended by the watchdog and fails here,
within this test's own bound."""

from __future__ import annotations

import json
import time

import pytest
from launcher_support import launch, rank_command

BACKENDS = {"horovodrun-gloo": ["--gloo"], "mpirun": ["--backend", "mpirun", "--env", "OMP_NUM_THREADS"]}
# A rank left waiting in an allreduce (a vote that did not work) is ended by the watchdog after this.
STEP_TIMEOUT_S = 60
JOB_BOUND_S = 420  # Seven scenarios' compiles on a busy 2-core machine, plus one watchdog bound.
# Rank 0 holds 10 batches, rank 1 six: every epoch ends where rank 1's data does. With 3 batches
# per optimizer step and unknown lengths, epochs end at the last window every rank can fill: 6.
EXPECTED_STEPS = [6, 6]


@pytest.mark.parametrize("flags", BACKENDS.values(), ids=BACKENDS.keys())
def test_every_door_ends_every_ranks_epoch_at_the_same_step(flags, no_rank_left, tmp_path):
    start = time.monotonic()
    result = launch(
        "-np", "2", *flags, "--step-timeout", str(STEP_TIMEOUT_S), "--",
        *rank_command("uneven.py", str(tmp_path), no_rank_left), timeout=JOB_BOUND_S,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 0, f"exit code {result.returncode} after {elapsed:.0f} s:\n{result.stderr[-4000:]}"
    ranks = [json.loads((tmp_path / f"result.{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 7
    for scenario in ranks[0]:
        steps = [ranks[rank][scenario]["steps"] for rank in (0, 1)]
        assert steps == [EXPECTED_STEPS, EXPECTED_STEPS], (scenario, steps)
        assert ranks[0][scenario]["checksum"] == ranks[1][scenario]["checksum"], f"{scenario}: ranks differ"
