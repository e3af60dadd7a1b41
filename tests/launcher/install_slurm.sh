#!/usr/bin/env bash
# Installs Slurm's controller, node daemon and client (Debian/Ubuntu packages) so that
# tests/launcher can start a one-node cluster on localhost and test the srun backend for real.
# Used by `make test-launch` when it runs as root (a local slurmd must). Idempotent: does nothing
# when the programs are already on PATH.
#
# Only packages are installed: no /etc/slurm/slurm.conf is written, so the distribution's services
# stay unconfigured (their init scripts exit when slurm.conf is missing). The test fixture writes
# its own configuration in a temporary directory and runs the daemons in the foreground.
set -euo pipefail

missing=0
for program in slurmctld slurmd srun sbatch sinfo; do
    command -v "$program" >/dev/null 2>&1 || missing=1
done
[ "$missing" -eq 0 ] && exit 0

packages=(slurmctld slurmd slurm-client)
echo "install_slurm: installing ${packages[*]}" >&2
command -v apt-get >/dev/null 2>&1 || {
    echo "install_slurm: no apt-get here; install Slurm (slurmctld, slurmd, srun) with your package manager," \
         "or run the launcher tests without it: pytest tests/launcher (the srun tests are then skipped)." >&2
    exit 1
}
[ "$(id -u)" -eq 0 ] || { echo "install_slurm: run as root; the srun tests need a root slurmd anyway" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
