"""Runs the CPU image with podman (rootful, as root), through tests/images/containers.sh so that the
host's container configuration is left alone. `make test-images` builds the image first (buildah,
on a local stand-in base) and passes its name in HVDCLIP_IMAGE."""

from __future__ import annotations

import ipaddress
import os
import uuid

import pytest
from image_support import podman


@pytest.fixture(scope="session")
def image() -> str:
    name = os.environ.get("HVDCLIP_IMAGE", "hvdclip:cpu")
    if podman("image", "exists", name, timeout=60, check=False).returncode != 0:
        pytest.fail(f"no image {name}: build it with `make test-images` (or set HVDCLIP_IMAGE)")
    return name


@pytest.fixture
def unique() -> str:
    """A suffix for this test's container and network names, so that runs never collide."""
    return uuid.uuid4().hex[:8]


# The containers' network: private, made by the test and removed after it. A subnet the host already
# routes would be refused by netavark, so a few candidates are tried.
SUBNETS = ["10.213.77.0/24", "10.213.78.0/24", "172.30.213.0/24"]


@pytest.fixture
def network(unique):
    """A bridge network of the test's own: (name, [three addresses for containers])."""
    name = f"hvdclip-test-{unique}"
    for subnet in SUBNETS:
        created = podman("network", "create", "--subnet", subnet, name, timeout=60, check=False)
        if created.returncode == 0:
            break
    else:
        pytest.fail(f"could not create a podman network on any of {SUBNETS}: {created.stderr}")
    hosts = ipaddress.ip_network(subnet).hosts()
    next(hosts)  # the gateway
    yield name, [str(next(hosts)) for _ in range(3)]
    podman("network", "rm", "-f", name, timeout=60, check=False)
