"""`LaunchSettings`: everything a launch command is built from, checked once when it is created."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from hvdclip.launch.hosts import Host, refuse_repeats, total_slots
from hvdclip.validation import check_bool, check_int, check_number, check_strings

__all__ = ["BACKENDS", "CONTROLLERS", "DEFAULT_ELASTIC_TIMEOUT_S", "DEFAULT_MCA", "DEFAULT_SSH_OPTIONS", "LaunchSettings"]

BACKENDS = ("horovodrun", "mpirun", "srun")
CONTROLLERS = ("gloo", "mpi")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"[^\s,]+")  # A network interface or srun MPI plugin name: one word, no list.
# ssh options and Open MPI parameters end up in Open MPI's `plm_rsh_args` and in horovodrun's ssh
# command, both split on whitespace: a key is one word, a value has no whitespace.
_KEY_VALUE = re.compile(r"([A-Za-z][A-Za-z0-9_]*)=(\S+)")
# mpirun hands its MCA parameters (`plm_rsh_args` among them) to the daemon on each remote host as
# `-mca NAME "VALUE"` in the command line ssh runs there, unescaped: the remote shell would end the
# value at a `"` and expand `$`, backquotes and backslashes.
_REMOTE_SHELL_SPECIAL = re.compile(r'["$`\\]')

# Failure detection: every wait of the launcher on a remote host is bounded. ssh sends a keepalive
# every 5 s and gives up after 3 unanswered (about 20 s); Open MPI's daemons probe their TCP
# connections after 5 s idle, every 2 s, 3 times (about 11 s). Each is overridden by a later
# `--ssh-option` or `--mca` of the same key.
DEFAULT_SSH_OPTIONS = (("ServerAliveInterval", "5"), ("ServerAliveCountMax", "3"))
DEFAULT_MCA = (("oob_tcp_keepalive_time", "5"), ("oob_tcp_keepalive_intvl", "2"), ("oob_tcp_keepalive_probes", "3"))
# Elastic jobs: how long horovodrun's driver waits for the discovery script to offer enough slots, at
# the start and after every change of hosts (Horovod's own default, passed explicitly so it is seen).
DEFAULT_ELASTIC_TIMEOUT_S = 600
# Elastic settings that only mean something with `elastic=True`: (attribute, flag).
_ELASTIC_ONLY = (
    ("min_num_proc", "--min-np"),
    ("max_num_proc", "--max-np"),
    ("host_discovery_script", "--host-discovery-script"),
    ("slots_per_host", "--slots-per-host"),
    ("reset_limit", "--reset-limit"),
)


@dataclass(frozen=True)
class LaunchSettings:
    """A validated description of one job; `build_command` turns it into an argument list.

    Attributes:
        num_proc: number of ranks (`-np`).
        command: the program each rank runs, e.g. `("python", "train.py")`.
        backend: `"horovodrun"`, `"mpirun"` or `"srun"`.
        hosts: hosts and their slots; empty lets the backend choose (localhost, or the Slurm allocation).
        controller: horovodrun's `"gloo"` or `"mpi"` controller; None lets horovodrun choose.
        env: extra environment variable names to pass to every rank (mpirun's `-x NAME`).
        network_interfaces: interfaces for Horovod and MPI traffic, e.g. `("eth0",)`.
        fusion_threshold_mb: Horovod's tensor fusion buffer size in MB (0 disables fusion).
        cycle_time_ms: Horovod's fusion cycle time in milliseconds.
        verbose: ask horovodrun for verbose output.
        srun_mpi: the PMI plugin `srun --mpi=...` uses to start MPI ranks.
        ssh_port: the port of sshd on every host; None uses ssh's default (22 or ~/.ssh/config).
        ssh_identity_file: the private key ssh logs in with; None uses ssh's default.
        ssh_options: `KEY=VALUE` options for every ssh the launcher runs, after `DEFAULT_SSH_OPTIONS`.
        mca: `NAME=VALUE` Open MPI parameters for mpirun (and horovodrun's MPI), after `DEFAULT_MCA`.
        gloo_timeout_s: seconds a Gloo rendezvous or collective may wait (HOROVOD_GLOO_TIMEOUT_SECONDS).
        step_timeout_s: seconds a training step or collective may take before the rank's watchdog ends
            it (HVDCLIP_STEP_TIMEOUT); None turns the watchdog off.
        elastic: an elastic job (horovodrun with Gloo): ranks come and go as the discovery script's
            hosts do; `num_proc` is the number to start with.
        min_num_proc: elastic: fewest ranks to train with (`--min-np`).
        max_num_proc: elastic: most ranks to run (`--max-np`).
        host_discovery_script: elastic: an executable that prints one `host:slots` line per available
            host; it replaces `hosts`.
        slots_per_host: elastic: slots of a host the script prints without `:slots`.
        elastic_timeout_s: elastic: seconds horovodrun waits for enough slots, at the start and
            after each change of hosts.
        reset_limit: elastic: how many times the job may re-form after a change of hosts before it
            fails; None puts no limit.

    Example:
        >>> LaunchSettings(num_proc=2, command=("python", "train.py"), backend="mpirun")
        >>> LaunchSettings(num_proc=2, command=("python", "train.py"), elastic=True, min_num_proc=2,
        ...                max_num_proc=4, host_discovery_script="/jobs/discover_hosts.sh")
    """

    num_proc: int
    command: tuple[str, ...]
    backend: str = "horovodrun"
    hosts: tuple[Host, ...] = ()
    controller: str | None = None
    env: tuple[str, ...] = ()
    network_interfaces: tuple[str, ...] = ()
    fusion_threshold_mb: int | None = None
    cycle_time_ms: float | None = None
    verbose: bool = False
    srun_mpi: str = "pmix"
    ssh_port: int | None = None
    ssh_identity_file: str | None = None
    ssh_options: tuple[str, ...] = ()
    mca: tuple[str, ...] = ()
    gloo_timeout_s: int = 30
    step_timeout_s: float | None = 60.0
    elastic: bool = False
    min_num_proc: int | None = None
    max_num_proc: int | None = None
    host_discovery_script: str | None = None
    slots_per_host: int | None = None
    elastic_timeout_s: int = DEFAULT_ELASTIC_TIMEOUT_S
    reset_limit: int | None = None

    def __post_init__(self) -> None:
        check_int("-np", self.num_proc, ge=1)
        check_strings("command", self.command, "a tuple of str, program first")
        if not self.command or not self.command[0]:
            raise ValueError(
                "A command to run must follow `--`, e.g. `hvdclip-run -np 2 -- python train.py`. "
                f"Received: command={list(self.command)}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"`--backend` must be one of {', '.join(BACKENDS)}. Received: --backend={self.backend}")
        if self.controller not in (None, *CONTROLLERS):
            raise ValueError(f"`controller` must be None, 'gloo' or 'mpi'. Received: controller={self.controller!r}")
        if self.controller == "gloo" and self.backend != "horovodrun":
            # Gloo ranks find each other through horovodrun's rendezvous server; mpirun and srun have none.
            raise ValueError(f"`--gloo` needs `--backend horovodrun`. Received: --gloo with --backend={self.backend}")
        if not isinstance(self.hosts, tuple) or not all(isinstance(host, Host) for host in self.hosts):
            raise TypeError(f"`hosts` must be a tuple of Host, e.g. (Host('node1', 4),). Received: hosts={self.hosts!r}")
        refuse_repeats(list(self.hosts), [f"hosts[{i}]" for i in range(len(self.hosts))])
        if self.hosts and self.num_proc > total_slots(self.hosts):
            hosts = ",".join(map(str, self.hosts))
            raise ValueError(
                f"`-np` must be at most the {total_slots(self.hosts)} slots of the host list ({hosts}). "
                f"Received: -np={self.num_proc}"
            )
        for name in check_strings("--env", self.env):
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"`--env` takes a variable name such as NCCL_DEBUG. Received: --env={name}")
        if self.fusion_threshold_mb is not None:
            check_int("--fusion-threshold-mb", self.fusion_threshold_mb, ge=0)
        if self.cycle_time_ms is not None:
            check_number("--cycle-time-ms", self.cycle_time_ms, ge=0)
        for nic in check_strings("--network-interface", self.network_interfaces):
            if not _WORD.fullmatch(nic):
                raise ValueError(f"`--network-interface` takes interface names such as eth0. Received: --network-interface={nic!r}")
        check_bool("--verbose", self.verbose)
        if not isinstance(self.srun_mpi, str) or not _WORD.fullmatch(self.srun_mpi):
            error = ValueError if isinstance(self.srun_mpi, str) else TypeError
            raise error(f"`--srun-mpi` must be an MPI plugin name such as pmix. Received: --srun-mpi={self.srun_mpi!r}")
        if self.ssh_port is not None:
            check_int("--ssh-port", self.ssh_port, ge=1, le=65535)
        if self.ssh_identity_file is not None:
            path = self.ssh_identity_file
            if not isinstance(path, str) or not path or any(c.isspace() for c in path):
                error = ValueError if isinstance(path, str) else TypeError
                raise error(f"`--ssh-identity-file` must be a path without whitespace. Received: --ssh-identity-file={path!r}")
            _refuse_remote_shell_special("--ssh-identity-file", path)
        for flag, items, example in (("--ssh-option", self.ssh_options, "ServerAliveInterval=5"), ("--mca", self.mca, "btl_tcp_links=2")):
            for item in check_strings(flag, items):
                if not _KEY_VALUE.fullmatch(item):
                    raise ValueError(f"`{flag}` takes KEY=VALUE without spaces, such as {example}. Received: {flag}={item!r}")
                _refuse_remote_shell_special(flag, item)
        check_int("--gloo-timeout", self.gloo_timeout_s, ge=1)
        if self.step_timeout_s is not None:
            check_number("--step-timeout", self.step_timeout_s, gt=0)
        self._check_elastic()

    def _check_elastic(self) -> None:
        # Each value on its own first, then how they fit together.
        check_bool("--elastic", self.elastic)
        if self.min_num_proc is not None:
            check_int("--min-np", self.min_num_proc, ge=1)
        if self.max_num_proc is not None:
            check_int("--max-np", self.max_num_proc, ge=1)
        if self.host_discovery_script is not None:
            _check_script(self.host_discovery_script)
        if self.slots_per_host is not None:
            check_int("--slots-per-host", self.slots_per_host, ge=1)
        # Horovod reads 0 as "not given" and waits its default 600 s instead.
        check_int("--elastic-timeout", self.elastic_timeout_s, ge=1)
        if self.reset_limit is not None:
            check_int("--reset-limit", self.reset_limit, ge=0)
        if not self.elastic:
            given = [(flag, getattr(self, name)) for name, flag in _ELASTIC_ONLY if getattr(self, name) is not None]
            if self.elastic_timeout_s != DEFAULT_ELASTIC_TIMEOUT_S:
                given.append(("--elastic-timeout", self.elastic_timeout_s))
            if given:
                flag, value = given[0]
                raise ValueError(f"`{flag}` is for elastic jobs: add `--elastic`, or drop `{flag}`. Received: {flag}={value} without --elastic")
            return
        if self.backend != "horovodrun":
            # Horovod's elastic driver is part of horovodrun; mpirun and srun start a fixed set of ranks.
            raise ValueError(
                f"`--elastic` needs `--backend horovodrun` (elastic jobs run on horovodrun's Gloo driver). "
                f"Received: --elastic with --backend={self.backend}"
            )
        if self.controller == "mpi":
            raise ValueError("`--elastic` runs on Gloo, not MPI: drop `--mpi` (`--elastic` implies `--gloo`). Received: --elastic with --mpi")
        if self.hosts:
            raise ValueError(
                "`-H`/`--hostfile` cannot be used with `--elastic`, which takes its hosts from `--host-discovery-script`: "
                f"list the hosts in the discovery script instead, one `host:slots` per line. Received: hosts "
                f"{','.join(map(str, self.hosts))} with --elastic"
            )
        for name, flag in _ELASTIC_ONLY[:3]:
            if getattr(self, name) is None:
                example = "hvdclip-run --elastic --min-np 2 --max-np 4 --host-discovery-script ./discover_hosts.sh -- python train.py"
                raise ValueError(f"`--elastic` needs `{flag}`, e.g. `{example}`. Received: --elastic without {flag}")
        if self.max_num_proc < self.min_num_proc:
            raise ValueError(
                f"`--max-np` must be >= `--min-np` ({self.min_num_proc}). Received: --max-np={self.max_num_proc}"
            )
        if not self.min_num_proc <= self.num_proc <= self.max_num_proc:
            raise ValueError(
                f"`-np` of an elastic job is the number of ranks to start with: between `--min-np` ({self.min_num_proc}) "
                f"and `--max-np` ({self.max_num_proc}), or left out to start with --min-np. Received: -np={self.num_proc}"
            )

    @property
    def effective_controller(self) -> str | None:
        """The controller horovodrun runs: Gloo for an elastic job, else `controller`."""
        return "gloo" if self.elastic else self.controller

    def ssh_option_values(self) -> dict[str, str]:
        """The ssh options in effect: the defaults, then `ssh_options` (a repeated key keeps its last value)."""
        return {**dict(DEFAULT_SSH_OPTIONS), **dict(item.split("=", 1) for item in self.ssh_options)}

    def mca_values(self) -> dict[str, str]:
        """The Open MPI parameters in effect: the defaults, then `mca` (a repeated name keeps its last value)."""
        return {**dict(DEFAULT_MCA), **dict(item.split("=", 1) for item in self.mca)}


def _refuse_remote_shell_special(flag: str, value: str) -> None:
    if _REMOTE_SHELL_SPECIAL.search(value):
        raise ValueError(
            f"`{flag}` cannot contain any of \" $ ` \\: Open MPI passes it to each remote host's daemon through "
            f"a shell, unescaped. Received: {flag}={value!r}"
        )


def _check_script(path: object) -> None:
    """The discovery script must be an executable file: horovodrun runs it, every second, as a command."""
    flag = "--host-discovery-script"
    if not isinstance(path, str) or not path:
        error = ValueError if isinstance(path, str) else TypeError
        raise error(f"`{flag}` must be the path of an executable file that prints `host:slots` lines. Received: {flag}={path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"`{flag}` must be the path of an existing file. Received: {flag}={path} (no such file)")
    if not os.access(path, os.X_OK):
        raise ValueError(f"`{flag}` must be executable: run `chmod +x {path}`. Received: {flag}={path} (not executable)")
