"""`hvdclip-run --elastic` starting a real 2-rank elastic job on this machine (horovodrun, Gloo)."""

from __future__ import annotations

import time

from launcher_support import launch, rank_command

# Starting two TensorFlow ranks on a busy 2-core machine takes 10-20 s.
JOB_BOUND_S = 120


def test_elastic_job_runs_both_ranks_and_exits_0(tmp_path, no_rank_left):
    script = tmp_path / "discover_hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    script.chmod(0o755)
    start = time.monotonic()
    # --network-interface: with one host, horovodrun's elastic driver has no second host to find a
    # common interface with, and would wait --elastic-timeout for one.
    result = launch(
        "--elastic", "--min-np", "2", "--max-np", "2", "--host-discovery-script", str(script),
        "--network-interface", "lo", "--elastic-timeout", "60", "--timeout", str(JOB_BOUND_S),
        "--", *rank_command("allreduce_check.py", no_rank_left),
        timeout=JOB_BOUND_S + 30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"allreduce-check rank={rank} size=2 sum=3 ok=True" in result.stdout
    assert time.monotonic() - start < JOB_BOUND_S
