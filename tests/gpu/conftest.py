"""GPU tests: the GPU build of Horovod (`make test-gpu-build` runs them on a machine without a GPU)
and a smoke test that needs GPUs. On a GPU node, in the GPU image or a `make install GPU=1` venv:

    HVDCLIP_REQUIRE_GPU=1 horovodrun -np 2 python -m pytest -q tests/gpu

(one rank per GPU; -np = the node's GPU count works too). Without a GPU the smoke tests skip, unless
HVDCLIP_REQUIRE_GPU=1 turns those skips into failures, as on a GPU node it must.
"""

import os

import horovod.tensorflow as hvd
import pytest
import tensorflow as tf

import hvdclip


@pytest.fixture(scope="session", autouse=True)
def world():
    hvdclip.init()  # Pins one GPU per local rank where there are GPUs.
    return hvd.rank(), hvd.size()


@pytest.fixture(scope="session")
def gpu(world):
    """This rank's GPU (hvdclip.init made it the only visible one), or a skip without GPUs.

    Every rank takes the same decision: a rank that skipped while another waited in a collective
    would hang the job, so the GPU counts are allgathered first.
    """
    visible = tf.config.get_visible_devices("GPU")
    counts = hvd.allgather_object(len(visible), name="hvdclip_gpu_test_counts")
    if min(counts) == 0:
        message = f"no GPU on some rank (visible GPUs per rank: {counts})"
        if os.environ.get("HVDCLIP_REQUIRE_GPU") == "1":
            pytest.fail(f"HVDCLIP_REQUIRE_GPU=1 but {message}")
        pytest.skip(f"{message}; set HVDCLIP_REQUIRE_GPU=1 on a GPU node to make this a failure")
    return visible[0]
