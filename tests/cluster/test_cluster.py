"""hvdclip-run across 2 hosts x 2 slots (network namespaces with their own sshd, see cluster.py), with
the default backend as users get it (horovodrun, which starts the ranks with mpirun: Horovod here is
built with MPI), horovodrun/Gloo and Open MPI's mpirun: results, checkpoints, and failures that end in
bounded time on every host. The hosts' keys are only in the cluster's own known-hosts file, and `ssh`
is the system's: a job reaches h2 only if hvdclip-run's ssh settings reach every ssh it starts."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from cluster import SSH_PORT

from hvdclip.launch.settings import DEFAULT_SSH_OPTIONS

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # by absolute path: root's .bashrc runs pyenv on every ssh command
HVDCLIP_RUN = str(Path(sys.executable).parent / "hvdclip-run")
JOB = str(Path(__file__).resolve().parent / "ranks" / "job.py")
BACKENDS = {"horovodrun-gloo": ["--gloo"], "mpirun": ["--backend", "mpirun"]}
# hvdclip-run with no backend flag: horovodrun, whose MPI controller starts the ranks with mpirun.
WITH_DEFAULT = {"default": [], **BACKENDS}
HOSTS = ["-np", "4", "-H", "h1:2,h2:2"]
JOB_TIMEOUT_S = 300
LOST_HOST_BOUND_S = 15
PARTITION_LAUNCHER_BOUND_S = 60
PARTITION_RANKS_BOUND_S = 90


def hvdclip_run(cluster, flags, *job_args):
    """The command line the tests (and docs/launching.md) run on h1."""
    return [HVDCLIP_RUN, *HOSTS, *cluster.ssh_flags(), *flags, "--", PYTHON, JOB, *job_args]


def run_job(cluster, flags, *job_args) -> subprocess.CompletedProcess:
    return cluster.run("h1", hvdclip_run(cluster, flags, *job_args), timeout=JOB_TIMEOUT_S, cwd=REPO)


def final_weights(out: Path) -> list[np.ndarray]:
    with np.load(out / "final.npz") as data:
        return [data[key] for key in sorted(data.files, key=lambda k: int(k.split("_")[1]))]


def assert_ranks_identical_and_spread(out: Path) -> None:
    rows = np.load(out / "checksums.npy")
    assert rows.shape[0] == 4 and all(np.array_equal(rows[0], row) for row in rows[1:]), rows
    assert sorted((out / f"host.{rank}").read_text() for rank in range(4)) == ["h1", "h1", "h2", "h2"]


def marked(cluster, host: str, marker: str) -> list[int]:
    """The host's processes whose command line carries `marker`."""
    found = []
    for pid in cluster.pids(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(pid)
    return found


def wait_until(condition, bound_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + bound_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within the {bound_s:g} s bound")
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = subprocess.run([PYTHON, JOB, "reference", str(out)], cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return final_weights(out)


def assert_every_ssh_setting(cluster, argv: list[str]) -> None:
    """An ssh client's `argv` carries hvdclip-run's port, key, --ssh-option and its keepalives."""
    missing = cluster.missing_ssh_settings(argv, dict(DEFAULT_SSH_OPTIONS))
    assert missing == [], f"ssh without {missing}: {argv}"


def test_only_the_clusters_own_known_hosts_file_knows_its_hosts_and_ssh_is_the_systems(cluster):
    # So a job that reaches h2 proves hvdclip-run's --ssh-option reached the ssh that got there.
    ssh = shutil.which("ssh")
    assert Path(ssh).read_bytes()[:4] == b"\x7fELF", f"{ssh} is not the ssh program (a wrapper script?)"
    without = cluster.run("h1", ["ssh", "-p", str(SSH_PORT), "-i", str(cluster.identity), "-o", "BatchMode=yes", "h2", "true"])
    assert without.returncode == 255 and "Host key verification failed." in without.stderr, without.stderr
    assert cluster.run("h1", ["ssh", *cluster.ssh_args(), "h2", "true"]).returncode == 0


def test_dry_run_shows_the_ssh_and_the_mpirun_the_default_backend_then_runs(cluster):
    # --verbose: horovodrun prints the mpirun command it hands to /bin/sh, which must be the dry run's.
    argv = [HVDCLIP_RUN, *HOSTS, *cluster.ssh_flags(), "--verbose", "--", "hostname"]
    planned = cluster.run("h1", [argv[0], "--dry-run", *argv[1:]], timeout=120)
    assert planned.returncode == 0, planned.stderr
    plan = planned.stdout.splitlines()
    check = plan[plan.index("# horovodrun checks ssh to each remote host (its other ssh commands take the same options):") + 1]
    assert_every_ssh_setting(cluster, shlex.split(check))
    mpirun = plan[plan.index("# horovodrun starts the ranks with:") + 1]
    words = shlex.split(mpirun)
    assert_every_ssh_setting(cluster, ["ssh", *words[words.index("plm_rsh_args") + 1].split()])
    ran = cluster.run("h1", argv, timeout=JOB_TIMEOUT_S)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert mpirun in ran.stdout.splitlines(), ran.stdout[-3000:]
    names = sorted(line.rsplit(":", 1)[1] for line in ran.stdout.splitlines() if "<stdout>:" in line)
    assert names == ["h1", "h1", "h2", "h2"], ran.stdout[-3000:]


def test_each_host_has_its_name_address_and_sshd_and_no_way_out(cluster):
    for host in cluster.hosts:
        result = cluster.run("h1", ["ssh", *cluster.ssh_args(), host, "hostname; ip -4 -br addr show eth0; ip route"])
        assert result.returncode == 0, result.stderr
        name, address, *routes = result.stdout.splitlines()
        assert name == host
        assert address.split()[2] == f"{cluster.address[host]}/24"
        assert not any(route.startswith("default") for route in routes), routes


@pytest.mark.parametrize("flags", WITH_DEFAULT.values(), ids=WITH_DEFAULT.keys())
def test_four_ranks_on_two_hosts_equal_one_process_on_the_combined_batch(flags, hosts, reference, tmp_path):
    result = run_job(hosts, flags, "steps", str(tmp_path), uuid.uuid4().hex)
    assert result.returncode == 0, result.stderr[-5000:]
    assert_ranks_identical_and_spread(tmp_path)
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(final_weights(tmp_path), reference))
    assert difference <= 1e-5, difference
    # Quiet by default: none of TensorFlow's start-up lines from any of the 4 ranks.
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("flags", BACKENDS.values(), ids=BACKENDS.keys())
def test_a_checkpoint_saved_on_one_host_resumes_bit_exactly(flags, hosts, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    marker = uuid.uuid4().hex
    for out, args in ((whole, ["2"]), (cut, ["1"]), (cut, ["2", "--resume"])):
        result = run_job(hosts, flags, "fit", str(out), marker, *args)
        assert result.returncode == 0, result.stderr[-5000:]
    assert_ranks_identical_and_spread(cut)
    for a, b in zip(final_weights(whole), final_weights(cut)):
        assert np.array_equal(a, b), "resuming from the checkpoint must give the uninterrupted run's weights"


def start_hanging_job(cluster, flags, out: Path, marker: str, door: str = "trainer") -> subprocess.Popen:
    proc = cluster.popen(
        "h1", hvdclip_run(cluster, flags, "hang", str(out), marker, door), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: all((out / f"step.{r}").exists() for r in range(4)) or proc.poll() is not None, 180, "4 ranks training")
    except BaseException:
        proc.kill()
        raise
    if proc.poll() is not None:
        pytest.fail(f"the job ended before training (exit code {proc.returncode}): {proc.communicate()[1][-3000:]}")
    # Every ssh the job keeps open from h1 (Gloo: one per remote rank; MPI: to h2's daemon) has every setting.
    clients = cluster.ssh_clients("h1")
    assert clients, "no ssh client on h1 while 2 ranks run on h2"
    for argv in clients:
        assert_every_ssh_setting(cluster, argv)
    if not flags:  # the default backend: horovodrun's MPI controller, so an mpirun runs the ranks
        assert any(Path(f"/proc/{pid}/comm").read_text().strip() == "mpirun" for pid in marked(cluster, "h1", marker))
    return proc


def launcher_exit(proc: subprocess.Popen, start: float, bound_s: float, what: str) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=bound_s + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the launcher did not end within {bound_s + 60:g} s after {what}:\n{err[-3000:]}")
    return proc.returncode, time.monotonic() - start, err


# The trainer under every backend; the other two doors (Keras fit, your own loop) under the default.
FAILURE_CASES = [pytest.param(flags, "trainer", id=name) for name, flags in WITH_DEFAULT.items()] + [
    pytest.param([], door, id=f"default-{door.replace(' ', '-')}") for door in ("fit", "own loop")
]


@pytest.mark.parametrize("flags, door", FAILURE_CASES)
def test_a_lost_host_ends_the_job_promptly_leaving_no_process_on_any_host(flags, door, hosts, tmp_path):
    marker = uuid.uuid4().hex
    proc = start_hanging_job(hosts, flags, tmp_path, marker, door)
    ranks = [pid for pid in marked(hosts, "h2", marker) if Path(f"/proc/{pid}/cmdline").read_bytes().count(JOB.encode())]
    start = time.monotonic()
    for pid in marked(hosts, "h2", marker):  # the host is lost: every process of the job on it dies at once
        os.kill(pid, signal.SIGKILL)
    code, elapsed, err = launcher_exit(proc, start, LOST_HOST_BOUND_S, "h2 was lost")
    assert ranks, "no rank was found on h2"
    assert code != 0
    assert elapsed < LOST_HOST_BOUND_S, f"the launcher took {elapsed:.1f} s to end after h2 was lost\n{err[-3000:]}"
    print(f"lost host: launcher ended after {elapsed:.1f} s (exit code {code})")
    for host in hosts.hosts:  # ssh sessions close within moments of the launcher's exit
        left = wait_until(lambda: not hosts.job_pids(host) and [True], 10, f"job processes left on {host}: {hosts.job_pids(host)}")
        assert left


@pytest.mark.parametrize("flags, door", FAILURE_CASES)
def test_a_partition_ends_the_launcher_and_the_cut_off_ranks_by_themselves(flags, door, hosts, tmp_path):
    marker = uuid.uuid4().hex
    proc = start_hanging_job(hosts, flags, tmp_path, marker, door)
    cut_off = marked(hosts, "h2", marker)
    start = time.monotonic()
    hosts.link("h2", up=False)  # no --timeout: only the failure-detection defaults end this
    code, elapsed, err = launcher_exit(proc, start, PARTITION_LAUNCHER_BOUND_S, "h2's link went down")
    assert code != 0
    assert elapsed < PARTITION_LAUNCHER_BOUND_S, f"the launcher took {elapsed:.1f} s to end after the cut\n{err[-3000:]}"
    # On h2 nothing can reach the ranks: their own bounds (Gloo's timeout, Open MPI's daemon, the
    # watchdog) must end them.
    remaining = PARTITION_RANKS_BOUND_S - (time.monotonic() - start)
    wait_until(lambda: not [pid for pid in cut_off if Path(f"/proc/{pid}").exists()], remaining,
               f"the ranks on the cut-off host h2 ending by themselves (alive: {marked(hosts, 'h2', marker)})", poll_s=1)  # fmt: skip
    print(f"partition: launcher ended after {elapsed:.1f} s, h2's ranks after {time.monotonic() - start:.1f} s")
