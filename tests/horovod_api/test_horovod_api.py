"""Scripts in Horovod's own idiom, on Keras 3, with one import changed to hvdclip's: real 2-rank jobs.

Each job (tests/horovod_api/jobs/) is started with the real `hvdclip-run`, exits 0, and prints one
`RESULT {json}` line per rank; the tests read those. Every job is bounded twice: by
`hvdclip-run --timeout` and by the subprocess timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parent / "jobs"
REPO = Path(__file__).resolve().parents[2]
HVDCLIP_RUN = str(Path(sys.executable).with_name("hvdclip-run"))
# Two CPU ranks on a shared 2-core machine: one thread pool each, TensorFlow's C++ log quiet.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
# Starting two TensorFlow ranks takes 10-20 s on a busy 2-core machine; each job trains for seconds.
JOB_BOUND_S = 240
TOLERANCE = 1e-5


def run_job(script: str, *args: str, launch: tuple[str, ...] = ("-np", "2", "--gloo"), env: dict | None = None) -> tuple[dict, str]:
    """Runs `hvdclip-run LAUNCH -- python jobs/SCRIPT ARGS`; returns {rank: result} and the output."""
    command = [
        HVDCLIP_RUN, *launch, "--timeout", str(JOB_BOUND_S), "--", sys.executable, str(JOBS / script), *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=JOB_BOUND_S + 60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    results = {}
    for line in result.stdout.splitlines():
        found = re.search(r"RESULT (\{.*\})$", line)
        if found:
            parsed = json.loads(found.group(1))
            results[parsed["rank"]] = parsed
    return results, output


def assert_all_checks_pass(results: dict) -> None:
    failed = {rank: [name for name, ok in result["checks"].items() if not ok] for rank, result in results.items()}
    assert failed == {rank: [] for rank in results}


def test_own_loop_with_a_first_batch_broadcast_in_the_compiled_step():
    # Dynamic process sets and timeline: the job adds a process set and starts a timeline.
    extra = {"HOROVOD_DYNAMIC_PROCESS_SETS": "1", "HOROVOD_TIMELINE": "DYNAMIC"}
    results, output = run_job(
        "own_loop.py", launch=("-np", "2", "--gloo", "--env", "HOROVOD_DYNAMIC_PROCESS_SETS", "--env", "HOROVOD_TIMELINE"),
        env=extra,
    )  # fmt: skip
    assert sorted(results) == [0, 1], output[-3000:]
    for result in results.values():
        assert result["started_apart"], "each rank starts from its own weights, so the broadcasts are what makes them agree"
        assert result["first_identical"] and result["second_identical"], result
        assert result["error"] <= TOLERANCE, f"the own loop differs from one process on the combined batch by {result['error']}"
        assert result["norms_identical"] and 0 < result["clip_rate"], "tape.report: the reduced norm, the same on every rank"
    assert_all_checks_pass(results)


def test_keras_fit_with_horovods_callbacks_equals_one_process_then_load_model(tmp_path):
    results, output = run_job("keras_fit.py", str(tmp_path))
    assert sorted(results) == [0, 1], output[-3000:]
    for result in results.values():
        assert result["started_apart"] and result["trained_identical"] and result["resumed_identical"], result
        # backward_passes_per_step=2 on a model fit builds: one process on each combined 2-batch window.
        assert result["accumulated_identical"] and result["accumulated_steps"] == 2, result
        assert result["accumulated_error"] <= TOLERANCE, f"accumulation differs from one process by {result['accumulated_error']}"
        assert result["error"] <= TOLERANCE, f"fit differs from one process on the combined batch by {result['error']}"
        # The momentum correction matters here: without it the same schedule ends far away.
        assert result["uncorrected_error"] > 1000 * max(result["error"], 1e-8), result
        assert result["steps"] == 16 and result["rate_error"] <= 1e-7, result
        assert {"lr", "grad_norm", "clip_rate", "val_loss"} <= set(result["logged"]), result["logged"]
        assert result["lr_logged"][-1] == pytest.approx(0.02 * 2 * 0.5), result["lr_logged"]
        # The best epoch is not the last one: the file holds that epoch's model, and its optimizer state.
        assert result["best_epoch"] < 3 and result["val_loss"][result["best_epoch"]] == min(result["val_loss"])
        assert result["loaded_is_best"] and result["loaded_iterations"] == 4 * (result["best_epoch"] + 1), result
        assert result["loaded_optimizer"] == "DistributedOptimizer", result
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best-rank0.keras"], "only rank 0 writes checkpoints"
    assert output.count("finished gradual learning rate warmup to 0.04") == 1, "rank 0 says so, once"
    assert_all_checks_pass(results)


def elastic_launch(tmp_path: Path) -> tuple[tuple[str, ...], str]:
    """hvdclip-run's flags for an elastic job on this machine that starts with one slot listed.

    The job's rank 0 rewrites the hosts file to two slots (jobs/grow.py). `--network-interface lo`:
    with one host, Horovod's elastic driver has no second host to find a common interface with.
    """
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n")
    discover = tmp_path / "discover_hosts.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    launch = (
        "--elastic", "--min-np", "1", "--max-np", "2", "--host-discovery-script", str(discover),
        "--network-interface", "lo", "--elastic-timeout", "120",
    )  # fmt: skip
    return launch, str(hosts)


def test_elastic_own_loop_grows_and_the_new_rank_gets_the_state(tmp_path):
    launch, hosts = elastic_launch(tmp_path)
    results, output = run_job("elastic_own_loop.py", hosts, launch=launch)
    assert sorted(results) == [0, 1], output[-3000:]
    assert results[0]["resets"] == [2] and not results[0]["joined"], "rank 0 started alone and reset once, to 2 ranks"
    assert results[1]["resets"] == [] and results[1]["joined"], "rank 1 joined with weights of its own, and got rank 0's"
    for result in results.values():
        assert result["size"] == 2 and result["finished_at"] == 16 and result["identical"], result
        assert result["error"] <= TOLERANCE, f"the elastic loop differs from one process on the combined batch by {result['error']}"


def test_elastic_keras_fit_grows_and_the_new_rank_gets_the_clip_state(tmp_path):
    launch, hosts = elastic_launch(tmp_path)
    results, output = run_job("elastic_keras.py", hosts, launch=launch)
    assert sorted(results) == [0, 1], output[-3000:]
    assert results[0]["resets"] == [2] and not results[0]["joined"]
    assert results[1]["resets"] == [] and results[1]["joined"]
    for result in results.values():
        # 4 batches alone, then the 3 epochs again from the first (Keras 3 restarts the epoch), 6 batches each.
        assert result["size"] == 2 and result["epoch"] == 3 and result["global_batches"] == 4 + 3 * 6, result
        assert result["identical"], "the new rank must get the weights, the optimizer's slots and AutoClip's history"
        assert {"grad_norm", "clip_rate"} <= set(result["logged"]), result["logged"]
