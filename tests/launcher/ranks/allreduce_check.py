"""One rank of a 2-rank smoke job: Horovod sees both ranks and a sum allreduce is right on each."""

import os

import horovod.tensorflow as hvd
import tensorflow as tf

hvd.init()
total = hvd.allreduce(tf.constant([float(hvd.rank() + 1)]), op=hvd.Sum)
expected = hvd.size() * (hvd.size() + 1) / 2
ok = hvd.size() == 2 and float(total[0]) == expected
# srun gives each task its own SLURM_PROCID; ranks started any other way inside an allocation share one.
procid = os.environ.get("SLURM_PROCID", "-")
print(f"allreduce-check rank={hvd.rank()} size={hvd.size()} sum={float(total[0]):g} ok={ok} slurm_procid={procid}", flush=True)
raise SystemExit(0 if ok else 1)
