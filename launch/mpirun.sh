#!/usr/bin/env bash
# Run a job with Open MPI's mpirun through hvdclip-run (see launch/hvdclip-run for PYTHON and PYTHONPATH).
#
#   launch/mpirun.sh -np 2 -- python examples/train.py
#   launch/mpirun.sh -np 8 --hostfile hosts.txt --env OMP_NUM_THREADS -- python train.py
#
# hvdclip-run adds what Horovod needs from mpirun: `-bind-to none -map-by slot`, the ob1 PML without
# openib, `-x` for PATH, LD_LIBRARY_PATH, PYTHONPATH and every NCCL_*, HOROVOD_* and TF_* variable,
# and --allow-run-as-root when run as root; for clusters, the daemons' TCP keepalive and ssh's
# ServerAlive (see docs/launching.md). Add --dry-run to see the exact command.
exec "$(dirname "${BASH_SOURCE[0]}")/hvdclip-run" --backend mpirun "$@"
