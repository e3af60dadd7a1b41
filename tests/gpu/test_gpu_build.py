"""The Horovod in this environment is the GPU build: NCCL compiled in, and loadable with
TensorFlow 2.21 (which needs docker/install_python.sh's stream patch). No GPU needed."""

import subprocess
import sys
from pathlib import Path

import horovod.tensorflow as hvd


def test_check_build_lists_nccl_tensorflow_mpi_and_gloo():
    horovodrun = Path(sys.executable).with_name("horovodrun")
    out = subprocess.run([str(horovodrun), "--check-build"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    for what in ("TensorFlow", "MPI", "Gloo", "NCCL"):
        assert f"[X] {what}" in out, out


def test_the_loaded_extension_was_built_with_nccl_mpi_and_gloo():
    assert hvd.nccl_built(), "horovod.tensorflow was built without NCCL: install with `make install GPU=1`"
    assert hvd.mpi_built() and hvd.gloo_built()
    assert hvd.cuda_built()


def test_nccl_library_resolves_for_the_extension():
    """mpi_lib.so finds libnccl: statically linked, or through its rpath to the nvidia-nccl-cu12
    wheel, and no rpath into a build machine's cache. (TensorFlow's own libraries are found through
    the TensorFlow that Python loaded first, so ldd may not see those.)"""
    [lib] = Path(hvd.__file__).parent.glob("mpi_lib*.so")
    ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, timeout=60, check=True).stdout
    nccl = [line.strip() for line in ldd.splitlines() if "libnccl" in line]
    assert all("not found" not in line for line in nccl), ldd
    if nccl:  # shared: the wheel's
        assert "/nvidia/nccl/lib/" in nccl[0], nccl
    readelf = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert ".cache/hvdclip" not in readelf, readelf
