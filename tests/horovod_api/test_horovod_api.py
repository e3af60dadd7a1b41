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
    assert_all_checks_pass(results)


def test_keras_fit_with_horovods_callbacks_equals_one_process_then_load_model(tmp_path):
    results, output = run_job("keras_fit.py", str(tmp_path))
    assert sorted(results) == [0, 1], output[-3000:]
    for result in results.values():
        assert result["started_apart"] and result["trained_identical"] and result["resumed_identical"], result
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
