#!/usr/bin/env bash
# Installs what `make test-images` builds and runs the images with, without a Docker daemon:
# Debian's buildah and podman, runc (crun refuses hosts with hybrid cgroups), netavark and iptables
# for the bridge network of the two-node test, and debootstrap for the stand-in base image.
# Idempotent: does nothing when every program is already on PATH. Needs root and apt-get, as the
# tests do (rootful podman). Only packages are installed; the tests' container configuration lives
# in tests/images/ and is selected by environment variables (tests/images/env.sh), so the host's
# /etc/containers is not touched.
set -euo pipefail

missing=0
for program in buildah podman runc debootstrap iptables; do
    command -v "$program" >/dev/null 2>&1 || missing=1
done
[ -x /usr/lib/podman/netavark ] || missing=1
[ "$missing" -eq 0 ] && exit 0

packages=(buildah podman runc conmon netavark aardvark-dns iptables debootstrap)
echo "install_tools: installing ${packages[*]}" >&2
command -v apt-get >/dev/null 2>&1 || {
    echo "install_tools: no apt-get here; install ${packages[*]} with your package manager" >&2
    exit 1
}
[ "$(id -u)" -eq 0 ] || { echo "install_tools: run as root; the image tests use rootful podman" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
