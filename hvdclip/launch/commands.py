"""Turns `LaunchSettings` into the argument list of horovodrun, mpirun or srun.

`build_command` is pure: it reads the caller's environment only through its `environ` argument, and
leaves the program as a bare name (`find_program` resolves it), so tests compare lists exactly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping

from hvdclip.errors import LauncherError
from hvdclip.launch.settings import LaunchSettings

__all__ = ["build_command", "default_backend", "find_program", "horovod_env", "rank_prefix", "ssh_arguments"]

# Variables mpirun forwards to every rank when they are set: the search paths first, then everything
# that configures NCCL, Horovod or TensorFlow.
_MPIRUN_PATHS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH")
_MPIRUN_PREFIXES = ("NCCL_", "HOROVOD_", "TF_")

_INSTALL_HINTS = {
    "horovodrun": "install Horovod into this Python (`make install` in the hvdclip repo builds it with TensorFlow)",
    "mpirun": "install Open MPI (Debian/Ubuntu: `apt-get install openmpi-bin`) or use `--backend horovodrun --gloo`",
    "srun": "install Slurm's client tools (Debian/Ubuntu: `apt-get install slurm-client`) or choose "
    "`--backend horovodrun` or `--backend mpirun`",
}


def default_backend(environ: Mapping[str, str]) -> str:
    """`srun` inside a Slurm allocation (SLURM_JOB_ID is set), otherwise `horovodrun`."""
    return "srun" if environ.get("SLURM_JOB_ID") else "horovodrun"


def horovod_env(settings: LaunchSettings) -> dict[str, str]:
    """The variables through which Horovod, the transports and hvdclip's ranks read their options.

    horovodrun sets the tuning ones itself from its flags; for mpirun and srun they go on the command line.
    """
    env = {}
    if settings.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(settings.fusion_threshold_mb * 1024 * 1024)
    if settings.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{settings.cycle_time_ms:g}"
    if settings.network_interfaces:
        env["NCCL_SOCKET_IFNAME"] = ",".join(settings.network_interfaces)
        env["HOROVOD_GLOO_IFACE"] = settings.network_interfaces[0]  # Gloo takes one interface.
    return {**env, **failure_env(settings)}


def failure_env(settings: LaunchSettings) -> dict[str, str]:
    """The ranks' own bounds: Gloo's wait for a peer, and hvdclip's watchdog on each step."""
    step = "off" if settings.step_timeout_s is None else f"{settings.step_timeout_s:g}"
    return {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(settings.gloo_timeout_s), "HVDCLIP_STEP_TIMEOUT": step}


def rank_prefix(settings: LaunchSettings, python: str) -> list[str]:
    """What runs before the user's command on each rank: `python -m hvdclip.launch.rank` (see that module)."""
    return [python, "-m", "hvdclip.launch.rank", *(["--verbose"] if settings.verbose else []), "--"]


def ssh_arguments(
    port: int | str | None, identity_file: str | None, options: Mapping[str, str], environ: Mapping[str, str]
) -> list[str]:
    """ssh's arguments for Open MPI's `plm_rsh_args`: port, identity, `-o KEY=VALUE` options, then
    the words of `OMPI_MCA_plm_rsh_args` in `environ`.

    A `-mca plm_rsh_args` on mpirun's command line replaces that variable (which the Kubeflow MPI
    Operator sets), so its words are kept here, after hvdclip-run's: ssh takes the first value it is
    given for each setting, so the explicit options win. Open MPI splits the joined string on
    whitespace, which is why `LaunchSettings` refuses whitespace in every part.

    Example:
        >>> ssh_arguments(2222, "/k/id", {"ServerAliveInterval": "5"}, {"OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10"})
        ['-p', '2222', '-i', '/k/id', '-o', 'ServerAliveInterval=5', '-o', 'ConnectionAttempts=10']
    """
    words = ["-p", str(port)] if port is not None else []
    if identity_file is not None:
        words += ["-i", identity_file]
    for key, value in options.items():
        words += ["-o", f"{key}={value}"]
    return words + environ.get("OMPI_MCA_plm_rsh_args", "").split()


def _mca_args(settings: LaunchSettings, *, btl_nics: bool = True) -> list[str]:
    values = settings.mca_values()
    if settings.network_interfaces:
        # btl carries MPI's messages, oob the daemons' wire-up and control: both must avoid other networks.
        nics = ",".join(settings.network_interfaces)
        values = {**({"btl_tcp_if_include": nics} if btl_nics else {}), "oob_tcp_if_include": nics, **values}
    return [arg for name, value in values.items() for arg in ("-mca", name, value)]


def _hosts_arg(settings: LaunchSettings) -> list[str]:
    return ["-H", ",".join(map(str, settings.hosts))] if settings.hosts else []


def _horovodrun(settings: LaunchSettings, environ: Mapping[str, str], as_root: bool, python: str) -> list[str]:
    # horovodrun through hvdclip's entry point: the same program without its 10 s start-up, and with
    # ssh options and the ranks' variables (see hvdclip/launch/horovodrun.py).
    argv = [python, "-m", "hvdclip.launch.horovodrun"]
    for key, value in settings.ssh_option_values().items():
        argv += ["--ssh-option", f"{key}={value}"]
    for name, value in failure_env(settings).items():
        argv += ["--env", f"{name}={value}"]
    argv += ["-np", str(settings.num_proc), *_hosts_arg(settings)]
    controller = settings.effective_controller
    if controller:
        argv.append(f"--{controller}")
    if settings.elastic:
        argv += _elastic_args(settings)
    if settings.ssh_port is not None:
        argv += ["--ssh-port", str(settings.ssh_port)]
    if settings.ssh_identity_file is not None:
        argv += ["--ssh-identity-file", settings.ssh_identity_file]
    if settings.network_interfaces:
        argv += ["--network-interfaces", ",".join(settings.network_interfaces)]
    if controller != "gloo":
        # horovodrun gives its mpirun btl_tcp_if_include itself; the rest reaches it only this way.
        # horovodrun pastes --mpi-args into the command line it hands to /bin/sh: quoted for that shell.
        argv += ["--mpi-args", shlex.join(_mca_args(settings, btl_nics=False))]
    if settings.fusion_threshold_mb is not None:
        argv += ["--fusion-threshold-mb", str(settings.fusion_threshold_mb)]
    if settings.cycle_time_ms is not None:
        argv += ["--cycle-time-ms", f"{settings.cycle_time_ms:g}"]
    if settings.verbose:
        argv.append("--verbose")
    return argv


def _elastic_args(settings: LaunchSettings) -> list[str]:
    """horovodrun's elastic flags; the wait for hosts is always given, so that it is seen bounded."""
    # horovodrun runs the discovery script through a shell (and again every second), so the path is
    # quoted for it: unchanged for an ordinary path, still one word with spaces in it.
    argv = [
        "--min-np", str(settings.min_num_proc), "--max-np", str(settings.max_num_proc),
        "--host-discovery-script", shlex.quote(str(settings.host_discovery_script)),
    ]  # fmt: skip
    if settings.slots_per_host is not None:
        argv += ["--slots-per-host", str(settings.slots_per_host)]
    argv += ["--elastic-timeout", str(settings.elastic_timeout_s)]
    if settings.reset_limit is not None:
        argv += ["--reset-limit", str(settings.reset_limit)]
    return argv


def _mpirun_exports(settings: LaunchSettings, environ: Mapping[str, str]) -> list[str]:
    """`-x` arguments: set variables by name, then the values hvdclip-run chooses as NAME=VALUE."""
    chosen = horovod_env(settings)
    prefixed = sorted(name for name in environ if name.startswith(_MPIRUN_PREFIXES))
    names = [name for name in (*_MPIRUN_PATHS, *prefixed, *settings.env) if name in environ]
    names = [name for name in dict.fromkeys(names) if name not in chosen]
    exports = names + [f"{name}={value}" for name, value in chosen.items()]
    return [arg for export in exports for arg in ("-x", export)]


def _mpirun(settings: LaunchSettings, environ: Mapping[str, str], as_root: bool, python: str) -> list[str]:
    argv = ["mpirun", "-np", str(settings.num_proc), *_hosts_arg(settings)]
    # No binding: each rank runs TensorFlow's own thread pools, which one bound core would starve.
    argv += ["-bind-to", "none", "-map-by", "slot"]
    # ob1 over TCP/shared memory works everywhere; the openib BTL is deprecated and only warns.
    argv += ["-mca", "pml", "ob1", "-mca", "btl", "^openib", *_mca_args(settings)]
    # One string: Open MPI splits it into ssh's arguments.
    ssh = ssh_arguments(settings.ssh_port, settings.ssh_identity_file, settings.ssh_option_values(), environ)
    argv += ["-mca", "plm_rsh_args", " ".join(ssh)]
    if as_root:
        argv.append("--allow-run-as-root")
    return argv + _mpirun_exports(settings, environ)


def _srun(settings: LaunchSettings, environ: Mapping[str, str], as_root: bool, python: str) -> list[str]:
    argv = ["srun", f"--ntasks={settings.num_proc}", f"--mpi={settings.srun_mpi}"]
    if settings.hosts:
        argv.append(f"--nodelist={','.join(host.name for host in settings.hosts)}")
    # One failed rank ends the step instead of leaving the others blocked in a collective.
    argv += ["--kill-on-bad-exit=1", "--cpu-bind=none"]
    # srun exports the caller's whole environment; chosen values go through `env` because
    # `--export=NAME=VALUE` cannot carry values with commas (interface lists).
    chosen = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "^openib", **horovod_env(settings)}
    if settings.network_interfaces:
        chosen["OMPI_MCA_btl_tcp_if_include"] = ",".join(settings.network_interfaces)
        chosen["OMPI_MCA_oob_tcp_if_include"] = ",".join(settings.network_interfaces)
    return argv + ["env", *(f"{name}={value}" for name, value in chosen.items())]


_BUILDERS = {"horovodrun": _horovodrun, "mpirun": _mpirun, "srun": _srun}


def build_command(
    settings: LaunchSettings, environ: Mapping[str, str], *, as_root: bool = False, python: str = "python"
) -> list[str]:
    """The launcher's argument list for `settings`, ending with the user's command.

    Each rank runs the user's command through `python -m hvdclip.launch.rank` (thread limits, quiet
    start-up); the horovodrun backend starts as `python -m hvdclip.launch.horovodrun`.

    Args:
        settings: the job.
        environ: the caller's environment (mpirun forwards some of its variables by name).
        as_root: whether the job starts as root (Open MPI then needs `--allow-run-as-root`).
        python: the interpreter, on every host, of horovodrun and of each rank's set-up
            (`hvdclip-run` passes its own).

    Raises:
        ValueError: an `--env` name is not set in `environ`.

    Example:
        >>> build_command(LaunchSettings(num_proc=2, command=("python", "train.py"), backend="srun"), {})[:2]
        ['srun', '--ntasks=2']
    """
    for name in settings.env:
        if name not in environ:
            raise ValueError(f"`--env` must name a variable that is set in this environment. Received: --env={name}")
    launcher = _BUILDERS[settings.backend](settings, environ, as_root, python)
    return launcher + rank_prefix(settings, python) + list(settings.command)


def find_program(name: str, environ: Mapping[str, str]) -> str:
    """The full path of launcher `name`, searched on PATH and then beside this Python.

    The second place finds the venv's `horovodrun` when `hvdclip-run` is started as
    `.venv/bin/hvdclip-run` without activating the venv.

    Raises:
        LauncherError: `name` is in neither place; the message says what to install.
    """
    found = shutil.which(name, path=environ.get("PATH", os.defpath)) or shutil.which(
        name, path=os.path.dirname(sys.executable)
    )
    if found is None:
        raise LauncherError(f"`{name}` was not found on PATH: {_INSTALL_HINTS.get(name, f'install {name}')}.")
    return found
