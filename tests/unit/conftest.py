"""Single-process tests: Horovod is initialised with size 1 (no launcher needed)."""

import pytest

import hvdclip


@pytest.fixture(scope="session", autouse=True)
def horovod_single_process():
    hvdclip.init()
