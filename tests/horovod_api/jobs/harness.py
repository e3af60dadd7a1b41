"""What the jobs in this folder share that is not part of the Horovod script they stand for: the
data, bit-exact fingerprints, and one `RESULT {json}` line per rank for the test to read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for support.py

from support import checksum, make_data  # noqa: E402

__all__ = ["checksum", "gathered", "make_data", "max_abs_difference", "report"]


def gathered(hvd, array) -> np.ndarray:
    """`array` from every rank, stacked in rank order (row r is rank r's)."""
    return hvd.allgather(tf.constant(np.asarray(array)[np.newaxis])).numpy()


def max_abs_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def report(job: str, rank: int, **fields) -> None:
    print("RESULT " + json.dumps({"job": job, "rank": rank, **fields}, default=_plain), flush=True)


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else float(value)
