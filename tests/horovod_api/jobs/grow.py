"""The test's lever on an elastic job: rank 0 lists a second slot, then commits until Horovod reacts.

The discovery script prints the hosts file. Rank 0 rewrites it from `localhost:1` to
`localhost:2` at a chosen step and commits (which raises `HostsUpdatedInterrupt` once Horovod's
driver has seen the change) until the interrupt arrives, so the reset happens at that step on
every run, whenever the driver looks.
"""

from __future__ import annotations

import time

GROW_BOUND_S = 120


def grow_now(hvd, state, hosts_file: str) -> None:
    """On rank 0 of a 1-rank world: list two slots, then commit until the interrupt (bounded)."""
    if hvd.size() != 1 or hvd.rank() != 0:
        return
    with open(hosts_file, "w") as listing:
        listing.write("localhost:2\n")
    deadline = time.monotonic() + GROW_BOUND_S
    while time.monotonic() < deadline:
        time.sleep(0.5)
        state.commit()  # Raises HostsUpdatedInterrupt once the driver has noticed.
    raise RuntimeError(f"Horovod's elastic driver did not report the second slot within {GROW_BOUND_S} s")
