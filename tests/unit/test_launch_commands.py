"""The argument list each backend gets, compared as lists; and the checks `LaunchSettings` makes."""

import sys

import pytest

from hvdclip.errors import LauncherError
from hvdclip.launch import Host, LaunchSettings, build_command, default_backend, find_program

TRAIN = ("python", "train.py", "--note", "two words")
HOSTS = (Host("node1", 4), Host("node2", 4))
MPI_FIXED = ["-bind-to", "none", "-map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib"]


def settings(**overrides):
    return LaunchSettings(**{"num_proc": 2, "command": TRAIN, **overrides})


def test_horovodrun_minimal():
    assert build_command(settings(), {}) == ["horovodrun", "-np", "2", *TRAIN]


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
        "horovodrun", "-np", "8", "-H", "node1:4,node2:4", "--gloo",
        "--network-interfaces", "eth0,eth1", "--fusion-threshold-mb", "64", "--cycle-time-ms", "2.5",
        "--verbose", *TRAIN,
    ]  # fmt: skip


def test_horovodrun_mpi_controller():
    assert build_command(settings(controller="mpi"), {}) == ["horovodrun", "-np", "2", "--mpi", *TRAIN]


def test_mpirun_minimal_as_user_and_as_root():
    environ = {"PATH": "/usr/bin"}
    as_user = ["mpirun", "-np", "2", *MPI_FIXED, "-x", "PATH", *TRAIN]
    assert build_command(settings(backend="mpirun"), environ, as_root=False) == as_user
    as_root = ["mpirun", "-np", "2", *MPI_FIXED, "--allow-run-as-root", "-x", "PATH", *TRAIN]
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
    exports = build_command(job, environ)[len(MPI_FIXED) + 3 : -len(TRAIN)]
    assert exports == [
        "-x", "PATH", "-x", "PYTHONPATH",  # LD_LIBRARY_PATH is not set, so not exported
        "-x", "HOROVOD_LOG_LEVEL", "-x", "NCCL_DEBUG", "-x", "TF_CPP_MIN_LOG_LEVEL",
        "-x", "OMP_NUM_THREADS",
    ]  # fmt: skip


def test_mpirun_hosts_interfaces_and_tuning_values_override_the_environment():
    job = settings(
        backend="mpirun", num_proc=8, hosts=HOSTS, network_interfaces=("eth0",), fusion_threshold_mb=0, cycle_time_ms=5
    )
    environ = {"PATH": "/usr/bin", "HOROVOD_FUSION_THRESHOLD": "1"}
    assert build_command(job, environ) == [
        "mpirun", "-np", "8", "-H", "node1:4,node2:4", *MPI_FIXED, "-mca", "btl_tcp_if_include", "eth0",
        "-x", "PATH", "-x", "HOROVOD_FUSION_THRESHOLD=0", "-x", "HOROVOD_CYCLE_TIME=5",
        "-x", "NCCL_SOCKET_IFNAME=eth0", *TRAIN,
    ]  # fmt: skip


def test_srun_minimal_and_with_hosts_and_tuning():
    mca = ["OMPI_MCA_pml=ob1", "OMPI_MCA_btl=^openib"]
    fixed = ["--kill-on-bad-exit=1", "--cpu-bind=none"]
    assert build_command(settings(backend="srun"), {"SLURM_JOB_ID": "7"}) == [
        "srun", "--ntasks=2", "--mpi=pmix", *fixed, "env", *mca, *TRAIN,
    ]  # fmt: skip
    job = settings(backend="srun", hosts=HOSTS, network_interfaces=("ib0", "eth0"), fusion_threshold_mb=1, srun_mpi="pmi2")
    assert build_command(job, {}) == [
        "srun", "--ntasks=2", "--mpi=pmi2", "--nodelist=node1,node2", *fixed, "env", *mca,
        "HOROVOD_FUSION_THRESHOLD=1048576", "NCCL_SOCKET_IFNAME=ib0,eth0", "OMPI_MCA_btl_tcp_if_include=ib0,eth0",
        *TRAIN,
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
