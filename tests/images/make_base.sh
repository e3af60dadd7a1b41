#!/usr/bin/env bash
# Makes a local stand-in for the official python:$PYTHON_SERIES-slim-$DEBIAN_RELEASE image, which
# docker/Dockerfile.cpu starts from, so that the image builds without Docker Hub:
#
#   tests/images/make_base.sh
#
# Debian's own minimal system (debootstrap --variant=minbase) with python3, venv, pip and CA
# certificates, and what the official image adds that the Dockerfile relies on:
# /usr/local/bin/python$PYTHON_SERIES and python, and ENV PYTHON_VERSION (the official images set it
# to the full version, which is why no Dockerfile ARG may be called that). Plus the host's extra CA
# certificates from /usr/local/share/ca-certificates: where HTTPS goes through an intercepting proxy
# (as here, and behind many corporate proxies), pip in the build needs them.
#
# The root file system is kept as a tarball in $HVDCLIP_IMAGE_CACHE/base, keyed by the release, the
# Python series and the CA certificates, and imported when the image store lacks the tag.
set -euo pipefail

die() { echo "make_base: $*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../versions.env
. "$here/../../versions.env"
containers=(bash "$here/containers.sh")
cache=${HVDCLIP_IMAGE_CACHE:-/var/cache/hvdclip/images}
mirror=${HVDCLIP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
tag="docker.io/library/python:$PYTHON_SERIES-slim-$DEBIAN_RELEASE"

certs=(/usr/local/share/ca-certificates/*.crt)
[ -e "${certs[0]}" ] || certs=()
certs_id=$(cat "${certs[@]}" /dev/null | sha256sum | cut -c1-12)
tarball="$cache/base/$DEBIAN_RELEASE-python$PYTHON_SERIES-certs$certs_id.tar"
label="hvdclip.standin=$(basename "$tarball")"

if "${containers[@]}" buildah inspect --type image --format '{{.Docker.Config.Labels}}' "$tag" 2>/dev/null \
        | grep -qF "${label#*=}"; then
    echo "make_base: $tag is already the stand-in from $(basename "$tarball")" >&2
    exit 0
fi

if [ ! -s "$tarball" ]; then
    echo "make_base: debootstrap $DEBIAN_RELEASE from $mirror (about a minute)" >&2
    root=$(mktemp -d "$cache/base-root.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$DEBIAN_RELEASE" "$root" "$mirror" >/dev/null \
        || die "debootstrap failed or ran out of its 900 s bound"
    version=$(chroot "$root" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    [ "${version%.*}" = "$PYTHON_SERIES" ] \
        || die "Debian $DEBIAN_RELEASE has Python $version, versions.env wants $PYTHON_SERIES"
    ln -s /usr/bin/python3 "$root/usr/local/bin/python$PYTHON_SERIES"
    ln -s /usr/bin/python3 "$root/usr/local/bin/python"
    if [ ${#certs[@]} -gt 0 ]; then
        cp "${certs[@]}" "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null
    fi
    echo "$version" >"$root/.python-version"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    mkdir -p "$cache/base"
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi

version=$(tar -xOf "$tarball" ./.python-version)
ctr=$("${containers[@]}" buildah from scratch)
trap '"${containers[@]}" buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${containers[@]}" buildah add --quiet "$ctr" "$tarball" / >/dev/null
"${containers[@]}" buildah config --label "$label" \
    --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env "PYTHON_VERSION=$version" --cmd python3 "$ctr"
"${containers[@]}" buildah commit --quiet --format docker "$ctr" "$tag" >/dev/null
echo "make_base: $tag is the stand-in from $(basename "$tarball") (Python $version)" >&2
