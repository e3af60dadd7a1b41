"""Multi-rank tests: run by `horovodrun -np 2 ... pytest tests/parallel` and `mpirun -np 2 ...`.

Every rank runs every test in the same order. Tests do their collectives first and assert after,
so a failing assertion on one rank cannot leave the other waiting in an allreduce.
"""

import horovod.tensorflow as hvd
import pytest

import hvdclip


@pytest.fixture(scope="session", autouse=True)
def world():
    hvdclip.init()
    if hvd.size() < 2:
        pytest.skip("multi-rank test: launch with `horovodrun -np 2` or `mpirun -np 2` (see `make test-parallel`)")
    return hvd.rank(), hvd.size()
