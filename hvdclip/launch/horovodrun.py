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
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hvdclip import foreign

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = argv[:1] == [_DRY_RUN]
    try:
        ssh_options, env, horovodrun_args = split_own_options(argv[1:] if dry_run else argv)
    except ValueError as err:
        print(f"hvdclip-run: error: {err}", file=sys.stderr)
        return 2
    run_horovodrun = foreign.horovodrun()
    flags = build_flags()
    if flags is not None:
        foreign.answer_horovodrun_build_checks(flags)
    foreign.add_horovodrun_ssh_options(ssh_options)
    foreign.give_horovodrun_mpirun_every_ssh_option(ssh_options)
    if dry_run:
        foreign.print_instead_of_running_horovodrun()
        # Its cache (~/.horovod) only remembers checks, which the dry run does not make: write none.
        horovodrun_args = ["--disable-cache", *horovodrun_args]
    os.environ.update(env)
    sys.argv = ["horovodrun", *horovodrun_args]
    run_horovodrun()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
