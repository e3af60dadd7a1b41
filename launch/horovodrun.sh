#!/usr/bin/env bash
# Run a job with horovodrun through hvdclip-run (see launch/hvdclip-run for PYTHON and PYTHONPATH).
#
#   launch/horovodrun.sh -np 2 --gloo -- python examples/train.py
#   launch/horovodrun.sh -np 8 -H node1:4,node2:4 --network-interface eth0 -- python train.py
#
# Add --dry-run to print the horovodrun command, and the ssh and mpirun horovodrun would run, instead of running it.
exec "$(dirname "${BASH_SOURCE[0]}")/hvdclip-run" --backend horovodrun "$@"
