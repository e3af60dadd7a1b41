"""Starting hvdclip jobs: `hvdclip-run` over horovodrun, Open MPI's mpirun and Slurm's srun.

Importing this package does not import TensorFlow or Horovod, so it works on a login node.
"""

from hvdclip.launch.cli import main
from hvdclip.launch.commands import build_command, default_backend, find_program
from hvdclip.launch.executor import Executor, run_job
from hvdclip.launch.hosts import Host, parse_host_list, parse_hostfile, read_hostfile
from hvdclip.launch.settings import LaunchSettings

__all__ = [
    "Executor",
    "Host",
    "LaunchSettings",
    "build_command",
    "default_backend",
    "find_program",
    "main",
    "parse_host_list",
    "parse_hostfile",
    "read_hostfile",
    "run_job",
]
