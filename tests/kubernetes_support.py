"""The Kubernetes MPIJob of launch/kubernetes/, read for the tests that check it (tests/lint) and run its
commands (tests/images). PyYAML is a dependency of Horovod, so every hvdclip environment has it."""

from __future__ import annotations

from pathlib import Path

import yaml

MANIFEST = Path(__file__).resolve().parents[1] / "launch" / "kubernetes" / "mpijob-gpu.yaml"
# What the MPI Operator (v2beta1) puts into the pods it makes from the manifest: the hostfile it
# writes (and mounts on the launcher), the job's ssh key files in `sshAuthMountPath`, and the
# environment it adds to the launcher's container for Open MPI (pkg/controller/mpi_job_controller.go).
OPERATOR_HOSTFILE = "/etc/mpi/hostfile"
OPERATOR_KEY_FILES = ("id_rsa", "id_rsa.pub", "authorized_keys")


def load(path: Path = MANIFEST) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def pod_spec(manifest: dict, role: str) -> dict:
    """The pod template's spec of `role` ("Launcher" or "Worker")."""
    return manifest["spec"]["mpiReplicaSpecs"][role]["template"]["spec"]


def main_container(manifest: dict, role: str) -> dict:
    """The container the operator treats as the pod's own: the first."""
    return pod_spec(manifest, role)["containers"][0]


def container_argv(container: dict) -> tuple[list[str] | None, list[str]]:
    """(command, args): `command` replaces the image's entrypoint (None keeps it), `args` its CMD."""
    return container.get("command"), [str(arg) for arg in container.get("args", [])]


def operator_hostfile(manifest: dict, namespace: str, slots: int) -> tuple[list[str], str]:
    """The worker host names the operator gives the pods (`NAME-worker-I.NAME.NAMESPACE.svc`) and
    its hostfile for them, with `slots` per worker."""
    name = manifest["metadata"]["name"]
    replicas = manifest["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    hosts = [f"{name}-worker-{i}.{name}.{namespace}.svc" for i in range(replicas)]
    return hosts, "".join(f"{host} slots={slots}\n" for host in hosts)


def operator_launcher_env(slots: int) -> dict[str, str]:
    return {
        "K_MPI_JOB_ROLE": "launcher",
        "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
        "OMPI_MCA_orte_default_hostfile": OPERATOR_HOSTFILE,
        "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
        "OMPI_MCA_orte_set_default_slots": str(slots),
        "NVIDIA_VISIBLE_DEVICES": "",
        "NVIDIA_DRIVER_CAPABILITIES": "",
    }
