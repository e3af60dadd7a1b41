"""Runs the CPU image with podman (rootful, as root), through tests/images/containers.sh so that the
host's container configuration is left alone. `make test-images` builds the image first (buildah,
on a local stand-in base) and passes its name in HVDCLIP_IMAGE."""

from __future__ import annotations

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
