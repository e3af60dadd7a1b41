"""launch/kubernetes/mpijob-gpu.yaml against what the Kubeflow MPI Operator (kubeflow.org/v2beta1)
requires of an MPIJob, and against the GPU image and hvdclip-run it runs.

The operator's rules are those of its `validation.ValidateMPIJob` and `SetDefaults_MPIJob` (v0.8):
`slotsPerWorker`, `runPolicy.cleanPodPolicy`, `sshAuthMountPath` and a Launcher with `replicas: 1`
are required (the manifest spells each out rather than relying on the CRD's defaults), and the enums
below. The MPIJob spec's fields are checked by name, so a misspelt one (which the API server would
drop silently) fails here. Each check also runs on broken copies, so that it is known to fail.
"""

from __future__ import annotations

import copy
import re
import shlex
import tempfile
from pathlib import Path

import pytest
from kubernetes_support import (
    OPERATOR_HOSTFILE, OPERATOR_KEY_FILES, container_argv, load, main_container, operator_hostfile, pod_spec,
)  # fmt: skip

from hvdclip.launch.cli import parse_args

REPO = Path(__file__).resolve().parents[2]
SPEC_FIELDS = {"slotsPerWorker", "runLauncherAsWorker", "runPolicy", "mpiReplicaSpecs", "sshAuthMountPath",
               "launcherCreationPolicy", "mpiImplementation"}  # fmt: skip
RUN_POLICY_FIELDS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                     "schedulingPolicy", "suspend", "managedBy"}  # fmt: skip
REPLICA_FIELDS = {"replicas", "template", "restartPolicy"}
CLEAN_POD_POLICIES = {"None", "Running", "All"}
RESTART_POLICIES = {"Never", "OnFailure"}
MPI_IMPLEMENTATIONS = {"OpenMPI", "Intel", "MPICH"}
LAUNCHER_CREATION_POLICIES = {"AtStartup", "WaitForWorkersReady"}
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def dockerfile_user_and_home(path: Path) -> tuple[str, str]:
    """(uid, home) of the user the image runs as: its `USER uid:gid` and the `useradd --uid` home."""
    text = path.read_text()
    uid = re.search(r"^USER (\d+):\d+$", text, re.M).group(1)
    name = re.search(rf"useradd --create-home --uid {uid} .* (\w+)$", text, re.M).group(1)
    return uid, f"/home/{name}"


IMAGE_UID, IMAGE_HOME = dockerfile_user_and_home(REPO / "docker" / "Dockerfile.gpu")


def sshd_options(args: list[str]) -> dict[str, str]:
    """The worker's `sshd ... -o KEY=VALUE ...` options."""
    return dict(args[i + 1].split("=", 1) for i, arg in enumerate(args) if arg == "-o")


def operator_problems(job: dict) -> list[str]:
    """What the MPI Operator would refuse in `job` (or silently drop: unknown fields)."""
    problems = []
    if (job.get("apiVersion"), job.get("kind")) != ("kubeflow.org/v2beta1", "MPIJob"):
        problems.append(f"not a kubeflow.org/v2beta1 MPIJob: {job.get('apiVersion')} {job.get('kind')}")
    spec = job.get("spec", {})
    problems += [f"spec.{key} is not an MPIJob field" for key in sorted(set(spec) - SPEC_FIELDS)]
    slots = spec.get("slotsPerWorker")
    if not isinstance(slots, int) or slots < 1:
        problems.append(f"spec.slotsPerWorker must be an integer >= 1: {slots!r}")
    policy = spec.get("runPolicy", {})
    problems += [f"spec.runPolicy.{key} is not a RunPolicy field" for key in sorted(set(policy) - RUN_POLICY_FIELDS)]
    if policy.get("cleanPodPolicy") not in CLEAN_POD_POLICIES:
        problems.append(f"spec.runPolicy.cleanPodPolicy must be one of {sorted(CLEAN_POD_POLICIES)}: {policy.get('cleanPodPolicy')!r}")
    if not spec.get("sshAuthMountPath"):
        problems.append("spec.sshAuthMountPath is required")
    if spec.get("mpiImplementation") not in MPI_IMPLEMENTATIONS:
        problems.append(f"spec.mpiImplementation must be one of {sorted(MPI_IMPLEMENTATIONS)}: {spec.get('mpiImplementation')!r}")
    if spec.get("launcherCreationPolicy", "AtStartup") not in LAUNCHER_CREATION_POLICIES:
        problems.append(f"spec.launcherCreationPolicy must be one of {sorted(LAUNCHER_CREATION_POLICIES)}")
    replicas = spec.get("mpiReplicaSpecs", {})
    problems += [f"spec.mpiReplicaSpecs.{role} is not a replica type" for role in sorted(set(replicas) - {"Launcher", "Worker"})]
    for role, fewest, most in (("Launcher", 1, 1), ("Worker", 1, None)):
        replica = replicas.get(role)
        if replica is None:
            problems.append(f"spec.mpiReplicaSpecs.{role} is required")
            continue
        problems += [f"{role}.{key} is not a ReplicaSpec field" for key in sorted(set(replica) - REPLICA_FIELDS)]
        count = replica.get("replicas")
        if not isinstance(count, int) or count < fewest or (most is not None and count > most):
            problems.append(f"{role}.replicas must be {'exactly 1' if most else '>= 1'}: {count!r}")
        if replica.get("restartPolicy") not in RESTART_POLICIES:
            problems.append(f"{role}.restartPolicy must be one of {sorted(RESTART_POLICIES)}: {replica.get('restartPolicy')!r}")
        if not replica.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{role}.template.spec.containers must hold at least one container")
    workers = replicas.get("Worker", {}).get("replicas")
    name = job.get("metadata", {}).get("name", "")
    if isinstance(workers, int) and not DNS_1035_LABEL.fullmatch(f"{name}-worker-{workers - 1}"):
        problems.append(f"metadata.name {name!r}: its pods' host names would not be DNS labels")
    return problems


def hvdclip_problems(job: dict) -> list[str]:
    """Where the manifest disagrees with the GPU image or with the hvdclip-run command it runs."""
    problems = []
    spec = job["spec"]
    slots, workers = spec["slotsPerWorker"], spec["mpiReplicaSpecs"]["Worker"]["replicas"]
    launcher, worker = main_container(job, "Launcher"), main_container(job, "Worker")
    for role, container in (("Launcher", launcher), ("Worker", worker)):
        if container.get("image", "").rsplit("/", 1)[-1] != "hvdclip:gpu":
            problems.append(f"{role} runs {container.get('image')!r}, not the GPU image hvdclip:gpu")
        if str(pod_spec(job, role).get("securityContext", {}).get("runAsUser")) != IMAGE_UID:
            problems.append(f"{role} must run as the image's user, uid {IMAGE_UID}")
        command, args = container_argv(container)
        if command is not None:
            problems.append(f"{role} sets `command`, which replaces the image's entrypoint (tini): use `args`")
        if any(word in ("sh", "bash", "/bin/sh", "/bin/bash") for word in args):
            problems.append(f"{role} runs a shell: {shlex.join(args)}")
    if spec["sshAuthMountPath"] != f"{IMAGE_HOME}/.ssh":
        problems.append(f"sshAuthMountPath must be {IMAGE_HOME}/.ssh, the image user's, not {spec['sshAuthMountPath']}")
    gpus = worker.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if gpus != slots:
        problems.append(f"a worker has {gpus!r} GPUs but slotsPerWorker: {slots}: one rank per GPU")

    _, args = container_argv(launcher)
    hostfile = args.index("--hostfile") + 1 if "--hostfile" in args else None
    if hostfile is None or args[hostfile] != OPERATOR_HOSTFILE:
        problems.append(f"the launcher must read the operator's hostfile: --hostfile {OPERATOR_HOSTFILE}")
        return problems
    with tempfile.NamedTemporaryFile("w", suffix=".hostfile") as written:
        written.write(operator_hostfile(job, "default", slots)[1])
        written.flush()
        try:  # hvdclip-run's own checks of every flag, with the hostfile the operator would write
            settings, _ = parse_args([*args[1:hostfile], written.name, *args[hostfile + 1 :]], {})
        except ValueError as err:
            return [*problems, f"hvdclip-run refuses the launcher's command: {err}"]
    if args[0] != "hvdclip-run" or settings.backend != "mpirun":
        problems.append(f"the launcher must run `hvdclip-run --backend mpirun`: {shlex.join(args)}")
    if settings.num_proc != workers * slots:
        problems.append(f"-np {settings.num_proc} is not Worker replicas x slotsPerWorker = {workers * slots}")
    keys = {f"{spec['sshAuthMountPath']}/{name}" for name in OPERATOR_KEY_FILES}
    if settings.ssh_identity_file not in keys:
        problems.append(f"--ssh-identity-file {settings.ssh_identity_file} is not one of the operator's key files")

    _, sshd = container_argv(worker)
    options = sshd_options(sshd)
    if sshd[:4] != ["/usr/sbin/sshd", "-D", "-e", "-f"]:
        problems.append(f"a worker must run sshd in the foreground, logging to stderr: {shlex.join(sshd)}")
    if str(settings.ssh_port) != options.get("Port"):
        problems.append(f"the launcher's --ssh-port {settings.ssh_port} is not the workers' sshd Port {options.get('Port')}")
    for option, file in (("HostKey", "id_rsa"), ("AuthorizedKeysFile", "authorized_keys")):
        if options.get(option) != f"{spec['sshAuthMountPath']}/{file}":
            problems.append(f"the workers' sshd {option} must be the operator's {spec['sshAuthMountPath']}/{file}")
    probe = worker.get("readinessProbe", {}).get("tcpSocket", {}).get("port")
    if spec.get("launcherCreationPolicy") != "WaitForWorkersReady" or str(probe) != options.get("Port"):
        problems.append("the launcher must wait for workers whose readiness is their sshd's port")
    return problems


@pytest.fixture(scope="module")
def manifest():
    return load()


def test_the_mpijob_has_every_field_the_operator_requires(manifest):
    assert operator_problems(manifest) == []


def test_the_mpijob_fits_the_gpu_image_and_hvdclip_run(manifest):
    assert hvdclip_problems(manifest) == []


def broken(manifest: dict, change) -> dict:
    job = copy.deepcopy(manifest)
    change(job)
    return job


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda j: j["spec"].pop("sshAuthMountPath"), "spec.sshAuthMountPath is required"),
        (lambda j: j["spec"].pop("slotsPerWorker"), "spec.slotsPerWorker must be an integer >= 1: None"),
        (lambda j: j["spec"]["runPolicy"].pop("cleanPodPolicy"), "spec.runPolicy.cleanPodPolicy must be one of ['All', 'None', 'Running']: None"),
        (lambda j: j["spec"].update(slotPerWorker=8), "spec.slotPerWorker is not an MPIJob field"),
        (lambda j: j["spec"]["mpiReplicaSpecs"]["Launcher"].update(replicas=2), "Launcher.replicas must be exactly 1: 2"),
        (lambda j: j["spec"]["mpiReplicaSpecs"]["Worker"].update(restartPolicy="Always"),
         "Worker.restartPolicy must be one of ['Never', 'OnFailure']: 'Always'"),
        (lambda j: j["spec"]["mpiReplicaSpecs"].pop("Launcher"), "spec.mpiReplicaSpecs.Launcher is required"),
        (lambda j: j["spec"].update(mpiImplementation="OpenMpi"), "spec.mpiImplementation must be one of ['Intel', 'MPICH', 'OpenMPI']: 'OpenMpi'"),
        (lambda j: j["metadata"].update(name="Hvdclip_Train"), "metadata.name 'Hvdclip_Train': its pods' host names would not be DNS labels"),
    ],
)  # fmt: skip
def test_the_operator_check_finds_each_kind_of_mistake(manifest, change, problem):
    assert problem in operator_problems(broken(manifest, change))


def _set_arg(container: dict, flag: str, value: str) -> None:
    container["args"][container["args"].index(flag) + 1] = value


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda j: j["spec"].update(slotsPerWorker=4), "a worker has 8 GPUs but slotsPerWorker: 4: one rank per GPU"),
        (lambda j: _set_arg(main_container(j, "Launcher"), "-np", "8"), "-np 8 is not Worker replicas x slotsPerWorker = 16"),
        (lambda j: _set_arg(main_container(j, "Launcher"), "--ssh-port", "22"), "the launcher's --ssh-port 22 is not the workers' sshd Port 2222"),
        (lambda j: _set_arg(main_container(j, "Launcher"), "--ssh-identity-file", "/home/hvd/.ssh/id_ed25519"),
         "--ssh-identity-file /home/hvd/.ssh/id_ed25519 is not one of the operator's key files"),
        (lambda j: j["spec"].update(sshAuthMountPath="/root/.ssh"), "sshAuthMountPath must be /home/hvd/.ssh, the image user's, not /root/.ssh"),
        (lambda j: main_container(j, "Worker").update(command=["/usr/sbin/sshd"]),
         "Worker sets `command`, which replaces the image's entrypoint (tini): use `args`"),
        (lambda j: main_container(j, "Worker").update(image="hvdclip:cpu"), "Worker runs 'hvdclip:cpu', not the GPU image hvdclip:gpu"),
        (lambda j: pod_spec(j, "Launcher")["securityContext"].update(runAsUser=0), "Launcher must run as the image's user, uid 1000"),
        (lambda j: j["spec"].pop("launcherCreationPolicy"), "the launcher must wait for workers whose readiness is their sshd's port"),
    ],
)  # fmt: skip
def test_the_hvdclip_check_finds_each_kind_of_mistake(manifest, change, problem):
    assert problem in hvdclip_problems(broken(manifest, change))


def test_a_bad_hvdclip_run_flag_in_the_manifest_is_refused_by_hvdclip_runs_own_checks(manifest):
    job = broken(manifest, lambda j: _set_arg(main_container(j, "Launcher"), "--ssh-port", "ssh"))
    assert hvdclip_problems(job) == [
        "hvdclip-run refuses the launcher's command: `--ssh-port` must be an integer >= 1 and <= 65535. Received: --ssh-port=ssh"
    ]
