"""A TensorFlow-free stand-in for a rank, for tests of how the launcher stops jobs.

    behave.py MODE DIR MARKER

MODE `fail`: rank 1 exits with status 3 as soon as rank 0 is up (so the test sees both ranks start and
the launcher's reaction to the failure, never a race with rank 0's start); the others wait as if
blocked in a collective.
MODE `wait`: every rank waits; a SIGINT or SIGTERM is recorded in DIR/signal.<rank> before exiting.
Each rank writes DIR/ready.<rank> when it is up. MARKER only tags the command line, so the test can
find any rank still running afterwards.
"""

import os
import signal
import sys
import time
from pathlib import Path

# Each launcher names the rank differently: horovodrun, Open MPI (mpirun or srun+PMIx), Slurm.
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def rank() -> int:
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    raise SystemExit(f"behave.py: none of {RANK_VARIABLES} is set; start me with a launcher")


def main() -> None:
    mode, directory = sys.argv[1], Path(sys.argv[2])
    me = rank()

    def record(signum, frame):
        (directory / f"signal.{me}").write_text(signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, record)
    signal.signal(signal.SIGINT, record)
    (directory / f"ready.{me}").write_text(str(os.getpid()))
    if mode == "fail" and me == 1:
        deadline = time.monotonic() + 60
        while not (directory / "ready.0").exists():
            if time.monotonic() > deadline:
                raise SystemExit("behave.py: rank 0 did not write ready.0 within 60 s")
            time.sleep(0.05)
        raise SystemExit(3)
    time.sleep(300)
    raise SystemExit(f"behave.py: rank {me} was never stopped")


if __name__ == "__main__":
    main()
