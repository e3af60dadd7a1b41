#!/usr/bin/env bash
# Finds (or assembles) the CUDA toolkit and NCCL that Horovod's GPU build compiles with, and prints
# the build settings as KEY=VALUE lines for docker/install_python.sh --gpu. Nothing else is printed
# on stdout; progress goes to stderr.
#
#   docker/cuda_toolkit.sh PYTHON
#
# PYTHON is the venv being installed into; TensorFlow's `and-cuda` wheels (nvidia-*-cu12, CUDA 12)
# must already be in it.
#
# The toolkit, in this order:
#   1. a system CUDA 12 toolkit: $CUDA_HOME, else the one `nvcc` on PATH belongs to. Its CUDA major
#      must be TensorFlow's (12); a toolkit of another major is reported and not used.
#   2. otherwise one assembled from PyPI wheels, so that a GPU build needs no system CUDA at all. No
#      CUDA 12 wheel ships nvcc (only ptxas), so the compiler is CUDA 13.0's (nvidia-cuda-nvcc,
#      nvidia-nvvm for cicc, nvidia-cuda-crt), with CUDA 12.9's runtime headers and libcudart
#      (nvidia-cuda-runtime-cu12) and cccl's headers (cuda_fp16.h needs <nv/target>). A mixed
#      toolchain: it proves Horovod compiles and loads against TensorFlow's CUDA 12 wheels; the GPU
#      image builds with NVIDIA's CUDA 12 devel image instead. Cached in $HVDCLIP_CUDA_CACHE
#      (default ~/.cache/hvdclip/cuda), keyed by the pinned versions. HVDCLIP_CUDA_FROM_PYPI=1
#      takes this path even when a system toolkit exists (`make test-gpu-build` does, so CI tests
#      the same thing on every machine).
# NCCL: the system's (nccl.h beside the toolkit or in /usr/include; linked statically, Horovod's
# default, as in the GPU image), else the venv's nvidia-nccl-cu12 wheel, linked as a shared library
# with an rpath to that wheel (HVDCLIP_NCCL_RPATH, applied by install_python.sh).
set -euo pipefail

die() { echo "cuda_toolkit: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 PYTHON"
PYTHON=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../versions.env
. "$here/../versions.env"

site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cc_list=${HOROVOD_BUILD_CUDA_CC_LIST:-$CUDA_CC_LIST}

# The CUDA version a toolkit's runtime headers declare, as "12.9" (CUDART_VERSION 12090).
cudart_version() {
    local v
    v=$(sed -n 's/^#define CUDART_VERSION  *\([0-9]*\).*/\1/p' "$1/cuda_runtime_api.h" 2>/dev/null | head -n 1)
    [ -n "$v" ] && echo "$((v / 1000)).$((v % 1000 / 10))"
}

# The root of the toolkit that `nvcc` on PATH belongs to, as nvcc itself reports it (it may be a
# wrapper script or a symlink, so its own path does not tell).
nvcc_root() {
    local top
    top=$(nvcc -v --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [ -n "$top" ] && (cd "$top" && pwd -P)
}

system_toolkit() {
    local root=""
    if [ -n "${CUDA_HOME:-}" ]; then
        root=$CUDA_HOME
    elif command -v nvcc >/dev/null 2>&1; then
        root=$(nvcc_root) || true
    fi
    [ -n "$root" ] || return 1
    [ -x "$root/bin/nvcc" ] || { echo "cuda_toolkit: $root has no bin/nvcc; not using it" >&2; return 1; }
    local version
    version=$(cudart_version "$root/include") \
        || { echo "cuda_toolkit: $root has no include/cuda_runtime_api.h; not using it" >&2; return 1; }
    if [ "${version%%.*}" != "${CUDA_RELEASE%%.*}" ]; then
        echo "cuda_toolkit: the system toolkit $root is CUDA $version, TensorFlow's wheels are CUDA" \
             "${CUDA_RELEASE%%.*}; assembling a toolkit from PyPI instead" >&2
        return 1
    fi
    echo "cuda_toolkit: using the system toolkit $root (CUDA $version)" >&2
    echo "$root"
}

pypi_toolkit() {
    local key="nvcc$NVIDIA_CUDA_NVCC_VERSION-cudart$NVIDIA_CUDA_RUNTIME_CU12_VERSION-cccl$NVIDIA_CUDA_CCCL_CU12_VERSION"
    local dir="${HVDCLIP_CUDA_CACHE:-$HOME/.cache/hvdclip/cuda}/$key"
    if [ ! -e "$dir/.complete" ]; then
        echo "cuda_toolkit: assembling a CUDA toolkit from PyPI wheels in $dir" >&2
        rm -rf "$dir" && mkdir -p "$dir"
        "$PYTHON" -m pip --disable-pip-version-check install -q --no-deps --target "$dir/wheels" \
            "nvidia-cuda-nvcc==$NVIDIA_CUDA_NVCC_VERSION" "nvidia-nvvm==$NVIDIA_NVVM_VERSION" \
            "nvidia-cuda-crt==$NVIDIA_CUDA_CRT_VERSION" \
            "nvidia-cuda-runtime-cu12==$NVIDIA_CUDA_RUNTIME_CU12_VERSION" \
            "nvidia-cuda-cccl-cu12==$NVIDIA_CUDA_CCCL_CU12_VERSION" >&2
        local cu13="$dir/wheels/nvidia/cu13" runtime="$dir/wheels/nvidia/cuda_runtime"
        local cccl="$dir/wheels/nvidia/cuda_cccl/include" root="$dir/root" entry
        for need in "$cu13/bin/nvcc" "$cu13/nvvm/bin/cicc" "$cu13/include/crt" \
                    "$runtime/include/cuda_runtime.h" "$runtime/lib/libcudart.so.12" "$cccl/nv/target"; do
            [ -e "$need" ] || die "$need is missing: the wheels' layout is not what this script expects"
        done
        mkdir -p "$root/include" "$root/lib64"
        # nvcc finds cicc, its headers and libraries relative to its own resolved path (nvcc.profile's
        # TOP), so bin/ holds copies, not symlinks; nvvm/ can be a link.
        cp -a "$cu13/bin" "$root/bin"
        ln -s "$cu13/nvvm" "$root/nvvm"
        # Headers: CUDA 12.9's runtime, then the 13.0 compiler's crt/ (which must match nvcc), then cccl.
        for entry in "$runtime/include"/* "$cu13/include"/* "$cccl"/*; do
            ln -sfn "$entry" "$root/include/$(basename "$entry")"
        done
        for entry in "$runtime/lib"/*; do
            ln -s "$entry" "$root/lib64/$(basename "$entry")"
        done
        ln -s libcudart.so.12 "$root/lib64/libcudart.so"
        mkdir -p "$root/targets/x86_64-linux"
        ln -s ../../include "$root/targets/x86_64-linux/include"
        ln -s ../../lib64 "$root/targets/x86_64-linux/lib"
        touch "$dir/.complete"
    fi
    echo "$dir/root"
}

if [ "${HVDCLIP_CUDA_FROM_PYPI:-0}" != 1 ] && root=$(system_toolkit); then
    source=system
else
    root=$(pypi_toolkit)
    source=pypi
fi
version=$(cudart_version "$root/include") || die "no CUDA runtime headers in $root/include"
nvcc_release=$("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[ -n "$nvcc_release" ] || die "$root/bin/nvcc --version does not say its release"

# Printed only once everything is known, so that a failure prints no settings.
out=("HOROVOD_CUDA_HOME=$root" "HOROVOD_BUILD_CUDA_CC_LIST=$cc_list")
nccl_include=""
for dir in "$root/include" /usr/include; do
    [ -e "$dir/nccl.h" ] && { nccl_include=$dir; break; }
done
if [ -n "$nccl_include" ]; then
    echo "cuda_toolkit: NCCL from $nccl_include/nccl.h (linked statically)" >&2
    out+=("HOROVOD_NCCL_INCLUDE=$nccl_include")
    nccl_id=system
else
    wheel_nccl="$site/nvidia/nccl"
    [ -e "$wheel_nccl/include/nccl.h" ] && [ -e "$wheel_nccl/lib/libnccl.so.2" ] \
        || die "no system NCCL (nccl.h) and no nvidia-nccl-cu12 wheel in $site: install tensorflow[and-cuda] first"
    # The wheel has only libnccl.so.2; the linker looks for libnccl.so.
    link_dir="${HVDCLIP_CUDA_CACHE:-$HOME/.cache/hvdclip/cuda}/nccl-link-$(echo "$site" | sha256sum | cut -c1-12)"
    mkdir -p "$link_dir" && ln -sfn "$wheel_nccl/lib/libnccl.so.2" "$link_dir/libnccl.so"
    echo "cuda_toolkit: NCCL from the nvidia-nccl-cu12 wheel in $wheel_nccl (shared)" >&2
    # HVDCLIP_NCCL_RPATH: where the wheel's NCCL lies relative to horovod/tensorflow/mpi_lib*.so.
    out+=("HOROVOD_NCCL_INCLUDE=$wheel_nccl/include" "HOROVOD_NCCL_LIB=$link_dir" "HOROVOD_NCCL_LINK=SHARED"
          "HVDCLIP_NCCL_RPATH=\$ORIGIN/../../nvidia/nccl/lib")
    nccl_id=wheel
fi
# What the cache key of the built wheel records about the toolchain.
out+=("HVDCLIP_CUDA_ID=$source-cuda$version-nvcc$nvcc_release-sm${cc_list//,/_}-nccl$nccl_id")
printf '%s\n' "${out[@]}"
