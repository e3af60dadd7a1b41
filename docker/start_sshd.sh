#!/usr/bin/env bash
# hvdclip-sshd: runs sshd in the foreground so that the launching node's mpirun/horovodrun can start
# ranks in this container. Only sshd needs root (`docker run --user root ... hvdclip-sshd`); the
# ranks it admits run as the unprivileged user hvd, authorised by the job's key directory mounted
# at /home/hvd/.ssh. Arguments are passed to sshd unchanged (e.g. `-p 2345`).
set -euo pipefail

die() { echo "hvdclip-sshd: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "sshd must start as root: docker run --user root ... hvdclip-sshd"
[ -s /home/hvd/.ssh/authorized_keys ] \
    || die "no /home/hvd/.ssh/authorized_keys: mount the job's key directory (-v KEYDIR:/home/hvd/.ssh:ro)"

# Host keys are made per container rather than baked into the image, which every user shares.
ssh-keygen -A
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e "$@"
