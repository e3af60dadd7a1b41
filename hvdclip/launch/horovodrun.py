"""`python -m hvdclip.launch.horovodrun [--ssh-option K=V]... [--env N=V]... HOROVODRUN-ARGS...`

Horovod's own horovodrun, started in a fraction of a second, with ssh options and variables for
every rank. `hvdclip-run --backend horovodrun` runs this; the arguments after the leading
`--ssh-option`/`--env` pairs are horovodrun's, unchanged.

Why stock horovodrun takes 10-12 s to start anything: before it launches a rank it asks whether
Horovod was built with MPI and with Gloo (`horovod.common.util.mpi_built` and `gloo_built`). Each
question forks a process that imports `horovod.tensorflow`, and with it TensorFlow (5 s on 2 cores),
to call one C function of the compiled library. Without `--gloo` it asks both. The answers are
constants of the installed build, so here they are asked once per installed library, in a process
that loads only the shared libraries (no Python TensorFlow, about 1 s), and kept in a small cache
file keyed by the library's path, size and modification time. A further 0.4 s went to
`horovod.runner.js_run` importing `distutils.spawn`, which setuptools' distutils shim turns into an
import of setuptools and pkg_resources; the standard library's distutils (Python <= 3.11) serves it.

ssh options reach every ssh horovodrun starts. Its own ssh commands (its reachability check, its
interface discovery, each remote Gloo rank, the elastic driver's ranks) all begin with
`horovod.runner.util.remote.SSH_COMMAND_PREFIX`, so the options go there, first, because ssh keeps
the first value it is given for each setting. The ranks of an MPI job are started by Open MPI's ssh,
which takes its arguments from `plm_rsh_args`: stock horovodrun gives it only `-p PORT -i KEY`, so
here its mpirun gets the port, the key and every option (and any `OMPI_MCA_plm_rsh_args` words).
`--env` variables are set in horovodrun's environment, which it passes to every rank.

`--dry-run` (first) runs horovodrun's own start-up with each command it would run printed instead:
its ssh check of each remote host, and the mpirun that starts the ranks (exactly as horovodrun
would hand it to /bin/sh), or how it starts Gloo ranks. `hvdclip-run --dry-run` prints this after
its own command line.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from hvdclip.launch.commands import ssh_arguments

__all__ = ["build_flags", "main", "split_own_options"]

_OWN_OPTIONS = ("--ssh-option", "--env")
_DRY_RUN = "--dry-run"
# Run in a child process: loads TensorFlow's shared libraries (not its Python package) and asks
# Horovod's TensorFlow library what it was built with.
_PROBE = """
import ctypes, json, os, sys
tf_dir, library = sys.argv[1], sys.argv[2]
for name in ("libtensorflow_framework.so.2", "libtensorflow_cc.so.2"):
    if os.path.exists(os.path.join(tf_dir, name)):
        ctypes.CDLL(os.path.join(tf_dir, name), mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL(library, mode=os.RTLD_LAZY)
print(json.dumps({"mpi": bool(lib.horovod_mpi_built()), "gloo": bool(lib.horovod_gloo_built())}))
"""


def split_own_options(argv: Sequence[str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(ssh options, variables, horovodrun's arguments) from the leading `--ssh-option`/`--env` pairs.

    Raises:
        ValueError: a value is not KEY=VALUE.
    """
    ssh, env, rest = {}, {}, list(argv)
    while len(rest) >= 2 and rest[0] in _OWN_OPTIONS:
        flag, item = rest[0], rest[1]
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"`{flag}` takes KEY=VALUE. Received: {flag}={item}")
        (ssh if flag == "--ssh-option" else env)[key] = value
        rest = rest[2:]
    return ssh, env, rest


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hvdclip"


def build_flags() -> dict[str, bool] | None:
    """{"mpi": ..., "gloo": ...} of the installed Horovod TensorFlow library; None when it cannot tell."""
    horovod = importlib.util.find_spec("horovod")
    tensorflow = importlib.util.find_spec("tensorflow")
    if horovod is None or tensorflow is None or not horovod.submodule_search_locations:
        return None
    libraries = glob.glob(os.path.join(list(horovod.submodule_search_locations)[0], "tensorflow", "mpi_lib*.so"))
    if not libraries:
        return None
    library = libraries[0]
    stat = os.stat(library)
    key = hashlib.sha256(f"{library}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_dir() / f"horovod-build-{key}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(cached.read_text())
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, os.path.dirname(tensorflow.origin), library],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        flags = json.loads(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(flags))
        temporary.replace(cached)
    return flags


def _skip_setuptools_distutils() -> None:
    """Lets `import distutils` find the standard library's copy, where there still is one."""
    if sys.version_info < (3, 12) and "distutils" not in sys.modules:
        sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_distutils_hack")]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = argv[:1] == [_DRY_RUN]
    try:
        ssh_options, env, horovodrun_args = split_own_options(argv[1:] if dry_run else argv)
    except ValueError as err:
        print(f"hvdclip-run: error: {err}", file=sys.stderr)
        return 2
    _skip_setuptools_distutils()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the standard library's distutils says it is going
        from horovod.runner import launch
        from horovod.runner import mpi_run as mpi_run_module
        from horovod.runner.util import remote

    flags = build_flags()
    if flags is not None:
        _answer_build_checks(launch, flags)
    _add_ssh_options(remote, ssh_options)
    _give_mpirun_every_ssh_option(launch, mpi_run_module, ssh_options)
    if dry_run:
        _print_instead_of_running(launch, remote)
        # Its cache (~/.horovod) only remembers checks, which the dry run does not make: write none.
        horovodrun_args = ["--disable-cache", *horovodrun_args]
    os.environ.update(env)
    sys.argv = ["horovodrun", *horovodrun_args]
    launch.run_commandline()
    return 0


# ------------------------------------------------------------------------------------------------
# Changes inside horovod.runner, written for Horovod 0.28.1 (its last release). Each function names
# the private names it relies on; none is used anywhere else in hvdclip.


def _answer_build_checks(launch, flags: dict[str, bool]) -> None:
    """Horovod 0.28.1: `horovod.runner.launch.mpi_built` and `.gloo_built`, the names horovodrun's
    module imported from `horovod.common.util` and calls with a `verbose` argument."""
    launch.mpi_built = lambda verbose=False: flags["mpi"]
    launch.gloo_built = lambda verbose=False: flags["gloo"]


def _add_ssh_options(remote, ssh_options: Mapping[str, str]) -> None:
    """Horovod 0.28.1: `horovod.runner.util.remote.SSH_COMMAND_PREFIX` (`ssh -o ...`), the start of
    every ssh command horovodrun runs itself (`get_ssh_command` joins it into a shell string).

    The options go right after `ssh`, before Horovod's own `PasswordAuthentication=no` and
    `StrictHostKeyChecking=no`, because ssh keeps the first value of each setting: the user's win.
    """
    program, _, horovods = remote.SSH_COMMAND_PREFIX.partition(" ")
    words = [f"-o {shlex.quote(f'{key}={value}')}" for key, value in ssh_options.items()]
    remote.SSH_COMMAND_PREFIX = " ".join([program, *words, horovods]).strip()


def _give_mpirun_every_ssh_option(launch, mpi_run_module, ssh_options: Mapping[str, str]) -> None:
    """Horovod 0.28.1: `horovod.runner.launch.mpi_run`, the name horovodrun's module imported from
    `horovod.runner.mpi_run` and calls as `mpi_run(settings, nics, env, command)`; the `ssh_port`,
    `ssh_identity_file` and `extra_mpi_args` attributes of its `Settings`; and
    `horovod.runner.mpi_run.is_open_mpi(env)`.

    Horovod's `mpi_run` builds `-mca plm_rsh_args "-p PORT -i KEY"` from the settings' port and key
    alone. Here it gets a copy of the settings without them (so it adds no `plm_rsh_args`: Open MPI
    refuses a parameter given twice) whose `extra_mpi_args` carry `-mca plm_rsh_args` with the port,
    the key, every ssh option and the words of `OMPI_MCA_plm_rsh_args`, which the command-line
    parameter replaces. `extra_mpi_args` is pasted into the shell command Horovod runs, so the value
    is quoted for that shell. Other MPIs (Intel MPI, MPICH) are left as Horovod starts them.
    """
    horovods_mpi_run = launch.mpi_run

    def mpi_run(settings, nics, env, command, stdout=None, stderr=None):
        words = ssh_arguments(settings.ssh_port, settings.ssh_identity_file, ssh_options, env or {})
        if words and mpi_run_module.is_open_mpi(env):
            settings = copy.copy(settings)
            settings.ssh_port = settings.ssh_identity_file = None
            ssh = f"-mca plm_rsh_args {shlex.quote(' '.join(words))}"
            settings.extra_mpi_args = f"{settings.extra_mpi_args} {ssh}" if settings.extra_mpi_args else ssh
        return horovods_mpi_run(settings, nics, env, command, stdout=stdout, stderr=stderr)

    launch.mpi_run = mpi_run


def _print_instead_of_running(launch, remote) -> None:
    """`--dry-run`: horovodrun's start-up runs, and each command it would start is printed instead.

    Horovod 0.28.1: `horovod.runner.launch._check_all_hosts_ssh_successful(host_addresses,
    ssh_port, ssh_identity_file, fn_cache=...)` and `launch.SSH_CONNECT_TIMEOUT_S`;
    `horovod.runner.driver.driver_service.get_common_interfaces(settings, all_host_names,
    remote_host_names, fn_cache)`; `launch.gloo_run(settings, nics, env, server_ip, command)` and
    `launch.gloo_run_elastic(settings, env, command, executable)`; `launch.network.get_driver_ip(nics)`
    (`horovod.runner.util.network`); and `mpi_run`'s last step,
    `os.execve("/bin/sh", ["/bin/sh", "-c", MPIRUN_COMMAND], env)`, replaced for this process.
    """

    def check_ssh(host_addresses, ssh_port=None, ssh_identity_file=None, fn_cache=None):
        print("# horovodrun checks ssh to each remote host (its other ssh commands take the same options):")
        for host in host_addresses:
            print(remote.get_remote_command("true", host, ssh_port, ssh_identity_file, launch.SSH_CONNECT_TIMEOUT_S))
        return True

    find_interfaces = launch.driver_service.get_common_interfaces

    def common_interfaces(settings, all_host_names, remote_host_names=None, fn_cache=None):
        if remote_host_names and not settings.nics:
            print("# horovodrun then finds the network interfaces all hosts share, over the same ssh; NICS below stands for them")
            return ["NICS"]
        return find_interfaces(settings, all_host_names, remote_host_names, fn_cache)

    def gloo_ranks(settings, nics, env, server_ip, command):
        names = [host.rsplit(":", 1)[0] for host in settings.hosts.split(",")]
        remote_hosts = launch.network.filter_local_addresses(names)
        print(f"# horovodrun starts each rank itself (Gloo){'; on a remote host over ssh:' if remote_hosts else ', all on this host'}")
        for host in remote_hosts:
            print(remote.get_remote_command("RANK-COMMAND", host, settings.ssh_port, settings.ssh_identity_file))

    def elastic_ranks(settings, env, command, executable):
        print("# horovodrun's elastic driver runs the discovery script and starts each rank on a host it names; on a remote host over ssh:")
        print(remote.get_remote_command("RANK-COMMAND", "HOST", settings.ssh_port, settings.ssh_identity_file))

    def print_mpirun(path, args, env):
        print("# horovodrun starts the ranks with:")
        print(args[-1])

    launch._check_all_hosts_ssh_successful = check_ssh
    launch.driver_service.get_common_interfaces = common_interfaces
    launch.network.get_driver_ip = lambda nics: "DRIVER-IP"  # Gloo's rendezvous address; NICS may stand in for nics
    launch.gloo_run = gloo_ranks
    launch.gloo_run_elastic = elastic_ranks
    os.execve = print_mpirun


if __name__ == "__main__":
    raise SystemExit(main())
