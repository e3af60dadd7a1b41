"""The rank-side watchdog in a real job: a rank blocked in a collective (its peer frozen) ends itself
with a message naming the step and the bound, and the launcher then ends the job."""

from __future__ import annotations

import time

import pytest
from launcher_support import launch, rank_command

BACKENDS = {"horovodrun-gloo": ["--gloo"], "mpirun": ["--backend", "mpirun"]}
STEP_TIMEOUT_S = 8


# The trainer under both backends; Keras fit and your own tf.function loop under Gloo.
CASES = [pytest.param(flags, "trainer", id=name) for name, flags in BACKENDS.items()] + [
    pytest.param(BACKENDS["horovodrun-gloo"], door, id=f"horovodrun-gloo-{door.replace(' ', '-')}") for door in ("fit", "own loop")
]


@pytest.mark.parametrize("flags, door", CASES)
def test_a_rank_blocked_in_a_collective_ends_itself_naming_the_step_and_the_bound(flags, door, no_rank_left):
    # Gloo's own timeout is raised so that only the watchdog can end the wait.
    start = time.monotonic()
    result = launch(
        "-np", "2", *flags, "--gloo-timeout", "600", "--step-timeout", str(STEP_TIMEOUT_S), "--",
        *rank_command("stall.py", no_rank_left, door), timeout=240,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "stall.py: the stalled step finished" not in result.stdout
    expected = (
        f"hvdclip watchdog: the gradient allreduce of optimizer step 6 did not complete within {STEP_TIMEOUT_S} s "
        "(HVDCLIP_STEP_TIMEOUT); ending rank 0 on "
    )
    assert expected in result.stdout + result.stderr, result.stderr[-3000:]
    assert elapsed < 180, f"the job took {elapsed:.0f} s"
