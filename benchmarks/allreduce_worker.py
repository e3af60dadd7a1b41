"""One rank of the allreduce bandwidth job: `python -m benchmarks.allreduce_worker --mb 64 --iters 8 --out DIR`.

Times `iters` sum-allreduces of an `mb`-megabyte float32 tensor (after 2 untimed ones) through
Horovod's TensorFlow op, and writes DIR/allreduce<rank>.json with the median seconds per allreduce.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.allreduce_worker")
    parser.add_argument("--mb", type=float, required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    tensor = tf.ones([int(args.mb * 1024 * 1024 / 4)], tf.float32)
    times = []
    for i in range(args.iters + 2):
        start = time.perf_counter()
        hvd.allreduce(tensor, op=hvd.Sum, name=f"bench_{i}").numpy()  # .numpy(): the result has arrived
        times.append(time.perf_counter() - start)
    record = {"rank": hvd.rank(), "size": hvd.size(), "bytes": int(tensor.shape[0]) * 4,
              "seconds": statistics.median(times[2:]), "all_seconds": times[2:]}  # fmt: skip
    with open(os.path.join(args.out, f"allreduce{hvd.rank()}.json"), "w") as f:
        json.dump(record, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
