"""`LaunchSettings`: everything a launch command is built from, checked once when it is created."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hvdclip.launch.hosts import Host, _refuse_repeats, total_slots
from hvdclip.validation import check_bool, check_int, check_number, check_strings

__all__ = ["BACKENDS", "CONTROLLERS", "LaunchSettings"]

BACKENDS = ("horovodrun", "mpirun", "srun")
CONTROLLERS = ("gloo", "mpi")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"[^\s,]+")  # A network interface or srun MPI plugin name: one word, no list.


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

    Example:
        >>> LaunchSettings(num_proc=2, command=("python", "train.py"), backend="mpirun")
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
        _refuse_repeats(list(self.hosts), [f"hosts[{i}]" for i in range(len(self.hosts))])
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
