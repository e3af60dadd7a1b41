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
#
# A built wheel is cached in $HVDCLIP_WHEEL_CACHE (default ~/.cache/hvdclip/wheels), keyed by
# Horovod, TensorFlow and Python versions, the CPU/GPU variant and PATCH_REV below, so a second
# install only reinstalls the wheel.
#
# HVDCLIP_REQUIRE_CACHED_WHEEL=1 forbids building: the Dockerfiles' runtime stages set it, so they
# install the wheel their builder stage made (and need no compiler or MPI headers) or fail loudly.
set -euo pipefail

PATCH_REV=1  # bump when the patch or the build flags below change: old cached wheels are ignored

die() { echo "install_python: $*" >&2; exit 1; }

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
    tf_req="tensorflow[and-cuda]==$TENSORFLOW_VERSION"
else
    tf_req="tensorflow-cpu==$TENSORFLOW_VERSION"
fi
"${pip[@]}" install -q "$tf_req" "numpy==$NUMPY_VERSION" "mpi4py==$MPI4PY_VERSION" packaging

tf_version=$("$PYTHON" -c 'import importlib.metadata as m, sys
for d in ("tensorflow", "tensorflow-cpu"):
    try:
        print(m.version(d)); sys.exit(0)
    except m.PackageNotFoundError:
        pass
sys.exit("TensorFlow did not install")')
py_tag=$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
key="horovod-$HOROVOD_VERSION-tf$tf_version-$py_tag-$variant-p$PATCH_REV"
cache="${HVDCLIP_WHEEL_CACHE:-$HOME/.cache/hvdclip/wheels}/$key"

wheel=$(ls "$cache"/horovod-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    if [ "${HVDCLIP_REQUIRE_CACHED_WHEEL:-0}" = 1 ]; then
        die "no cached wheel $cache/horovod-*.whl and HVDCLIP_REQUIRE_CACHED_WHEEL=1 forbids building it" \
            "(in a Docker build: the builder stage resolved other versions than this stage)"
    fi
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

    build_env=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
               HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)")
    [ "$variant" = gpu ] && build_env+=(HOROVOD_GPU_OPERATIONS=NCCL)
    mkdir -p "$cache.tmp"
    env "${build_env[@]}" "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$cache.tmp" "$src"
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
