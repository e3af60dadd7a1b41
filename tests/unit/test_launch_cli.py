"""`hvdclip-run` end to end with a fake executor: what runs, what is printed, which exit code comes back."""

import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hvdclip.launch import main

REPO = Path(__file__).resolve().parents[2]


class FakeExecutor:
    def __init__(self, exit_code=0):
        self.exit_code = exit_code
        self.calls = []

    def __call__(self, argv, env, timeout):
        self.calls.append((list(argv), dict(env), timeout))
        return self.exit_code


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """A PATH holding stand-ins for the three launchers, and no Python venv beside it."""
    for name in ("horovodrun", "mpirun", "srun"):
        program = tmp_path / name
        program.write_text("#!/bin/sh\nexit 99\n")
        program.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here" / "python"))
    return tmp_path


# What hvdclip-run puts before the user's command: horovodrun through hvdclip's entry point with the
# default bounds, and each rank's set-up.
# The interpreter is hvdclip-run's own, read when the command is built (fixtures replace it).
def horovodrun():
    return [
        sys.executable, "-m", "hvdclip.launch.horovodrun",
        "--ssh-option", "ServerAliveInterval=5", "--ssh-option", "ServerAliveCountMax=3",
        "--env", "HOROVOD_GLOO_TIMEOUT_SECONDS=30", "--env", "HVDCLIP_STEP_TIMEOUT=60",
    ]  # fmt: skip


def rank():
    return [sys.executable, "-m", "hvdclip.launch.rank", "--"]


MPI_ARGS = ["--mpi-args", "-mca oob_tcp_keepalive_time 5 -mca oob_tcp_keepalive_intvl 2 -mca oob_tcp_keepalive_probes 3"]


def user_command(argv):
    return argv[argv.index("hvdclip.launch.rank") + 2 :]


def run(argv, environ, executor=None):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, environ=environ, executor=executor or FakeExecutor(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_runs_the_built_command_and_returns_the_jobs_exit_code(bin_dir):
    executor = FakeExecutor(exit_code=7)
    environ = {"PATH": str(bin_dir), "NCCL_DEBUG": "INFO"}
    code, out, err = run(["-np", "2", "--timeout", "30", "--", "python", "train.py"], environ, executor)
    assert (code, out, err) == (7, "", "")
    assert executor.calls == [([*horovodrun(), "-np", "2", *MPI_ARGS, *rank(), "python", "train.py"], environ, 30.0)]


def test_dry_run_prints_the_exact_command_and_runs_nothing(bin_dir):
    executor = FakeExecutor()
    argv = ["-np", "2", "--backend", "mpirun", "--dry-run", "--", "python", "train.py", "--name", "two words"]
    code, out, err = run(argv, {"PATH": str(bin_dir)}, executor)
    assert (code, err, executor.calls) == (0, "", [])
    assert shlex.split(out) == [
        f"{bin_dir}/mpirun", "-np", "2", "-bind-to", "none", "-map-by", "slot", "-mca", "pml", "ob1",
        "-mca", "btl", "^openib", *MPI_ARGS[1].split(),
        "-mca", "plm_rsh_args", "-o ServerAliveInterval=5 -o ServerAliveCountMax=3",
        *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "-x", "PATH",
        "-x", "HOROVOD_GLOO_TIMEOUT_SECONDS=30", "-x", "HVDCLIP_STEP_TIMEOUT=60",
        *rank(), "python", "train.py", "--name", "two words",
    ]  # fmt: skip


def test_command_may_follow_without_separator_and_keeps_its_own_separator(bin_dir):
    executor = FakeExecutor()
    environ = {"PATH": str(bin_dir)}
    run(["-np", "2", "python", "train.py", "-np", "3"], environ, executor)
    run(["-np", "2", "--", "python", "train.py", "--", "extra"], environ, executor)
    commands = [user_command(call[0]) for call in executor.calls]
    assert commands == [["python", "train.py", "-np", "3"], ["python", "train.py", "--", "extra"]]


def test_srun_is_the_default_inside_a_slurm_allocation(bin_dir):
    executor = FakeExecutor()
    run(["-np", "4", "--", "python", "train.py"], {"PATH": str(bin_dir), "SLURM_JOB_ID": "12"}, executor)
    assert executor.calls[0][0][:2] == [f"{bin_dir}/srun", "--ntasks=4"]


def test_hostfile_in_horovod_form_reaches_mpirun_as_a_host_list(bin_dir, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1:2\nnode2 slots=2\n")
    executor = FakeExecutor()
    run(["-np", "4", "--backend", "mpirun", "--hostfile", str(hostfile), "--", "python", "t.py"], {"PATH": str(bin_dir)}, executor)
    assert executor.calls[0][0][1:5] == ["-np", "4", "-H", "node1:2,node2:2"]


def test_comma_separated_and_repeated_interfaces_are_one_list(bin_dir):
    executor = FakeExecutor()
    argv = ["-np", "2", "--network-interface", "eth0,eth1", "--network-interface", "ib0", "--", "python", "t.py"]
    run(argv, {"PATH": str(bin_dir)}, executor)
    argv = executor.calls[0][0]
    assert argv[argv.index("--network-interfaces") + 1] == "eth0,eth1,ib0"


def test_verbose_prints_the_command_before_running(bin_dir):
    code, out, err = run(["-np", "2", "--verbose", "--", "python", "t.py"], {"PATH": str(bin_dir)})
    argv = [*horovodrun(), "-np", "2", *MPI_ARGS, "--verbose", sys.executable, "-m", "hvdclip.launch.rank", "--verbose", "--", "python", "t.py"]
    assert err == f"hvdclip-run: {shlex.join(argv)}\n"


def test_dry_run_works_without_the_launcher_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    code, out, err = run(["-np", "2", "--backend", "srun", "--dry-run", "--", "python", "t.py"], {"PATH": str(tmp_path)})
    assert (code, err) == (0, "")
    assert shlex.split(out)[:2] == ["srun", "--ntasks=2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-np", "0", "--", "python"], "`-np` must be an integer >= 1. Received: -np=0"),
        (["-np", "two", "--", "python"], "`-np` must be an integer >= 1. Received: -np=two"),
        (["-np", "2", "--"], "A command to run must follow `--`, e.g. `hvdclip-run -np 2 -- python train.py`. Received: command=[]"),
        (["-np", "2"], "A command to run must follow `--`, e.g. `hvdclip-run -np 2 -- python train.py`. Received: command=[]"),
        (["-np", "3", "-H", "a:1,b:1", "--", "python"], "`-np` must be at most the 2 slots of the host list (a:1,b:1). Received: -np=3"),
        (["-np", "2", "-H", "a:1,b", "--", "python"], "`-H` entries must be `host:N` with N >= 1. Received: -H=a:1,b (entry 'b')"),
        (["-np", "2", "--backend", "mpirun", "--gloo", "--", "python"], "`--gloo` needs `--backend horovodrun`. Received: --gloo with --backend=mpirun"),
        (["-np", "2", "--timeout", "0", "--", "python"], "`--timeout` must be a number of seconds > 0. Received: --timeout=0"),
        (["-np", "2", "--fusion-threshold-mb", "1.5", "--", "python"], "`--fusion-threshold-mb` must be an integer >= 0. Received: --fusion-threshold-mb=1.5"),
        (["-np", "2", "--env", "NOT_SET", "--", "python"], "`--env` must name a variable that is set in this environment. Received: --env=NOT_SET"),
        (["-np", "2", "--backend", "pbs", "--", "python"], "argument --backend: invalid choice: 'pbs' (choose from 'horovodrun', 'mpirun', 'srun')"),
        (["-np", "2", "--bogus", "--", "python"], "unrecognized arguments: --bogus"),
        (["--", "python"], "the following arguments are required: -np/--num-proc"),
        (["-np", "2", "-H", "a:1", "--hostfile", "f", "--", "python"], "argument --hostfile: not allowed with argument -H/--hosts"),
    ],
)
def test_bad_arguments_are_one_line_errors_with_exit_code_2(argv, message, bin_dir):
    executor = FakeExecutor()
    code, out, err = run(argv, {"PATH": str(bin_dir)}, executor)
    assert (code, out, err, executor.calls) == (2, "", f"hvdclip-run: error: {message}\n", [])


def test_missing_launcher_is_an_environment_error_with_exit_code_2(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    executor = FakeExecutor()
    code, out, err = run(["-np", "2", "--backend", "mpirun", "--", "python"], {"PATH": str(tmp_path)}, executor)
    assert (code, executor.calls) == (2, [])
    assert err.startswith("hvdclip-run: error: `mpirun` was not found on PATH: install Open MPI")
    assert err.count("\n") == 1


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "hvdclip.launch"], [str(Path(sys.executable).parent / "hvdclip-run")]])
def test_module_and_console_script_are_the_same_program(entry):
    result = subprocess.run([*entry, "-np", "2", "--dry-run", "--", "python", "t.py"], capture_output=True, text=True, cwd=REPO)
    assert (result.returncode, result.stderr) == (0, "")
    ours, *plan = result.stdout.splitlines()
    assert shlex.split(ours) == [*horovodrun(), "-np", "2", *MPI_ARGS, *rank(), "python", "t.py"]
    # Then what horovodrun would run (tests/unit/test_launch_horovodrun.py): one host, so no ssh.
    assert plan[0] == "# horovodrun starts the ranks with:" and len(plan) == 2, plan
    assert plan[1].startswith("mpirun ") and plan[1].endswith(shlex.join([*rank()[1:], "python", "t.py"])), plan


def test_importing_the_launcher_loads_neither_tensorflow_nor_horovod():
    # A login node may have neither; `hvdclip-run` must start there and start fast everywhere.
    probe = "import sys, hvdclip.launch; print('tensorflow' in sys.modules, 'horovod' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_cluster_options_and_overridden_bounds_reach_mpirun(bin_dir):
    argv = [
        "-np", "4", "-H", "h1:2,h2:2", "--backend", "mpirun", "--network-interface", "eth0",
        "--ssh-port", "2222", "--ssh-identity-file", "/k/id", "--ssh-option", "UserKnownHostsFile=/k/known",
        "--ssh-option", "ServerAliveInterval=1", "--mca", "oob_tcp_keepalive_time=2",
        "--gloo-timeout", "9", "--step-timeout", "off", "--dry-run", "--", "python", "t.py",
    ]  # fmt: skip
    code, out, err = run(argv, {"PATH": str(bin_dir)})
    assert (code, err) == (0, "")
    words = shlex.split(out)
    mca = {words[i + 1]: words[i + 2] for i, word in enumerate(words) if word == "-mca"}
    assert mca == {
        "pml": "ob1", "btl": "^openib", "btl_tcp_if_include": "eth0", "oob_tcp_if_include": "eth0",
        "oob_tcp_keepalive_time": "2", "oob_tcp_keepalive_intvl": "2", "oob_tcp_keepalive_probes": "3",
        "plm_rsh_args": "-p 2222 -i /k/id -o ServerAliveInterval=1 -o ServerAliveCountMax=3 -o UserKnownHostsFile=/k/known",
    }  # fmt: skip
    exports = [words[i + 1] for i, word in enumerate(words) if word == "-x"]
    assert exports[-4:] == ["NCCL_SOCKET_IFNAME=eth0", "HOROVOD_GLOO_IFACE=eth0", "HOROVOD_GLOO_TIMEOUT_SECONDS=9", "HVDCLIP_STEP_TIMEOUT=off"]


def test_cluster_options_reach_horovodrun(bin_dir):
    argv = [
        "-np", "4", "-H", "h1:2,h2:2", "--gloo", "--network-interface", "eth0", "--ssh-port", "2222",
        "--ssh-identity-file", "/k/id", "--ssh-option", "UserKnownHostsFile=/k/known", "--step-timeout", "90",
        "--dry-run", "--", "python", "t.py",
    ]  # fmt: skip
    code, out, err = run(argv, {"PATH": str(bin_dir)})
    ours, plan = out.splitlines()
    # The fixture's interpreter does not exist, so horovodrun's own commands cannot be shown.
    assert plan == f"# horovodrun's own commands cannot be shown: {sys.executable}: No such file or directory"
    assert shlex.split(ours) == [
        sys.executable, "-m", "hvdclip.launch.horovodrun",
        "--ssh-option", "ServerAliveInterval=5", "--ssh-option", "ServerAliveCountMax=3",
        "--ssh-option", "UserKnownHostsFile=/k/known",
        "--env", "HOROVOD_GLOO_TIMEOUT_SECONDS=30", "--env", "HVDCLIP_STEP_TIMEOUT=90",
        "-np", "4", "-H", "h1:2,h2:2", "--gloo", "--ssh-port", "2222", "--ssh-identity-file", "/k/id",
        "--network-interfaces", "eth0", *rank(), "python", "t.py",
    ]  # fmt: skip


def test_horovodrun_backend_without_horovod_says_what_to_install(bin_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "horovod" else real(name, *a))
    executor = FakeExecutor()
    code, out, err = run(["-np", "2", "--", "python", "t.py"], {"PATH": str(bin_dir)}, executor)
    assert (code, executor.calls) == (2, [])
    assert err.startswith("hvdclip-run: error: Horovod is not installed in ") and "--backend mpirun" in err


@pytest.fixture
def discovery_script(tmp_path):
    path = tmp_path / "discover_hosts.sh"
    path.write_text("#!/bin/sh\necho localhost:2\n")
    path.chmod(0o755)
    return path


def test_elastic_dry_run_prints_horovodrun_with_its_elastic_flags(bin_dir, discovery_script, monkeypatch):
    # A relative script path is made absolute: horovodrun's shell would look a bare name up on PATH.
    monkeypatch.chdir(discovery_script.parent)
    argv = [
        "--elastic", "--min-np", "2", "--max-np", "4", "--host-discovery-script", "discover_hosts.sh",
        "--slots-per-host", "2", "--elastic-timeout", "120", "--reset-limit", "3", "--network-interface", "lo",
        "--dry-run", "--", "python", "train.py",
    ]  # fmt: skip
    code, out, err = run(argv, {"PATH": str(bin_dir)})
    assert (code, err) == (0, "")
    assert shlex.split(out.splitlines()[0]) == [
        *horovodrun(), "-np", "2", "--gloo", "--min-np", "2", "--max-np", "4",
        "--host-discovery-script", str(discovery_script), "--slots-per-host", "2", "--elastic-timeout", "120",
        "--reset-limit", "3", "--network-interfaces", "lo", *rank(), "python", "train.py",
    ]  # fmt: skip


def test_elastic_starts_with_np_when_given_and_uses_horovodrun_inside_a_slurm_allocation(bin_dir, discovery_script):
    executor = FakeExecutor()
    environ = {"PATH": str(bin_dir), "SLURM_JOB_ID": "12"}
    argv = ["--elastic", "-np", "3", "--min-np", "2", "--max-np", "4", "--host-discovery-script", str(discovery_script)]
    code, out, err = run([*argv, "--", "python", "train.py"], environ, executor)
    assert (code, out, err) == (0, "", "")
    assert executor.calls[0][0][: len(horovodrun()) + 9] == [
        *horovodrun(), "-np", "3", "--gloo", "--min-np", "2", "--max-np", "4", "--host-discovery-script", str(discovery_script),
    ]  # fmt: skip
    assert executor.calls[0][0][len(horovodrun()) + 9 : len(horovodrun()) + 11] == ["--elastic-timeout", "600"]


def test_horovodruns_plan_is_bounded_and_says_why_it_cannot_be_shown():
    from hvdclip.launch.cli import _horovodrun_plan

    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert _horovodrun_plan(slow, dict(os.environ), timeout_s=0.5) == (
        "# horovodrun's own commands cannot be shown: its dry run took longer than the 0.5 s bound\n"
    )
    failing = [sys.executable, "-c", "import sys; sys.exit('no Horovod here')"]
    assert _horovodrun_plan(failing, dict(os.environ)) == "# horovodrun's own commands cannot be shown: no Horovod here\n"
