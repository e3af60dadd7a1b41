"""launch/kubernetes/mpijob-gpu.yaml's launcher and worker commands, read from the YAML, run in the CPU
image with podman as the Kubeflow MPI Operator would run them: a launcher and two workers on a network
of the test's own, with what the operator adds to its pods made here in the same way.

What the operator adds (pkg/controller/mpi_job_controller.go, v0.8): the job's ssh key pair, an ECDSA
P-521 key in PEM, mounted read-only at `sshAuthMountPath` as id_rsa, id_rsa.pub and authorized_keys
(a Secret volume: root's files, mode 0644, in a world-writable directory); the hostfile `/etc/mpi/hostfile` on the launcher; the launcher's Open MPI
variables (kubernetes_support.operator_launcher_env); each pod's host name NAME-worker-I and the DNS
name NAME-worker-I.NAME.NAMESPACE.svc. The pods' `securityContext` user, `args` (the image's
entrypoint kept) and memory-backed `emptyDir` volumes are applied as Kubernetes would; the workers'
readiness probe (a TCP connection to sshd's port) is made before the launcher starts, as
`launcherCreationPolicy: WaitForWorkersReady` does.

What differs, and why: the CPU image instead of the GPU image, with no GPU; one slot per worker
instead of slotsPerWorker, so the launcher's `-np` (checked first to equal replicas x slotsPerWorker)
becomes replicas x 1; resource limits are not applied.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from image_support import podman
from kubernetes_support import (
    OPERATOR_HOSTFILE, OPERATOR_KEY_FILES, container_argv, load, main_container, operator_hostfile,
    operator_launcher_env, pod_spec,
)  # fmt: skip

NAMESPACE = "default"
SLOTS = 1  # CPU containers on a 2-core machine: one rank per worker
READY_BOUND_S = 60
JOB_BOUND_S = 600


@pytest.fixture
def operator_files(image):
    """The job's ssh key files as the operator's Secret volume presents them, and a directory for its
    hostfile. The kubelet's layout: a world-writable (1777) directory of symlinks into `..data`,
    which points at a directory holding root's files with the Secret's default mode, 0644."""
    keys = Path(tempfile.mkdtemp(prefix="hvdclip-mpijob-ssh-"))
    config = Path(tempfile.mkdtemp(prefix="hvdclip-mpijob-config-"))
    data = keys / "..2026_01_01_00_00_00.000000000"
    data.mkdir()
    podman("run", "--rm", "--network", "none", "--user", "root", "-v", f"{data}:/keys", image,
           "ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-m", "PEM", "-N", "", "-f", "/keys/id_rsa", timeout=120)  # fmt: skip
    public = " ".join((data / "id_rsa.pub").read_text().split()[:2]) + "\n"  # the operator's has no comment
    for name in OPERATOR_KEY_FILES[1:]:
        (data / name).write_text(public)
    for path in (data, config, *data.iterdir()):
        shutil.chown(path, 0, 0)
        path.chmod(0o755 if path.is_dir() else 0o644)
    (keys / "..data").symlink_to(data.name)
    for name in OPERATOR_KEY_FILES:
        (keys / name).symlink_to(f"..data/{name}")
    shutil.chown(keys, 0, 0)
    keys.chmod(0o1777)
    yield keys, config
    shutil.rmtree(keys, ignore_errors=True)
    shutil.rmtree(config, ignore_errors=True)


def pod_args(manifest: dict, role: str, image: str, name: str, hostname: str, ip: str, network: str,
             hosts: dict[str, str], env: dict[str, str], mounts: dict[Path, str]) -> list[str]:  # fmt: skip
    """`podman run` arguments for the pod of `role` (a worker runs detached, the launcher in the
    foreground), from its template as Kubernetes reads it."""
    spec, container = pod_spec(manifest, role), main_container(manifest, role)
    security = spec.get("securityContext", {})
    args = ["run", "-d" if role == "Worker" else "--rm", "--name", name, "--hostname", hostname, "--network", network,
            "--ip", ip, "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]  # fmt: skip
    args += [arg for host, address in hosts.items() for arg in ("--add-host", f"{host}:{address}")]
    for variable in container.get("env", []):
        env = {variable["name"]: str(variable["value"]), **env}
    args += [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    args += [arg for source, target in mounts.items() for arg in ("-v", f"{source}:{target}:ro")]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if volume.get("emptyDir", {}).get("medium") != "Memory":
            pytest.fail(f"the test does not know how to make volume {volume} for {role}")
        args += ["--tmpfs", mount["mountPath"]]
    command, container_args = container_argv(container)
    assert command is None, f"{role} replaces the image's entrypoint; the test runs `args` under it"
    return [*args, image, *container_args]


def wait_until_ready(manifest: dict, ip: str, container: str) -> None:
    """The worker's readiness probe: a TCP connection to its port, within the test's bound."""
    port = main_container(manifest, "Worker")["readinessProbe"]["tcpSocket"]["port"]
    deadline = time.monotonic() + READY_BOUND_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection((ip, port), timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    logs = podman("logs", container, timeout=30, check=False)
    pytest.fail(f"{container} was not ready (port {port}) within the {READY_BOUND_S} s bound:\n{logs.stdout}{logs.stderr}")


def test_the_mpijobs_launcher_trains_across_two_workers_running_its_sshd(image, network, operator_files, unique):
    manifest = load()
    net, (launcher_ip, *worker_ips) = network
    keys, config = operator_files
    spec = manifest["spec"]
    workers, slots_per_worker = spec["mpiReplicaSpecs"]["Worker"]["replicas"], spec["slotsPerWorker"]
    assert workers == len(worker_ips) == 2, "the test makes two workers, as the manifest has"
    names, hostfile = operator_hostfile(manifest, NAMESPACE, SLOTS)
    (config / Path(OPERATOR_HOSTFILE).name).write_text(hostfile)
    (config / Path(OPERATOR_HOSTFILE).name).chmod(0o444)
    job = manifest["metadata"]["name"]
    hosts = {f"{job}-launcher.{job}.{NAMESPACE}.svc": launcher_ip, **dict(zip(names, worker_ips))}
    ssh_mount = {keys: spec["sshAuthMountPath"]}

    started = []
    try:
        for i, (host, ip) in enumerate(zip(names, worker_ips)):
            name = f"hvdclip-test-worker-{i}-{unique}"
            started.append(name)
            podman(*pod_args(manifest, "Worker", image, name, host.split(".")[0], ip, net, hosts, {"K_MPI_JOB_ROLE": "worker"},
                             ssh_mount), timeout=120)  # fmt: skip
        for name, ip in zip(started, worker_ips):
            wait_until_ready(manifest, ip, name)

        launcher = pod_args(manifest, "Launcher", image, f"hvdclip-test-launcher-{unique}", f"{job}-launcher", launcher_ip,
                            net, hosts, operator_launcher_env(SLOTS), {**ssh_mount, config: str(Path(OPERATOR_HOSTFILE).parent)})  # fmt: skip
        ranks = launcher.index("-np") + 1
        assert launcher[ranks] == str(workers * slots_per_worker), "the manifest's -np is replicas x slotsPerWorker"
        launcher[ranks] = str(workers * SLOTS)
        result = podman(*launcher, timeout=JOB_BOUND_S, check=False)
        logs = [podman("logs", name, timeout=60, check=False) for name in started]
    finally:
        for name in started:
            podman("rm", "-f", "-t", "5", name, timeout=120, check=False)
    sshd = "\n".join(f"{name}'s sshd:\n{log.stdout}{log.stderr}" for name, log in zip(started, logs))
    output = f"{result.stdout}\n{result.stderr}\n{sshd}"
    assert result.returncode == 0, output
    assert "test accuracy" in result.stdout and f"({workers * SLOTS} ranks)" in result.stdout, output
    # Every rank ran on a worker, logged in by the launcher as hvd with the operator's key.
    for log in logs:
        assert f"Accepted publickey for hvd from {launcher_ip}" in log.stdout + log.stderr, output
