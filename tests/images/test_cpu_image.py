"""The CPU image, run for real with podman: what it is, the 2-rank demo, and the two-node recipe of
docs/docker.md across two containers on a network of the test's own."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from image_support import podman, wait_for_sshd


def test_image_runs_unprivileged_under_tini(image):
    config = json.loads(podman("image", "inspect", image, timeout=60).stdout)[0]["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["/usr/bin/tini", "-g", "--"]
    out = podman("run", "--rm", "--network", "none", image, "id", "-un", timeout=120).stdout
    assert out.strip() == "hvd"


def test_check_build_in_the_image_lists_tensorflow_mpi_and_gloo(image):
    out = podman("run", "--rm", "--network", "none", image, "horovodrun", "--check-build", timeout=180).stdout
    for what in ("TensorFlow", "MPI", "Gloo"):
        assert f"[X] {what}" in out, out
    # Horovod lists [X] PyTorch although the image has no torch (docs/docker.md says so).
    missing = podman("run", "--rm", "--network", "none", image, "python", "-c", "import torch",
                     timeout=120, check=False)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr


def test_two_rank_demo_trains(image):
    # The documented command (docs/docker.md); --network none: the two ranks only talk over loopback.
    result = podman("run", "--rm", "--ipc=host", "--network", "none", image,
                    "hvdclip-run", "-np", "2", "python", "examples/train.py", timeout=600)
    match = re.search(r"test accuracy ([0-9.]+) on \d+ held-out digits \(2 ranks\)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) >= 0.9, result.stdout


@pytest.fixture
def job_keys(image):
    """The recipe's hvd-ssh/ directory: the job's key pair, authorised for itself, owned by uid 1000."""
    keys = Path(tempfile.mkdtemp(prefix="hvdclip-keys-"))
    podman("run", "--rm", "--network", "none", "--user", "root", "-v", f"{keys}:/keys", image,
           "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/keys/id_ed25519", timeout=120)
    shutil.copy(keys / "id_ed25519.pub", keys / "authorized_keys")
    for path in (keys, *keys.iterdir()):
        shutil.chown(path, 1000, 1000)
    keys.chmod(0o700)
    yield keys
    shutil.rmtree(keys, ignore_errors=True)


def test_two_node_recipe_across_two_containers(image, network, job_keys, unique):
    """docs/docker.md's two-node recipe: node2 runs hvdclip-sshd (port 2222), node1 launches one
    rank on each node with mpirun over SSH."""
    net, (node1_ip, node2_ip, _) = network
    hosts = ["--add-host", f"node1:{node1_ip}", "--add-host", f"node2:{node2_ip}"]
    common = ["--ipc=host", "--network", net, *hosts, "-v", f"{job_keys}:/home/hvd/.ssh:ro"]
    sshd = f"hvdclip-test-node2-{unique}"
    podman("run", "-d", "--name", sshd, "--hostname", "node2", "--ip", node2_ip, "--user", "root",
           *common, image, "hvdclip-sshd", timeout=120)
    try:
        wait_for_sshd(sshd, bound=60)
        result = podman("run", "--rm", "--name", f"hvdclip-test-node1-{unique}", "--hostname", "node1",
                        "--ip", node1_ip, *common, image,
                        "hvdclip-run", "--backend", "mpirun", "-np", "2", "-H", "node1:1,node2:1",
                        "--network-interface", "eth0", "--", "python", "examples/train.py", "--epochs", "3",
                        timeout=600, check=False)
        logs = podman("logs", sshd, timeout=60, check=False)
    finally:
        podman("rm", "-f", "-t", "5", sshd, timeout=120, check=False)
    output = f"{result.stdout}\n{result.stderr}\nnode2's sshd:\n{logs.stdout}{logs.stderr}"
    assert result.returncode == 0, output
    assert re.search(r"test accuracy [0-9.]+ on \d+ held-out digits \(2 ranks\)", result.stdout), output
    # One rank really ran on node2: it logged in over SSH as hvd.
    assert re.search(r"Accepted publickey for hvd from " + re.escape(node1_ip), logs.stderr + logs.stdout), output
