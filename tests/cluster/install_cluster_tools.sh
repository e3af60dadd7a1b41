#!/usr/bin/env bash
# Installs what tests/cluster needs to build a cluster of hosts on this machine: sshd (Debian's
# openssh-server), the ssh client, iproute2 (`ip netns`, `tc`) and util-linux (`unshare`).
# Used by `make test-cluster` when it runs as root (network namespaces need root). Idempotent: does
# nothing when the programs are already there.
#
# Only packages are installed, and the package's own sshd service is kept from starting (policy-rc.d
# for the duration of the install): every sshd of the cluster runs inside a network namespace with a
# configuration, host key and authorized key of its own under a temporary directory.
set -euo pipefail

missing=0
for program in /usr/sbin/sshd ssh ssh-keygen ip tc unshare; do
    command -v "$program" >/dev/null 2>&1 || missing=1
done
[ "$missing" -eq 0 ] && exit 0

packages=(openssh-server openssh-client iproute2 util-linux)
echo "install_cluster_tools: installing ${packages[*]}" >&2
command -v apt-get >/dev/null 2>&1 || {
    echo "install_cluster_tools: no apt-get here; install ${packages[*]} with your package manager" >&2
    exit 1
}
[ "$(id -u)" -eq 0 ] || { echo "install_cluster_tools: run as root; network namespaces need root anyway" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
fi
trap '[ "$added_policy" -eq 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
