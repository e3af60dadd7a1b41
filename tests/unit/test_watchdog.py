"""The rank-side watchdog: an overrunning section ends the process with a message naming it and the
bound; sections that finish in time, and a disarmed watchdog, change nothing."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hvdclip.distributed.watchdog import DEFAULT_TIMEOUT_S, EXIT_CODE, ENV_VAR, Watchdog, timeout_from_env

REPO = Path(__file__).resolve().parents[2]


# The module imports nothing of hvdclip's, so the subprocesses load it by path: no TensorFlow start-up.
LOAD = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("watchdog", {str(REPO / "hvdclip" / "distributed" / "watchdog.py")!r})
watchdog_module = sys.modules["watchdog"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(watchdog_module)
"""


def run_python(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOAD + textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})},
    )  # fmt: skip


def test_an_overrunning_section_ends_the_process_with_a_message_naming_it_and_the_bound():
    start = time.monotonic()
    result = run_python(
        """
        import time
        from watchdog import Watchdog
        with Watchdog(0.5).section("step 17"):
            time.sleep(30)
        print("not reached")
        """,
        env={"HOROVOD_RANK": "3"},
    )
    elapsed = time.monotonic() - start
    assert result.returncode == EXIT_CODE, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"hvdclip watchdog: step 17 did not complete within 0.5 s ({ENV_VAR}); ending rank 3 on "
    ), result.stderr
    assert f"set {ENV_VAR}=off to debug" in result.stderr
    assert elapsed < 20, f"the watchdog took {elapsed:.1f} s to end a section bounded at 0.5 s"


def test_the_bound_comes_from_the_environment_and_off_disarms_it():
    code = """
        import time
        from watchdog import default_watchdog
        with default_watchdog().section("epoch 0 metric means"):
            time.sleep(1.5)
        print("finished")
        """
    fired = run_python(code, env={ENV_VAR: "0.3"})
    assert fired.returncode == EXIT_CODE
    assert "epoch 0 metric means did not complete within 0.3 s" in fired.stderr
    off = run_python(code, env={ENV_VAR: "off"})
    assert (off.returncode, off.stdout, off.stderr) == (0, "finished\n", "")


def test_sections_that_finish_in_time_leave_the_process_alone():
    result = run_python(
        """
        import time
        from watchdog import Watchdog
        watchdog = Watchdog(0.4)
        for i in range(8):  # 8 x 0.2 s: longer than the bound in all, each section well within it
            with watchdog.section(f"step {i}"):
                time.sleep(0.2)
        try:
            with watchdog.section("a failing step"):
                raise KeyError("boom")
        except KeyError:
            pass
        time.sleep(1.0)  # nothing armed: the thread must not fire for the section that raised
        print("finished")
        """
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "finished\n", "")


def test_a_section_may_have_its_own_shorter_bound():
    result = run_python(
        """
        import time
        from watchdog import Watchdog
        watchdog = Watchdog(60)
        with watchdog.section("start-up broadcast"):
            with watchdog.section("checksum allgather", timeout_s=0.3):
                time.sleep(30)
        """
    )
    assert result.returncode == EXIT_CODE
    assert "checksum allgather did not complete within 0.3 s" in result.stderr


def test_a_disarmed_watchdog_starts_no_thread_and_its_sections_cost_nothing():
    watchdog = Watchdog(None)
    assert not watchdog.armed
    assert watchdog.section("a") is watchdog.section("b")  # one shared no-op
    start = time.perf_counter()
    for _ in range(100_000):
        with watchdog.section("step"):
            pass
    per_section = (time.perf_counter() - start) / 100_000
    assert watchdog._thread is None
    assert per_section < 5e-6, f"a disarmed section took {per_section * 1e6:.2f} us"


def test_an_armed_section_costs_microseconds():
    watchdog = Watchdog(60)
    start = time.perf_counter()
    for _ in range(20_000):
        with watchdog.section("step"):
            pass
    per_section = (time.perf_counter() - start) / 20_000
    assert per_section < 1e-4, f"an armed section took {per_section * 1e6:.1f} us"


@pytest.mark.parametrize(
    "text, expected",
    [(None, DEFAULT_TIMEOUT_S), ("", DEFAULT_TIMEOUT_S), ("60", 60.0), ("2.5", 2.5), ("off", None), ("OFF", None), ("0", None)],
)
def test_timeout_from_env(text, expected):
    assert timeout_from_env({} if text is None else {ENV_VAR: text}) == expected


@pytest.mark.parametrize("text", ["-1", "soon", "inf", "nan"])
def test_a_bad_bound_in_the_environment_is_named(text):
    with pytest.raises(ValueError, match=rf"^`{ENV_VAR}` must be a number of seconds > 0, or `off`\. Received: {ENV_VAR}={text}$"):
        timeout_from_env({ENV_VAR: text})


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1.0, ValueError), ("60", TypeError), (True, TypeError)]
)
def test_a_bad_bound_argument_is_named(bad, error):
    with pytest.raises(error, match=rf"^`timeout_s` must be a number of seconds > 0, or None\. Received: timeout_s={bad!r}$"):
        Watchdog(bad)


def test_a_compiling_section_gets_ten_times_the_bound_and_says_so():
    result = run_python(
        """
        import time
        from watchdog import Watchdog
        watchdog = Watchdog(0.05)
        with watchdog.section("step 1", compiling=True):
            time.sleep(0.3)  # 6 x the bound: allowed while compiling
        with watchdog.section("step 2", compiling=True):
            time.sleep(30)
        """
    )
    assert result.returncode == EXIT_CODE
    assert f"step 2 did not complete within 0.5 s (10 x {ENV_VAR}, as the first step compiles)" in result.stderr


# ------------------------------------------------------------------ markers of compiled steps


def test_a_compiled_step_stuck_in_its_marked_collective_ends_the_process_naming_its_step():
    """A marker stays entered (a peer never answers): the thread's reads see it and end the process."""
    start = time.monotonic()
    result = run_python(
        """
        import time
        import tensorflow as tf
        from watchdog import Watchdog
        marker = Watchdog(0.5).marker("the gradient allreduce")
        marker.compiling_entry = 0  # No entry gets the compile allowance.

        @tf.function
        def stuck(step):
            marker.enter(step)  # and never leave: what a lost peer does to the allreduce
            return step

        stuck(tf.constant(17, tf.int64))
        time.sleep(30)
        print("not reached")
        """,
        env={"HOROVOD_RANK": "1", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    elapsed = time.monotonic() - start
    assert result.returncode == EXIT_CODE, result.stderr[-2000:]
    assert "not reached" not in result.stdout
    assert f"hvdclip watchdog: the gradient allreduce of optimizer step 17 did not complete within 0.5 s ({ENV_VAR})" in result.stderr
    assert elapsed < 25


def test_steps_that_leave_their_marker_are_left_alone_and_the_first_entry_gets_the_compile_bound():
    result = run_python(
        """
        import time
        import tensorflow as tf
        from watchdog import COMPILE_FACTOR, Watchdog
        marker = Watchdog(0.4).marker("the gradient allreduce")

        @tf.function
        def step(n):
            with tf.control_dependencies([marker.enter(n)]):
                x = tf.identity(n)
            return marker.leave(x, n)

        @tf.function
        def slow_first(n):
            marker.enter(n)
            return n

        slow_first(tf.constant(1, tf.int64))  # Open for 1.5 s: beyond the bound, within 10 x the bound.
        time.sleep(1.5)
        step(tf.constant(1, tf.int64))
        for n in range(2, 40):  # Many short steps, and idle time between them: nothing fires.
            step(tf.constant(n, tf.int64))
            time.sleep(0.05)
        time.sleep(1.0)
        print("alive", marker.read())
        """,
        env={"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "alive (0, 39)"


def test_a_disarmed_watchdog_makes_no_marker():
    assert Watchdog(None).marker("the gradient allreduce") is None


def test_a_later_entry_stuck_gets_the_plain_bound_even_if_no_earlier_entry_was_seen_open():
    """Fast steps close their entries between the thread's reads: the bound still goes by entry number."""
    result = run_python(
        """
        import time
        import tensorflow as tf
        from watchdog import Watchdog
        marker = Watchdog(0.5).marker("the gradient allreduce")

        @tf.function
        def step(n):
            with tf.control_dependencies([marker.enter(n)]):
                x = tf.identity(n)
            return marker.leave(x, n)

        for n in range(1, 6):
            step(tf.constant(n, tf.int64))  # Entries 1..5, each closed within microseconds.
        marker.enter(tf.constant(6, tf.int64))  # Entry 6 stays open (eagerly: the write happens now).
        time.sleep(30)
        print("not reached")
        """,
        env={"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == EXIT_CODE, result.stderr[-2000:]
    assert "of optimizer step 6 did not complete within 0.5 s (HVDCLIP_STEP_TIMEOUT)" in result.stderr
