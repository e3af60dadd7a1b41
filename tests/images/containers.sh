#!/usr/bin/env bash
# Runs buildah or podman with hvdclip's test configuration, leaving the host's own container
# configuration (/etc/containers, /var/lib/containers) alone:
#
#   tests/images/containers.sh buildah|podman ARGS...
#
# Everything lives under $HVDCLIP_IMAGE_CACHE (default /var/cache/hvdclip/images): the image store
# (kept between runs: it is the layer cache that makes a second `make test-images` fast) and the
# generated configuration, selected with CONTAINERS_CONF / CONTAINERS_STORAGE_CONF /
# CONTAINERS_REGISTRIES_CONF:
#   - runtime runc: crun refuses hosts with hybrid (v1 + v2) cgroups;
#   - default_ulimits: podman and buildah otherwise ask for nofile=1048576 and a large nproc, and a
#     container may not raise a limit above the host's;
#   - no registry to search: every image is local (the stand-in base is made by make_base.sh).
set -euo pipefail

[ $# -ge 1 ] && { [ "$1" = buildah ] || [ "$1" = podman ]; } \
    || { echo "usage: $0 buildah|podman ARGS..." >&2; exit 2; }

cache=${HVDCLIP_IMAGE_CACHE:-/var/cache/hvdclip/images}
conf="$cache/conf"
mkdir -p "$conf" "$cache/storage"

write() {  # write FILE: stdin to FILE, only when it changed (several calls may run at once)
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}

write "$conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "/run/hvdclip-containers"
EOF

# nproc: podman asks for more than the host allows, and buildah's RUN starts below this shell's limit
# (at 32768), so the lower of the two.
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768

write "$conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
volume_path = "$cache/volumes"

[network]
network_backend = "netavark"
network_config_dir = "$cache/networks"
EOF

write "$conf/registries.conf" <<EOF
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF

export CONTAINERS_CONF="$conf/containers.conf"
export CONTAINERS_STORAGE_CONF="$conf/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$conf/registries.conf"
exec "$@"
