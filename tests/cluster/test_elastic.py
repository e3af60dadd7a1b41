"""An elastic `fit` across 3 hosts x 1 slot (Gloo): the rank on h3 dies, training continues on 2 ranks from
the last commit, h4 joins through discovery and the job grows back to 3; then the same run replayed as
ordinary jobs restored from checkpoints at the same steps and sizes must give the same weights, bit for bit."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HVDCLIP_RUN = str(Path(sys.executable).parent / "hvdclip-run")
JOB = str(Path(__file__).resolve().parent / "ranks" / "elastic_job.py")
sys.path.insert(0, str(Path(JOB).parent))
from elastic_job import COMMIT_EVERY  # noqa: E402

from hvdclip.launch.settings import DEFAULT_SSH_OPTIONS  # noqa: E402

KILL_STEP = 27  # In epoch 1 (22 steps per epoch on 3 ranks), 3 steps after the commit at step 24.
JOB_TIMEOUT_S = 600


def discovery(tmp_path: Path, hosts: list[str]) -> tuple[Path, Path]:
    listing = tmp_path / "hosts.txt"
    listing.write_text("".join(f"{host}:1\n" for host in hosts))
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {listing}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, listing


def ends(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out.glob("end.*.json")), key=lambda e: e["rank"])


def steps(out: Path) -> dict[int, list[tuple[str, int, int, list[int]]]]:
    """Global step -> every record of it: (host, size, rank, weight checksum); a redone step appears twice."""
    by_step: dict[int, list] = {}
    for path in out.glob("steps.*"):
        host = path.name.split(".")[1]
        for line in path.read_text().splitlines():
            step, size, rank, digest = json.loads(line)
            by_step.setdefault(step, []).append((host, size, rank, digest))
    return by_step


def final_weights(out: Path) -> list[np.ndarray]:
    with np.load(out / "final.npz") as data:
        return [data[key] for key in sorted(data.files, key=lambda k: int(k.split("_")[1]))]


@contextlib.contextmanager
def watching_ssh(cluster, host: str, every_s: float = 0.5):
    """Yields a list that collects, while the block runs, each ssh client seen on `host` (its argv)."""
    seen: list[list[str]] = []
    stop = threading.Event()

    def watch():
        while not stop.wait(every_s):
            seen.extend(argv for argv in cluster.ssh_clients(host) if argv not in seen)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join(timeout=10)


def run(cluster, argv: list[str]) -> subprocess.CompletedProcess:
    return cluster.run("h1", argv, timeout=JOB_TIMEOUT_S, cwd=REPO)


def phase(cluster, out: Path, hosts: list[str], *restore: str) -> None:
    """One reference phase: an ordinary (non-elastic) job on `hosts`, checkpointing every commit step."""
    out.mkdir()
    argv = [HVDCLIP_RUN, "-np", str(len(hosts)), "-H", ",".join(f"{h}:1" for h in hosts), *cluster.ssh_flags(),
            "--gloo", "--timeout", "300", "--", PYTHON, JOB, "phase", str(out), str(out / "ckpts"), *restore]  # fmt: skip
    result = run(cluster, argv)
    assert result.returncode == 0, result.stderr[-5000:]


def test_an_elastic_job_loses_a_host_keeps_training_and_grows_back_exactly(hosts, tmp_path):
    script, listing = discovery(tmp_path, ["h1", "h2", "h3"])
    out = tmp_path / "elastic"
    out.mkdir()
    argv = [HVDCLIP_RUN, "--elastic", "--min-np", "2", "--max-np", "3", "-np", "3", "--host-discovery-script",
            str(script), "--elastic-timeout", "120", *hosts.ssh_flags(), "--timeout", "500", "--",
            PYTHON, JOB, "elastic", str(out), str(listing), "h3", str(KILL_STEP), "h4", uuid.uuid4().hex]  # fmt: skip
    with watching_ssh(hosts, "h1") as clients:
        result = run(hosts, argv)
    assert result.returncode == 0, result.stderr[-6000:]
    # Every ssh the elastic driver started from h1 (to h2, h3 and the newcomer h4) had every setting.
    assert {argv[argv.index("-p") - 1] for argv in clients} >= {"h2", "h3", "h4"}, clients
    assert [hosts.missing_ssh_settings(ssh, dict(DEFAULT_SSH_OPTIONS)) for ssh in clients] == [[]] * len(clients), clients

    # Every rank of the final world (h1, h2 and the newcomer h4) finished with the same weights.
    final = ends(out)
    assert sorted(e["host"] for e in final) == ["h1", "h2", "h4"], final
    assert all(e["size"] == 3 and e["checksum"] == final[0]["checksum"] for e in final), final
    assert len({e["global_step"] for e in final}) == 1

    # Two resets on the ranks that lived through both: the failure (back to the last commit before
    # the kill), then the growth at a later commit.
    survivor = next(e for e in final if e["host"] == "h1")
    (failure, growth) = survivor["resets"]
    lost_commit = KILL_STEP - KILL_STEP % COMMIT_EVERY
    assert (failure[1], failure[2], failure[3]) == (3, 2, lost_commit), failure
    assert (growth[1], growth[2]) == (2, 3) and growth[3] > lost_commit, growth
    assert "hosts changed" in growth[0]
    for e in final:
        if e["resets"]:  # The reset times each surviving rank measured (the newcomer had none).
            print(f"{e['host']}: reset after the failure {e['resets'][0][4]:.1f} s, to grow {e['resets'][1][4]:.1f} s; "
                  f"{e['commits']} commits")

    # Step by step, every rank holds the same weights, the newcomer from its first step on.
    by_step = steps(out)
    grown_at = growth[3]
    first_on_h4 = min(step for step, records in by_step.items() if any(r[0] == "h4" for r in records))
    assert first_on_h4 == grown_at + 1
    for step in range(lost_commit + 1, final[0]["global_step"] + 1):
        latest = [r for r in by_step[step] if r[1] == (2 if step <= grown_at else 3)]
        assert len(latest) == (2 if step <= grown_at else 3), (step, by_step[step])
        assert all(r[3] == latest[0][3] for r in latest), (step, latest)
    assert {r[0] for r in by_step[grown_at + 1]} == {"h1", "h2", "h4"}

    # Nothing of the job is left on any host (h3's rank died; the others exited).
    for host in hosts.hosts:
        assert hosts.job_pids(host) == [], (host, hosts.job_pids(host))

    # The reference replays the same commits and sizes with ordinary jobs: 3 ranks from the start,
    # 2 ranks restored from the checkpoint of the lost commit, then 3 restored from the growth's.
    phase(hosts, tmp_path / "ref1", ["h1", "h2", "h3"])
    phase(hosts, tmp_path / "ref2", ["h1", "h2"], str(tmp_path / "ref1" / "ckpts" / f"ckpt-{lost_commit}"), "3")
    phase(hosts, tmp_path / "ref3", ["h1", "h2", "h3"], str(tmp_path / "ref2" / "ckpts" / f"ckpt-{grown_at}"), "2")
    for a, b in zip(final_weights(out), final_weights(tmp_path / "ref3")):
        assert np.array_equal(a, b), "the elastic run must equal the replay of its commits and sizes"
