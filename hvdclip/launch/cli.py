"""`hvdclip-run` (also `python -m hvdclip.launch`): argument parsing and the top-level flow.

    hvdclip-run -np 8 -H node1:4,node2:4 --backend mpirun -- python train.py --epochs 3
    hvdclip-run --elastic --min-np 2 --max-np 8 --host-discovery-script ./discover_hosts.sh -- python train.py

The flow is: parse -> `LaunchSettings` -> `build_command` -> print it (`--dry-run`) or hand it to the
executor. Mistakes in the arguments and in the environment end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from hvdclip.errors import LauncherError
from hvdclip.launch.commands import build_command, default_backend, find_program
from hvdclip.launch.executor import Executor, run_job
from hvdclip.launch.hosts import parse_host_list, read_hostfile
from hvdclip.launch.settings import BACKENDS, DEFAULT_ELASTIC_TIMEOUT_S, DEFAULT_MCA, DEFAULT_SSH_OPTIONS, LaunchSettings

__all__ = ["main", "parse_args"]

USAGE_EXIT_CODE = 2
# How long the dry run of horovodrun may take (it resolves the host names).
PLAN_TIMEOUT_S = 60


class _Parser(argparse.ArgumentParser):
    """Reports mistakes by raising, so that every error reaches the user the same way."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hvdclip-run",
        description="Start a Horovod job with horovodrun, Open MPI's mpirun or Slurm's srun.",
        epilog="Example: hvdclip-run -np 8 -H node1:4,node2:4 -- python train.py",
    )
    job = parser.add_argument_group("job")
    job.add_argument(
        "-np", "--num-proc", dest="num_proc", metavar="N", help="number of ranks (elastic: to start with; default --min-np)"
    )
    job.add_argument(
        "--backend",
        choices=BACKENDS,
        help="program that starts the ranks (default: srun inside a Slurm allocation without --elastic, else horovodrun)",
    )
    job.add_argument("--timeout", metavar="S", help="stop the whole job after S seconds (exit code 124)")
    job.add_argument(
        "--dry-run", action="store_true", help="print the command (and, for horovodrun, the ssh and mpirun it would run); run nothing"
    )
    job.add_argument("--verbose", action="store_true", help="print the command before running it; horovodrun --verbose; keep the ranks' start-up logs")

    hosts = parser.add_argument_group("hosts").add_mutually_exclusive_group()
    hosts.add_argument("-H", "--hosts", metavar="HOST:N,...", help="hosts and slots, e.g. node1:4,node2:4")
    hosts.add_argument("--hostfile", metavar="FILE", help="one `host slots=N` or `host:N` per line")

    controller = parser.add_argument_group("controller (horovodrun backend)").add_mutually_exclusive_group()
    controller.add_argument("--gloo", dest="controller", action="store_const", const="gloo", help="Gloo controller")
    controller.add_argument("--mpi", dest="controller", action="store_const", const="mpi", help="MPI controller")

    comms = parser.add_argument_group("environment and communication")
    comms.add_argument(
        "--env", action="append", default=[], metavar="NAME", help="also pass variable NAME to every rank (repeatable)"
    )
    comms.add_argument(
        "--network-interface",
        dest="nics",
        action="append",
        default=[],
        metavar="NIC",
        help="network interface for Horovod and MPI traffic, e.g. eth0 (repeatable, or comma-separated)",
    )
    comms.add_argument("--fusion-threshold-mb", metavar="MB", help="Horovod tensor fusion buffer size")
    comms.add_argument("--cycle-time-ms", metavar="MS", help="Horovod tensor fusion cycle time")
    comms.add_argument("--srun-mpi", default="pmix", metavar="TYPE", help="srun --mpi plugin (default: pmix)")

    ssh = parser.add_argument_group("ssh (remote hosts; horovodrun and mpirun backends)")
    ssh.add_argument("--ssh-port", metavar="PORT", help="port of sshd on every host")
    ssh.add_argument("--ssh-identity-file", metavar="FILE", help="private key for ssh")
    ssh.add_argument(
        "--ssh-option",
        dest="ssh_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ssh option for every host, e.g. UserKnownHostsFile=/path (repeatable; overrides the defaults "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_SSH_OPTIONS)
        + ")",
    )

    failure = parser.add_argument_group("failure detection: every wait is bounded (see docs/launching.md)")
    failure.add_argument(
        "--mca",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an Open MPI parameter (repeatable; overrides the defaults "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_MCA)
        + ")",
    )
    failure.add_argument(
        "--gloo-timeout", metavar="S", help="seconds Gloo waits for a peer (HOROVOD_GLOO_TIMEOUT_SECONDS; default 30)"
    )
    failure.add_argument(
        "--step-timeout",
        metavar="S",
        help="seconds a training step or collective may take before the rank ends itself "
        "(HVDCLIP_STEP_TIMEOUT; default 60; `off` disables)",
    )

    elastic = parser.add_argument_group("elastic jobs (horovodrun with Gloo; see docs/launching.md and docs/elastic.md)")
    elastic.add_argument(
        "--elastic", action="store_true", help="ranks come and go with the hosts the discovery script lists (implies --gloo)"
    )
    elastic.add_argument("--min-np", "--min-num-proc", dest="min_np", metavar="N", help="fewest ranks to train with")
    elastic.add_argument("--max-np", "--max-num-proc", dest="max_np", metavar="N", help="most ranks to run")
    elastic.add_argument(
        "--host-discovery-script",
        metavar="FILE",
        help="executable printing one `host:slots` line per available host; horovodrun runs it every second",
    )
    elastic.add_argument("--slots-per-host", metavar="N", help="slots of a host the script prints without `:slots`")
    elastic.add_argument(
        "--elastic-timeout",
        metavar="S",
        help=f"seconds to wait for enough slots, at the start and after each change of hosts (default {DEFAULT_ELASTIC_TIMEOUT_S})",
    )
    elastic.add_argument(
        "--reset-limit", metavar="N", help="times the job may re-form after a change of hosts before it fails (default: no limit)"
    )

    parser.add_argument("command", nargs=argparse.REMAINDER, help="after `--`: the program each rank runs")
    return parser


def _number(flag: str, text: str | None, kind: type, what: str) -> int | float | None:
    """Converts a flag's text; the range is checked by `LaunchSettings`."""
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"`{flag}` must be {what}. Received: {flag}={text}") from None


def _elastic_options(args: argparse.Namespace) -> dict:
    """`LaunchSettings` keywords of the elastic flags; an elastic flag without `--elastic` is refused."""
    timeout = _number("--elastic-timeout", args.elastic_timeout, int, "an integer >= 1")
    script = args.host_discovery_script
    options = {
        "elastic": args.elastic,
        "min_num_proc": _number("--min-np", args.min_np, int, "an integer >= 1"),
        "max_num_proc": _number("--max-np", args.max_np, int, "an integer >= 1"),
        # Absolute: horovodrun hands it to a shell, which would look a bare name up on PATH.
        "host_discovery_script": os.path.abspath(script) if script else script,
        "slots_per_host": _number("--slots-per-host", args.slots_per_host, int, "an integer >= 1"),
        "elastic_timeout_s": DEFAULT_ELASTIC_TIMEOUT_S if timeout is None else timeout,
        "reset_limit": _number("--reset-limit", args.reset_limit, int, "an integer >= 0"),
    }
    if not args.elastic:
        # LaunchSettings cannot tell an --elastic-timeout given as 600 from the default, so the check is here too.
        for flag in ("--min-np", "--max-np", "--host-discovery-script", "--slots-per-host", "--elastic-timeout", "--reset-limit"):
            value = getattr(args, flag[2:].replace("-", "_"))
            if value is not None:
                raise ValueError(f"`{flag}` is for elastic jobs: add `--elastic`, or drop `{flag}`. Received: {flag}={value} without --elastic")
    return options


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[LaunchSettings, argparse.Namespace]:
    """Parses a command line into `LaunchSettings` plus the options that are not part of the command.

    Raises:
        ValueError: a bad argument; the message names it and the value received.
    """
    args = _parser().parse_args(list(argv))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.elastic and (args.hosts is not None or args.hostfile is not None):
        flag, value = ("-H", args.hosts) if args.hosts is not None else ("--hostfile", args.hostfile)
        raise ValueError(
            f"`{flag}` cannot be used with `--elastic`, which takes its hosts from `--host-discovery-script`: list the "
            f"hosts in the discovery script instead, one `host:slots` per line. Received: {flag}={value} with --elastic"
        )
    elastic = _elastic_options(args)
    num_proc = _number("-np", args.num_proc, int, "an integer >= 1")
    if num_proc is None:
        if not args.elastic:
            raise ValueError("the following arguments are required: -np/--num-proc")
        # horovodrun needs -np; an elastic job starts with its minimum (LaunchSettings says if that is missing).
        num_proc = elastic["min_num_proc"] or 1
    hosts = ()
    if args.hosts is not None:
        hosts = parse_host_list(args.hosts)
    elif args.hostfile is not None:
        hosts = read_hostfile(args.hostfile)
    args.timeout = _number("--timeout", args.timeout, float, "a number of seconds > 0")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"`--timeout` must be a number of seconds > 0. Received: --timeout={args.timeout:g}")
    step_timeout = 60.0
    if args.step_timeout is not None:
        text = args.step_timeout
        step_timeout = None if text.lower() == "off" else _number("--step-timeout", text, float, "a number of seconds > 0 or `off`")
    gloo_timeout = _number("--gloo-timeout", args.gloo_timeout, int, "an integer >= 1")
    settings = LaunchSettings(
        num_proc=num_proc,
        command=tuple(command),
        # Elastic jobs exist only under horovodrun, also inside a Slurm allocation.
        backend=args.backend or ("horovodrun" if args.elastic else default_backend(environ)),
        hosts=hosts,
        controller=args.controller,
        env=tuple(args.env),
        network_interfaces=tuple(nic for group in args.nics for nic in group.split(",") if nic),
        fusion_threshold_mb=_number("--fusion-threshold-mb", args.fusion_threshold_mb, int, "an integer >= 0"),
        cycle_time_ms=_number("--cycle-time-ms", args.cycle_time_ms, float, "a number >= 0"),
        verbose=args.verbose,
        srun_mpi=args.srun_mpi,
        ssh_port=_number("--ssh-port", args.ssh_port, int, "an integer >= 1 and <= 65535"),
        ssh_identity_file=args.ssh_identity_file,
        ssh_options=tuple(args.ssh_options),
        mca=tuple(args.mca),
        gloo_timeout_s=30 if gloo_timeout is None else gloo_timeout,
        step_timeout_s=step_timeout,
        **elastic,
    )
    return settings, args


def _horovodrun_plan(command: Sequence[str], environ: Mapping[str, str], timeout_s: float = PLAN_TIMEOUT_S) -> str:
    """What horovodrun would run for `command` (a `python -m hvdclip.launch.horovodrun ...` list),
    as printed by its `--dry-run`: `#` comment lines and shell command lines, or one comment saying
    why they cannot be shown.

    It runs the same program with the same environment, with `--dry-run` after the module name.
    """
    # Not imported from hvdclip.launch.horovodrun: that module is run with `python -m`.
    argv = [*command[:3], "--dry-run", *command[3:]]
    try:
        result = subprocess.run(argv, env=dict(environ), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"# horovodrun's own commands cannot be shown: its dry run took longer than the {timeout_s:g} s bound\n"
    except OSError as err:
        return f"# horovodrun's own commands cannot be shown: {command[0]}: {err.strerror}\n"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
        return f"# horovodrun's own commands cannot be shown: {lines[-1]}\n"
    return result.stdout


def _require_horovod() -> None:
    # find_spec of a top-level package reads no module: Horovod's (and TensorFlow's) import stays for the ranks.
    if importlib.util.find_spec("horovod") is None:
        raise LauncherError(
            f"Horovod is not installed in {sys.executable}, which runs horovodrun: install it (`make install` in "
            "the hvdclip repo builds it with TensorFlow) or use `--backend mpirun`."
        )


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    executor: Executor = run_job,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Runs `hvdclip-run` and returns its exit code: the job's, or 2 for a usage or environment error.

    Args:
        argv: the arguments after the program name; defaults to `sys.argv[1:]`.
        environ: the environment to launch with; defaults to `os.environ`.
        executor: runs the built command; tests pass a fake.
        stdout: where `--dry-run` prints the command; defaults to `sys.stdout`.
        stderr: where errors go; defaults to `sys.stderr`.
    """
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ if environ is None else environ)
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        settings, args = parse_args(argv, environ)
        command = build_command(settings, environ, as_root=os.geteuid() == 0, python=sys.executable)
        try:
            if settings.backend == "horovodrun":
                _require_horovod()
            else:
                command[0] = find_program(command[0], environ)
        except LauncherError:
            if not args.dry_run:
                raise
    except (ValueError, TypeError, LauncherError) as err:
        print(f"hvdclip-run: error: {err}", file=stderr)
        return USAGE_EXIT_CODE
    if args.dry_run:
        print(shlex.join(command), file=stdout)
        if settings.backend == "horovodrun":
            # Then what horovodrun itself would run: its ssh check, and the mpirun that starts the ranks.
            print(_horovodrun_plan(command, environ), file=stdout, end="")
        return 0
    if args.verbose:
        print(f"hvdclip-run: {shlex.join(command)}", file=stderr, flush=True)
    return executor(command, environ, args.timeout)
