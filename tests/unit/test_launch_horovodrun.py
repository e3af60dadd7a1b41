"""What horovodrun runs under `hvdclip-run`: every ssh setting reaches its own ssh commands and the
mpirun it starts the ranks with, read from `--dry-run`, which prints exactly those commands.

Each command line is split here by /bin/sh itself, as horovodrun has it run, and its ssh settings
are read back with `ssh -G` (ssh's own reading of a command line, no connection made): the test
checks what ssh would use, not how the words are spelt.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HVDCLIP_RUN = [sys.executable, "-m", "hvdclip.launch"]
# ssh reads an identity file only if it exists (`ssh -G` leaves out one that does not): made below.
KEY = os.path.join(tempfile.gettempdir(), f"hvdclip-test-key-{uuid.uuid4().hex[:12]}")
JOB = ["-np", "4", "-H", "node1:2,node2:2", "--ssh-port", "2222", "--ssh-identity-file", KEY]
# A path, and a value with `=` inside: each must reach ssh exactly.
OPTIONS = ["--ssh-option", "UserKnownHostsFile=/k/known_hosts", "--ssh-option", "SetEnv=HVD_NOTE=a=b"]


@pytest.fixture(autouse=True, scope="module")
def key():
    Path(KEY).write_text("not a key: ssh -G only checks that the file is there\n")
    yield KEY
    Path(KEY).unlink()


def dry_run(*argv: str, **environ: str) -> list[str]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **environ}
    result = subprocess.run([*HVDCLIP_RUN, "--dry-run", *argv], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout.splitlines()


def as_sh_splits(line: str) -> list[str]:
    """The argument vector /bin/sh makes of `line` (whose first word is replaced by a printer)."""
    printer = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    result = subprocess.run(["/bin/sh", "-c", f"{printer} {line.split(' ', 1)[1]}"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ssh_reads(ssh_args: list[str], host: str = "node2") -> dict[str, str]:
    """ssh's settings for `ssh SSH_ARGS host`, as `ssh -G` prints them (keys lower-case)."""
    result = subprocess.run(["ssh", "-G", *ssh_args, host], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    settings = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key, value)
    return settings


def mpirun_of(plan: list[str]) -> list[str]:
    (line,) = [line for line in plan if line.startswith("mpirun ")]
    assert plan[plan.index(line) - 1] == "# horovodrun starts the ranks with:"
    return as_sh_splits(line)


def plm_rsh_args(mpirun: list[str]) -> list[str]:
    """ssh's arguments as Open MPI makes them: the one `plm_rsh_args` value, split on whitespace."""
    values = [mpirun[i + 2] for i, word in enumerate(mpirun) if word == "-mca" and mpirun[i + 1] == "plm_rsh_args"]
    assert len(values) == 1, values  # Open MPI refuses a parameter given twice
    return values[0].split()


def test_mpirun_of_the_default_backend_gets_the_port_the_key_every_option_and_the_keepalives():
    plan = dry_run(*JOB, *OPTIONS, "--network-interface", "eth0", "--", "python", "train.py")
    ssh = plm_rsh_args(mpirun_of(plan))
    assert ssh == [
        "-p", "2222", "-i", KEY, "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
        "-o", "UserKnownHostsFile=/k/known_hosts", "-o", "SetEnv=HVD_NOTE=a=b",
    ]  # fmt: skip
    seen = ssh_reads(ssh)
    assert (seen["port"], seen["identityfile"], seen["userknownhostsfile"]) == ("2222", KEY, "/k/known_hosts")
    assert (seen["serveraliveinterval"], seen["serveralivecountmax"], seen["setenv"]) == ("5", "3", "HVD_NOTE=a=b")


def test_the_keepalives_reach_mpirun_without_a_port_or_key_and_the_operators_words_are_kept():
    # Without -p/-i stock horovodrun gives its mpirun no plm_rsh_args at all. A command-line
    # plm_rsh_args replaces OMPI_MCA_plm_rsh_args (the Kubeflow MPI Operator sets it): kept, after ours.
    plan = dry_run("-np", "2", "-H", "node1:1,node2:1", "--", "python", "t.py", OMPI_MCA_plm_rsh_args="-o ConnectionAttempts=10")
    assert plm_rsh_args(mpirun_of(plan)) == [
        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "ConnectionAttempts=10",
    ]  # fmt: skip


def test_horovodrun_checks_ssh_with_every_setting_and_the_users_win_over_horovods():
    # Horovod's own ssh prefix sets StrictHostKeyChecking=no; ssh keeps the first value it is given.
    plan = dry_run(*JOB, *OPTIONS, "--ssh-option", "StrictHostKeyChecking=yes", "--", "python", "t.py")
    header = plan.index("# horovodrun checks ssh to each remote host (its other ssh commands take the same options):")
    checks = [as_sh_splits(line) for line in plan[header + 1 : header + 3]]
    for host, check in zip(("node1", "node2"), checks):
        assert check[check.index(host) + 1 :] == ["-p", "2222", "-i", KEY, "-o", "ConnectTimeout=10", "true"], check
        seen = ssh_reads([arg for arg in check if arg != "true" and arg != host], host)
        assert (seen["port"], seen["identityfile"], seen["userknownhostsfile"]) == ("2222", KEY, "/k/known_hosts")
        assert (seen["serveraliveinterval"], seen["serveralivecountmax"], seen["setenv"]) == ("5", "3", "HVD_NOTE=a=b")
        assert seen["stricthostkeychecking"] == "true"


def test_mca_values_reach_horovodruns_mpirun_exactly_through_its_shell():
    # horovodrun pastes --mpi-args into a /bin/sh command line: `;`, `*` and `'` must arrive as they are.
    plan = dry_run("-np", "2", "--mca", "orte_tmpdir_base=/tmp/a;b*c", "--mca", "btl_tcp_links=2", "--", "python", "t.py")
    mpirun = mpirun_of(plan)
    mca = {mpirun[i + 1]: mpirun[i + 2] for i, word in enumerate(mpirun) if word == "-mca"}
    assert (mca["orte_tmpdir_base"], mca["btl_tcp_links"], mca["oob_tcp_keepalive_time"]) == ("/tmp/a;b*c", "2", "5")
    assert mpirun[-4:] == ["hvdclip.launch.rank", "--", "python", "t.py"]


def test_gloo_and_elastic_ranks_start_over_ssh_with_every_setting(tmp_path):
    plan = dry_run(*JOB, *OPTIONS, "--gloo", "--", "python", "t.py")
    assert "# horovodrun starts each rank itself (Gloo); on a remote host over ssh:" in plan
    assert not any(line.startswith("mpirun ") for line in plan)
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho node1:2\n")
    script.chmod(0o755)
    elastic = dry_run("--elastic", "--min-np", "2", "--max-np", "4", "--host-discovery-script", str(script),
                      "--ssh-port", "2222", "--ssh-identity-file", KEY, *OPTIONS, "--", "python", "t.py")  # fmt: skip
    assert elastic[-2].startswith("# horovodrun's elastic driver runs the discovery script")
    for line in (plan[-1], elastic[-1]):
        ssh = as_sh_splits(line)
        host = "node2" if line is plan[-1] else "HOST"
        assert ssh[-1] == "RANK-COMMAND" and ssh[ssh.index(host) + 1 : -1] == ["-p", "2222", "-i", KEY], ssh
        seen = ssh_reads([arg for arg in ssh[:-1] if arg != host], host)
        assert (seen["port"], seen["identityfile"], seen["userknownhostsfile"], seen["serveraliveinterval"]) == (
            "2222", KEY, "/k/known_hosts", "5",
        )  # fmt: skip


def test_other_mpis_keep_horovods_own_ssh_arguments(tmp_path):
    # Intel MPI and MPICH take ssh's arguments another way; they are left as Horovod gives them.
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\necho 'HYDRA build details: Version: 4.1 MPICH'\n")
    fake.chmod(0o755)
    plan = dry_run(*JOB, *OPTIONS, "--", "python", "t.py", PATH=f"{tmp_path}:{os.environ['PATH']}")
    (line,) = [line for line in plan if line.startswith("mpirun ")]
    assert "plm_rsh_args" not in line and f'-bootstrap-exec-args "-p 2222 -i {KEY}"' in line


@pytest.mark.parametrize("flags", [[], ["--gloo"]], ids=["mpi", "gloo"])
def test_the_dry_run_starts_nothing_and_leaves_no_horovod_cache(flags, tmp_path):
    plan = dry_run(*JOB, *flags, "--", "python", "t.py", HOME=str(tmp_path))
    assert plan[0].startswith(f"{sys.executable} -m hvdclip.launch.horovodrun ")
    assert not (tmp_path / ".horovod").exists()
