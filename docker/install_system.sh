#!/usr/bin/env bash
# Installs the system packages hvdclip needs to build Horovod: Open MPI (compiler wrappers and
# runtime), a C++ toolchain and CMake. Used by `make install` and by both Dockerfiles.
#
# Idempotent: does nothing when `mpicxx`, `g++` and `cmake` are already on PATH, so a developer
# machine with its own MPI is left alone. Needs root (or sudo) only when something is missing.
set -euo pipefail

missing=()
command -v mpicxx >/dev/null 2>&1 || missing+=(openmpi-bin libopenmpi-dev)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install_system: installing ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system: no apt-get here; install ${missing[*]} (Open MPI with its dev files) with your" \
         "package manager, then run make install again." >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "install_system: need root to apt-get install ${missing[*]}; run as root or install sudo." >&2
        exit 1
    }
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
