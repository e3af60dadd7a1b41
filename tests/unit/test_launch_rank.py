"""Each rank's set-up (`python -m hvdclip.launch.rank`) and horovodrun's quick start
(`python -m hvdclip.launch.horovodrun`): thread limits, quiet start-up, and no TensorFlow in the launcher."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvdclip.launch.horovodrun import split_own_options
from hvdclip.launch.rank import NOISE, THREAD_VARIABLES, YIELD_VARIABLE, thread_limits

REPO = Path(__file__).resolve().parents[2]
# What TensorFlow 2.21 writes on import and on its first op (tests/launcher shows it per rank).
STARTUP_NOISE = textwrap.dedent(
    """\
    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1795846787.815525   19888 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
    I0000 00:00:1795846787.961750   19888 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
    To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
    """
)
KEPT = "W0000 00:00:1795846787.9 19888 op.cc:1] a real warning\nTraceback (most recent call last):\nI am a user's line\n"


FILLED = {**{name: "1" for name in THREAD_VARIABLES}, YIELD_VARIABLE: "1"}


@pytest.mark.parametrize(
    "environ, cores, expected",
    [
        ({"HOROVOD_LOCAL_SIZE": "8"}, 2, FILLED),
        ({"HOROVOD_LOCAL_SIZE": "2"}, 2, FILLED),  # as many ranks as cores: no core left for Horovod's thread
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4, FILLED),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 16, {}),  # enough cores: TensorFlow's own choice stands
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3", "OMP_NUM_THREADS": "2"}, 8, {}),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMP_NUM_THREADS": "3"}, 2,
         {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", YIELD_VARIABLE: "1"}),
        ({"HOROVOD_LOCAL_SIZE": "2", YIELD_VARIABLE: "0"}, 2, {name: "1" for name in THREAD_VARIABLES}),
        ({"HOROVOD_LOCAL_SIZE": "3"}, 8, {}),
        ({"HOROVOD_LOCAL_SIZE": "5"}, 4, FILLED),
        ({"HOROVOD_LOCAL_SIZE": "1"}, 1, {}),  # one rank has nobody to share with
        ({}, 1, {}),  # no launcher told us how many ranks share the host
    ],
)  # fmt: skip
def test_thread_limits_only_when_ranks_fill_the_cores_and_never_over_the_users(environ, cores, expected):
    assert thread_limits(environ, cores) == expected


def rank(env, *command, verbose=False):
    argv = [sys.executable, "-m", "hvdclip.launch.rank", *(["--verbose"] if verbose else []), "--", *command]
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_rank_zero_says_once_that_threads_are_limited_and_the_command_sees_the_limits():
    show = [sys.executable, "-c", "import os; print(*(os.environ.get(n) for n in ('OMP_NUM_THREADS', 'TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS')))"]
    cores = len(os.sched_getaffinity(0))
    crowd = str(cores * 4)
    zero = rank({"HOROVOD_RANK": "0", "HOROVOD_LOCAL_SIZE": crowd}, *show)
    assert zero.stdout == "1 1 1\n"
    assert zero.stderr == (
        f"hvdclip-run: {crowd} ranks share {cores} cores on this host; each rank runs with OMP_NUM_THREADS=1 "
        "TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1 (set them yourself "
        "to choose otherwise).\n"
    )
    other = rank({"HOROVOD_RANK": "1", "HOROVOD_LOCAL_SIZE": crowd, "OMP_NUM_THREADS": "4"}, *show)
    assert (other.stdout, other.stderr) == ("4 1 1\n", "")


def test_startup_noise_is_dropped_and_everything_else_kept_in_order():
    write = [sys.executable, "-c", f"import sys; sys.stderr.write({STARTUP_NOISE + KEPT + STARTUP_NOISE!r}); sys.exit(3)"]
    quiet = rank({}, *write)
    assert (quiet.returncode, quiet.stderr) == (3, KEPT)
    assert NOISE.sub(b"", (STARTUP_NOISE + KEPT).encode()) == KEPT.encode()


@pytest.mark.parametrize("env, verbose", [({}, True), ({"HVDCLIP_STARTUP_LOGS": "1"}, False)])
def test_verbose_or_the_variable_keeps_the_startup_logs(env, verbose):
    write = [sys.executable, "-c", f"import sys; sys.stderr.write({STARTUP_NOISE!r})"]
    assert rank(env, *write, verbose=verbose).stderr == STARTUP_NOISE


def test_the_rank_becomes_the_command():
    # exec, not a child: the launcher's signals and the exit status are the command's own.
    argv = [sys.executable, "-m", "hvdclip.launch.rank", "--", sys.executable, "-c", "import os, sys; print(os.getpid()); sys.exit(7)"]
    proc = subprocess.Popen(argv, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert (int(out), proc.returncode) == (proc.pid, 7)


def test_a_missing_program_is_named():
    result = rank({}, "/no/such/program")
    assert result.returncode == 127
    assert result.stderr == "hvdclip-run: cannot run '/no/such/program' on this rank: No such file or directory\n"


def test_horovodrun_entry_takes_its_own_leading_options_only():
    argv = ["--ssh-option", "Port=22", "--env", "A=1=2", "-np", "2", "python", "t.py", "--env", "B=2"]
    assert split_own_options(argv) == ({"Port": "22"}, {"A": "1=2"}, ["-np", "2", "python", "t.py", "--env", "B=2"])
    with pytest.raises(ValueError, match=r"^`--env` takes KEY=VALUE\. Received: --env=A$"):
        split_own_options(["--env", "A", "-np", "2"])


def test_horovodrun_starts_ranks_without_importing_tensorflow(tmp_path):
    # Stock horovodrun imports TensorFlow (in forked children) before it starts a rank: 10-12 s.
    probe = textwrap.dedent(
        f"""\
        import sys
        from hvdclip.launch import horovodrun
        horovodrun.main(["--env", "PROBE=seen", "-np", "1", "--gloo", sys.executable, "-c",
                         "import os; open({str(tmp_path / 'ran')!r}, 'w').write(os.environ['PROBE'])"])
        print(sorted(name for name in sys.modules if name.split('.')[0] in ('tensorflow', 'keras')))
        """
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for attempt in ("probes the build", "reads the cached answer"):
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{attempt}: {result.stderr[-3000:]}"
        assert result.stdout.splitlines()[-1] == "[]", attempt
        assert (tmp_path / "ran").read_text() == "seen"
        assert [p.name.startswith("horovod-build-") for p in (tmp_path / "cache" / "hvdclip").iterdir()] == [True]


def test_horovodrun_entry_runs_an_elastic_job_with_its_build_answers_and_ssh_options(tmp_path):
    # horovodrun's elastic path (`_run_elastic`) asks `gloo_built` too: the entry's answer must be the
    # one it gets, never the stock check that forks a TensorFlow import. Stock is made to fail here.
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho localhost:1\n")
    script.chmod(0o755)
    probe = textwrap.dedent(
        f"""\
        import sys
        import horovod.common.util
        def stock_check(*args, **kwargs):
            raise SystemExit("horovodrun called the stock build check")
        horovod.common.util._check_extension_lambda = stock_check
        from hvdclip.launch import horovodrun
        from horovod.runner.util import remote
        horovodrun.main(["--ssh-option", "ServerAliveInterval=5", "--env", "PROBE=seen", "-np", "1", "--gloo",
                         "--min-np", "1", "--max-np", "1", "--host-discovery-script", {str(script)!r},
                         "--elastic-timeout", "30", "--network-interfaces", "lo", sys.executable, "-c",
                         "import os; open({str(tmp_path / 'ran')!r}, 'w').write(os.environ['PROBE'] + os.environ['HOROVOD_ELASTIC'])"])
        print(remote.SSH_COMMAND_PREFIX)
        """
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ran").read_text() == "seen1"
    # hvdclip's options first: ssh keeps the first value of each setting.
    assert result.stdout.splitlines()[-1] == "ssh -o ServerAliveInterval=5 -o PasswordAuthentication=no -o StrictHostKeyChecking=no"
