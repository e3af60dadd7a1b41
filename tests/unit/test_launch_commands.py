"""The argument list each backend gets, compared as lists; and the checks `LaunchSettings` makes."""

import shlex
import sys

import pytest

from hvdclip.errors import LauncherError
from hvdclip.launch import Host, LaunchSettings, build_command, default_backend, find_program

TRAIN = ("python", "train.py", "--note", "two words")
HOSTS = (Host("node1", 4), Host("node2", 4))
KEEPALIVE = ["-mca", "oob_tcp_keepalive_time", "5", "-mca", "oob_tcp_keepalive_intvl", "2", "-mca", "oob_tcp_keepalive_probes", "3"]
SSH_DEFAULTS = "-o ServerAliveInterval=5 -o ServerAliveCountMax=3"
MPI_FIXED = [
    "-bind-to", "none", "-map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib", *KEEPALIVE,
    "-mca", "plm_rsh_args", SSH_DEFAULTS,
]  # fmt: skip
# Every rank's command starts with hvdclip's set-up (thread limits, quiet start-up).
RANK = ["python", "-m", "hvdclip.launch.rank", "--"]
# The ranks' own bounds, set by every backend.
BOUNDS = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "30", "HVDCLIP_STEP_TIMEOUT": "60"}
HOROVODRUN = [
    "python", "-m", "hvdclip.launch.horovodrun",
    "--ssh-option", "ServerAliveInterval=5", "--ssh-option", "ServerAliveCountMax=3",
    "--env", "HOROVOD_GLOO_TIMEOUT_SECONDS=30", "--env", "HVDCLIP_STEP_TIMEOUT=60",
]  # fmt: skip
MPI_ARGS = ["--mpi-args", " ".join(KEEPALIVE)]


def settings(**overrides):
    return LaunchSettings(**{"num_proc": 2, "command": TRAIN, **overrides})


def test_horovodrun_minimal():
    assert build_command(settings(), {}) == [*HOROVODRUN, "-np", "2", *MPI_ARGS, *RANK, *TRAIN]


def test_horovodrun_passes_every_option_through():
    job = settings(
        num_proc=8,
        hosts=HOSTS,
        controller="gloo",
        network_interfaces=("eth0", "eth1"),
        fusion_threshold_mb=64,
        cycle_time_ms=2.5,
        verbose=True,
    )
    assert build_command(job, {"NCCL_DEBUG": "INFO"}, as_root=True) == [
        *HOROVODRUN, "-np", "8", "-H", "node1:4,node2:4", "--gloo",
        "--network-interfaces", "eth0,eth1", "--fusion-threshold-mb", "64", "--cycle-time-ms", "2.5",
        "--verbose", "python", "-m", "hvdclip.launch.rank", "--verbose", "--", *TRAIN,
    ]  # fmt: skip


def test_horovodrun_mpi_controller():
    assert build_command(settings(controller="mpi"), {}) == [*HOROVODRUN, "-np", "2", "--mpi", *MPI_ARGS, *RANK, *TRAIN]


def test_horovodrun_ssh_and_failure_detection_options():
    job = settings(
        controller="mpi", hosts=HOSTS, ssh_port=2222, ssh_identity_file="/keys/id", network_interfaces=("eth1",),
        ssh_options=("UserKnownHostsFile=/keys/known", "ServerAliveInterval=1"), mca=("oob_tcp_keepalive_time=9",),
        gloo_timeout_s=7, step_timeout_s=None,
    )  # fmt: skip
    assert build_command(job, {}, python="/venv/bin/python") == [
        "/venv/bin/python", "-m", "hvdclip.launch.horovodrun",
        "--ssh-option", "ServerAliveInterval=1", "--ssh-option", "ServerAliveCountMax=3",
        "--ssh-option", "UserKnownHostsFile=/keys/known",
        "--env", "HOROVOD_GLOO_TIMEOUT_SECONDS=7", "--env", "HVDCLIP_STEP_TIMEOUT=off",
        "-np", "2", "-H", "node1:4,node2:4", "--mpi", "--ssh-port", "2222", "--ssh-identity-file", "/keys/id",
        "--network-interfaces", "eth1",
        "--mpi-args", "-mca oob_tcp_if_include eth1 -mca oob_tcp_keepalive_time 9 -mca oob_tcp_keepalive_intvl 2 "
        "-mca oob_tcp_keepalive_probes 3",
        "/venv/bin/python", "-m", "hvdclip.launch.rank", "--", *TRAIN,
    ]  # fmt: skip


def test_mpirun_minimal_as_user_and_as_root():
    environ = {"PATH": "/usr/bin"}
    bounds = ["-x", "HOROVOD_GLOO_TIMEOUT_SECONDS=30", "-x", "HVDCLIP_STEP_TIMEOUT=60"]
    as_user = ["mpirun", "-np", "2", *MPI_FIXED, "-x", "PATH", *bounds, *RANK, *TRAIN]
    assert build_command(settings(backend="mpirun"), environ, as_root=False) == as_user
    as_root = ["mpirun", "-np", "2", *MPI_FIXED, "--allow-run-as-root", "-x", "PATH", *bounds, *RANK, *TRAIN]
    assert build_command(settings(backend="mpirun"), environ, as_root=True) == as_root


def test_mpirun_exports_paths_prefixed_variables_and_env_names_that_are_set():
    environ = {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": "/repo",
        "HOME": "/root",
        "NCCL_DEBUG": "INFO",
        "PATH": "/usr/bin",
        "HOROVOD_LOG_LEVEL": "debug",
        "OMP_NUM_THREADS": "1",
        "MY_TF_THING": "not a TF_ prefix",
    }
    job = settings(backend="mpirun", env=("OMP_NUM_THREADS", "NCCL_DEBUG"))
    exports = build_command(job, environ)[len(MPI_FIXED) + 3 : -len(RANK + list(TRAIN))]
    assert exports == [
        "-x", "PATH", "-x", "PYTHONPATH",  # LD_LIBRARY_PATH is not set, so not exported
        "-x", "HOROVOD_LOG_LEVEL", "-x", "NCCL_DEBUG", "-x", "TF_CPP_MIN_LOG_LEVEL",
        "-x", "OMP_NUM_THREADS", "-x", "HOROVOD_GLOO_TIMEOUT_SECONDS=30", "-x", "HVDCLIP_STEP_TIMEOUT=60",
    ]  # fmt: skip


def test_mpirun_hosts_interfaces_and_tuning_values_override_the_environment():
    job = settings(
        backend="mpirun", num_proc=8, hosts=HOSTS, network_interfaces=("eth0",), fusion_threshold_mb=0, cycle_time_ms=5
    )
    environ = {"PATH": "/usr/bin", "HOROVOD_FUSION_THRESHOLD": "1", "HVDCLIP_STEP_TIMEOUT": "5"}
    assert build_command(job, environ) == [
        "mpirun", "-np", "8", "-H", "node1:4,node2:4", *MPI_FIXED[:10],
        "-mca", "btl_tcp_if_include", "eth0", "-mca", "oob_tcp_if_include", "eth0", *MPI_FIXED[10:],
        "-x", "PATH", "-x", "HOROVOD_FUSION_THRESHOLD=0", "-x", "HOROVOD_CYCLE_TIME=5",
        "-x", "NCCL_SOCKET_IFNAME=eth0", "-x", "HOROVOD_GLOO_IFACE=eth0",
        "-x", "HOROVOD_GLOO_TIMEOUT_SECONDS=30", "-x", "HVDCLIP_STEP_TIMEOUT=60", *RANK, *TRAIN,
    ]  # fmt: skip


def test_mpirun_ssh_options_go_into_plm_rsh_args_and_mca_overrides_the_defaults():
    job = settings(
        backend="mpirun", ssh_port=2222, ssh_identity_file="/keys/id",
        ssh_options=("UserKnownHostsFile=/keys/known", "ServerAliveCountMax=6"),
        mca=("oob_tcp_keepalive_probes=9", "btl_tcp_links=2"), step_timeout_s=12.5, gloo_timeout_s=99,
    )  # fmt: skip
    argv = build_command(job, {})
    assert argv[:28] == [
        "mpirun", "-np", "2", *MPI_FIXED[:10],
        "-mca", "oob_tcp_keepalive_time", "5", "-mca", "oob_tcp_keepalive_intvl", "2",
        "-mca", "oob_tcp_keepalive_probes", "9", "-mca", "btl_tcp_links", "2",
        "-mca", "plm_rsh_args",
        "-p 2222 -i /keys/id -o ServerAliveInterval=5 -o ServerAliveCountMax=6 -o UserKnownHostsFile=/keys/known",
    ]  # fmt: skip
    assert argv[28:32] == ["-x", "HOROVOD_GLOO_TIMEOUT_SECONDS=99", "-x", "HVDCLIP_STEP_TIMEOUT=12.5"]


def test_mpirun_keeps_the_plm_rsh_args_of_the_environment_after_its_own():
    # The Kubeflow MPI Operator sets OMPI_MCA_plm_rsh_args; mpirun's -mca plm_rsh_args replaces it.
    argv = build_command(settings(backend="mpirun", ssh_port=2222), {"OMPI_MCA_plm_rsh_args": " -o ConnectionAttempts=10 "})
    assert argv[argv.index("plm_rsh_args") + 1] == f"-p 2222 {SSH_DEFAULTS} -o ConnectionAttempts=10"


def test_horovodrun_mca_values_are_quoted_for_the_shell_horovodrun_pastes_them_into():
    argv = build_command(settings(mca=("orte_tmpdir_base=/tmp/a;b*c'd",)), {})
    mpi_args = argv[argv.index("--mpi-args") + 1]
    assert shlex.split(mpi_args) == [*KEEPALIVE, "-mca", "orte_tmpdir_base", "/tmp/a;b*c'd"]


def test_srun_minimal_and_with_hosts_and_tuning():
    mca = ["OMPI_MCA_pml=ob1", "OMPI_MCA_btl=^openib"]
    fixed = ["--kill-on-bad-exit=1", "--cpu-bind=none"]
    bounds = [f"{name}={value}" for name, value in BOUNDS.items()]
    assert build_command(settings(backend="srun"), {"SLURM_JOB_ID": "7"}) == [
        "srun", "--ntasks=2", "--mpi=pmix", *fixed, "env", *mca, *bounds, *RANK, *TRAIN,
    ]  # fmt: skip
    job = settings(backend="srun", hosts=HOSTS, network_interfaces=("ib0", "eth0"), fusion_threshold_mb=1, srun_mpi="pmi2")
    assert build_command(job, {}) == [
        "srun", "--ntasks=2", "--mpi=pmi2", "--nodelist=node1,node2", *fixed, "env", *mca,
        "HOROVOD_FUSION_THRESHOLD=1048576", "NCCL_SOCKET_IFNAME=ib0,eth0", "HOROVOD_GLOO_IFACE=ib0", *bounds,
        "OMPI_MCA_btl_tcp_if_include=ib0,eth0", "OMPI_MCA_oob_tcp_if_include=ib0,eth0", *RANK, *TRAIN,
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["horovodrun", "mpirun", "srun"])
def test_env_name_must_be_set(backend):
    with pytest.raises(ValueError, match=r"^`--env` must name a variable that is set in this environment\. Received: --env=NOPE$"):
        build_command(settings(backend=backend, env=("NOPE",)), {"PATH": "/bin"})


@pytest.mark.parametrize(
    "environ, backend",
    [({}, "horovodrun"), ({"SLURM_JOB_ID": ""}, "horovodrun"), ({"SLURM_JOB_ID": "42"}, "srun")],
)
def test_default_backend_is_srun_only_inside_an_allocation(environ, backend):
    assert default_backend(environ) == backend


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"num_proc": 0}, ValueError, r"`-np` must be an integer >= 1\. Received: -np=0"),
        ({"num_proc": True}, TypeError, r"`-np` must be an integer >= 1\. Received: -np=True"),
        ({"num_proc": "2"}, TypeError, r"`-np` must be an integer >= 1\. Received: -np='2'"),
        ({"command": ()}, ValueError, r"A command to run must follow `--`.*Received: command=\[\]"),
        ({"backend": "jsrun"}, ValueError, r"`--backend` must be one of horovodrun, mpirun, srun\. Received: --backend=jsrun"),
        ({"backend": "srun", "controller": "gloo"}, ValueError, r"`--gloo` needs `--backend horovodrun`\. Received: --gloo with --backend=srun"),
        ({"num_proc": 9, "hosts": HOSTS}, ValueError, r"`-np` must be at most the 8 slots of the host list \(node1:4,node2:4\)\. Received: -np=9"),
        ({"env": ("A=1",)}, ValueError, r"`--env` takes a variable name such as NCCL_DEBUG\. Received: --env=A=1"),
        ({"fusion_threshold_mb": -1}, ValueError, r"`--fusion-threshold-mb` must be an integer >= 0\. Received: --fusion-threshold-mb=-1"),
        ({"cycle_time_ms": -1.0}, ValueError, r"`--cycle-time-ms` must be a number >= 0\. Received: --cycle-time-ms=-1.0"),
        ({"ssh_port": 0}, ValueError, r"`--ssh-port` must be an integer >= 1 and <= 65535\. Received: --ssh-port=0"),
        ({"ssh_identity_file": "/my keys/id"}, ValueError, r"`--ssh-identity-file` must be a path without whitespace\. Received: --ssh-identity-file='/my keys/id'"),
        ({"ssh_options": ("ServerAliveInterval 5",)}, ValueError, r"`--ssh-option` takes KEY=VALUE without spaces, such as ServerAliveInterval=5\. Received: --ssh-option='ServerAliveInterval 5'"),
        ({"mca": ("btl=a b",)}, ValueError, r"`--mca` takes KEY=VALUE without spaces, such as btl_tcp_links=2\. Received: --mca='btl=a b'"),
        ({"gloo_timeout_s": 0}, ValueError, r"`--gloo-timeout` must be an integer >= 1\. Received: --gloo-timeout=0"),
        ({"step_timeout_s": 0.0}, ValueError, r"`--step-timeout` must be a number > 0\. Received: --step-timeout=0.0"),
    ],
)
def test_settings_refuse_bad_values(overrides, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        settings(**overrides)


def test_settings_are_frozen():
    job = settings()
    with pytest.raises(AttributeError):
        job.num_proc = 4


def test_find_program_searches_path_then_beside_python(tmp_path, monkeypatch):
    on_path = tmp_path / "bin" / "mpirun"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert find_program("mpirun", {"PATH": str(on_path.parent)}) == str(on_path)
    beside = tmp_path / "venv" / "horovodrun"
    beside.parent.mkdir()
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(beside.parent / "python"))
    assert find_program("horovodrun", {"PATH": str(on_path.parent)}) == str(beside)


@pytest.mark.parametrize(
    "program, hint",
    [("horovodrun", "install Horovod"), ("mpirun", "apt-get install openmpi-bin"), ("srun", "apt-get install slurm-client")],
)
def test_missing_program_says_what_to_install(program, hint, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(LauncherError, match=rf"^`{program}` was not found on PATH: .*{hint}"):
        find_program(program, {"PATH": str(tmp_path)})


# ------------------------------------------------------------------------------------ elastic


@pytest.fixture
def script(tmp_path):
    """An executable discovery script (its contents do not matter to the builder)."""
    path = tmp_path / "discover_hosts.sh"
    path.write_text("#!/bin/sh\necho localhost:2\n")
    path.chmod(0o755)
    return str(path)


def elastic(script, **overrides):
    return settings(**{"elastic": True, "min_num_proc": 2, "max_num_proc": 4, "host_discovery_script": script, **overrides})


def test_horovodrun_elastic_minimal_implies_gloo_and_bounds_the_wait_for_hosts(script):
    # No --mpi-args: Gloo runs no mpirun. --elastic-timeout is horovodrun's default, given so it is seen.
    assert build_command(elastic(script), {}) == [
        *HOROVODRUN, "-np", "2", "--gloo", "--min-np", "2", "--max-np", "4", "--host-discovery-script", script,
        "--elastic-timeout", "600", *RANK, *TRAIN,
    ]  # fmt: skip


def test_horovodrun_elastic_passes_every_option_and_keeps_the_failure_defaults(script):
    job = elastic(
        script, num_proc=3, controller="gloo", slots_per_host=2, elastic_timeout_s=60, reset_limit=0,
        network_interfaces=("lo",), ssh_options=("ConnectTimeout=10",), gloo_timeout_s=45, verbose=True,
    )  # fmt: skip
    assert build_command(job, {}) == [
        "python", "-m", "hvdclip.launch.horovodrun",
        "--ssh-option", "ServerAliveInterval=5", "--ssh-option", "ServerAliveCountMax=3", "--ssh-option", "ConnectTimeout=10",
        "--env", "HOROVOD_GLOO_TIMEOUT_SECONDS=45", "--env", "HVDCLIP_STEP_TIMEOUT=60",
        "-np", "3", "--gloo", "--min-np", "2", "--max-np", "4", "--host-discovery-script", script,
        "--slots-per-host", "2", "--elastic-timeout", "60", "--reset-limit", "0", "--network-interfaces", "lo",
        "--verbose", "python", "-m", "hvdclip.launch.rank", "--verbose", "--", *TRAIN,
    ]  # fmt: skip


def test_discovery_script_path_is_quoted_for_the_shell_horovodrun_runs_it_in(tmp_path):
    path = tmp_path / "my jobs" / "discover.sh"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\necho localhost:2\n")
    path.chmod(0o755)
    argv = build_command(elastic(str(path)), {})
    assert argv[argv.index("--host-discovery-script") + 1] == f"'{path}'"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"backend": "mpirun"}, r"`--elastic` needs `--backend horovodrun` \(elastic jobs run on horovodrun's Gloo driver\)\. Received: --elastic with --backend=mpirun"),
        ({"backend": "srun"}, r"`--elastic` needs `--backend horovodrun` .*Received: --elastic with --backend=srun"),
        ({"controller": "mpi"}, r"`--elastic` runs on Gloo, not MPI: drop `--mpi` \(`--elastic` implies `--gloo`\)\. Received: --elastic with --mpi"),
        ({"hosts": HOSTS}, r"`-H`/`--hostfile` cannot be used with `--elastic`, .*list the hosts in the discovery script instead, "
         r"one `host:slots` per line\. Received: hosts node1:4,node2:4 with --elastic"),
        ({"min_num_proc": None}, r"`--elastic` needs `--min-np`, e\.g\. `hvdclip-run --elastic --min-np 2 .*`\. Received: --elastic without --min-np"),
        ({"max_num_proc": None}, r"`--elastic` needs `--max-np`, .*Received: --elastic without --max-np"),
        ({"host_discovery_script": None}, r"`--elastic` needs `--host-discovery-script`, .*Received: --elastic without --host-discovery-script"),
        ({"min_num_proc": 3, "max_num_proc": 2}, r"`--max-np` must be >= `--min-np` \(3\)\. Received: --max-np=2"),
        ({"num_proc": 1}, r"`-np` of an elastic job is the number of ranks to start with: between `--min-np` \(2\) and `--max-np` \(4\), "
         r"or left out to start with --min-np\. Received: -np=1"),
        ({"num_proc": 5}, r"`-np` of an elastic job .*Received: -np=5"),
        ({"elastic": False}, r"`--min-np` is for elastic jobs: add `--elastic`, or drop `--min-np`\. Received: --min-np=2 without --elastic"),
    ],
)  # fmt: skip
def test_elastic_settings_refuse_what_does_not_fit_together(overrides, message, script):
    with pytest.raises(ValueError, match=f"^{message}$"):
        elastic(script, **overrides)


@pytest.mark.parametrize(
    "field, value, flag",
    [("slots_per_host", 2, "--slots-per-host"), ("elastic_timeout_s", 30, "--elastic-timeout"), ("reset_limit", 0, "--reset-limit")],
)
def test_elastic_only_settings_are_refused_without_elastic(field, value, flag):
    with pytest.raises(ValueError, match=rf"^`{flag}` is for elastic jobs: add `--elastic`, or drop `{flag}`\. Received: {flag}={value} without --elastic$"):
        settings(**{field: value})


def test_discovery_script_must_exist_and_be_executable(tmp_path):
    missing = str(tmp_path / "nope.sh")
    with pytest.raises(ValueError, match=rf"^`--host-discovery-script` must be the path of an existing file\. Received: --host-discovery-script={missing} \(no such file\)$"):
        elastic(missing)
    plain = tmp_path / "discover.sh"
    plain.write_text("#!/bin/sh\necho localhost:2\n")
    with pytest.raises(ValueError, match=rf"^`--host-discovery-script` must be executable: run `chmod \+x {plain}`\. Received: .*\(not executable\)$"):
        elastic(str(plain))
