"""`run_job` on small real process trees: exit codes, --timeout, and nothing left running afterwards."""

import io
import os
import sys
import time
import uuid

import pytest

from hvdclip.launch import run_job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def running_with(marker):
    """Pids of live processes whose command line contains `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def python(code, *args):
    return [sys.executable, "-c", code, *args]


SLEEPER = "import time; time.sleep(120)"


@pytest.fixture
def marker():
    return f"hvdclip-test-{uuid.uuid4().hex}"


@pytest.mark.parametrize("code, expected", [("pass", 0), ("raise SystemExit(3)", 3), ("import os; os.kill(os.getpid(), 15)", 143)])
def test_exit_code_is_the_jobs_and_a_signal_death_is_128_plus_n(code, expected):
    assert run_job(python(code), os.environ) == expected


def test_environment_is_the_one_given():
    code = "import os, sys; sys.exit(0 if os.environ.get('HVDCLIP_PROBE') == 'yes' else 5)"
    assert run_job(python(code), {**os.environ, "HVDCLIP_PROBE": "yes"}) == 0
    assert run_job(python(code), {k: v for k, v in os.environ.items() if k != "HVDCLIP_PROBE"}) == 5


def test_timeout_stops_the_whole_tree_and_says_so(marker):
    # The leader starts a second "rank" and both would sleep for two minutes.
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, sys.argv[1]]); time.sleep(120)"
    stderr = io.StringIO()
    start = time.monotonic()
    code = run_job(python(leader, marker), os.environ, timeout=1.5, grace_s=2, stderr=stderr)
    assert code == 124
    assert time.monotonic() - start < 10
    assert stderr.getvalue() == "hvdclip-run: the job ran longer than --timeout=1.5 seconds; stopping all ranks.\n"
    assert running_with(marker) == []


def test_ranks_detached_from_an_exited_leader_are_stopped(marker):
    # Like horovodrun's per-rank helpers: a new session, then the leader exits and orphans it.
    leader = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, sys.argv[1]], start_new_session=True)"
    probe = f"{leader}; import time; time.sleep(0.5)"
    assert run_job(python(probe, marker), os.environ, grace_s=2) == 0
    assert running_with(marker) == []


def test_unrelated_children_of_the_caller_are_left_alone(marker):
    import subprocess

    bystander = subprocess.Popen(python(SLEEPER, marker))
    try:
        assert run_job(python("pass"), os.environ, grace_s=1) == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
