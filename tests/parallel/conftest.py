"""Multi-rank tests: run by `horovodrun -np 2 ... pytest tests/parallel` and `mpirun -np 2 ...`.

Every rank runs every test in the same order. Tests do their collectives first and assert after,
so a failing assertion on one rank cannot leave the other waiting in an allreduce.
"""

import shutil
import tempfile

import horovod.tensorflow as hvd
import numpy as np
import pytest

import hvdclip


@pytest.fixture(scope="session", autouse=True)
def world():
    hvdclip.init()
    if hvd.size() < 2:
        pytest.skip("multi-rank test: launch with `horovodrun -np 2` or `mpirun -np 2` (see `make test-parallel`)")
    return hvd.rank(), hvd.size()


@pytest.fixture
def shared_dir():
    """A directory whose path every rank agrees on (rank 0 makes it), removed after the test."""
    from support import allgather

    path = tempfile.mkdtemp(prefix="hvdclip-test-") if hvd.rank() == 0 else None
    path = hvd.broadcast_object(path, root_rank=0, name="hvdclip_test_shared_dir")
    yield path
    allgather(np.zeros(1))  # Every rank is done with it.
    if hvd.rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
