"""The examples run as documented, on 2 real ranks (`hvdclip-run -np 2 --gloo`), and reach their stated numbers.

Each test launches one short 2-rank job from this single process (about 30-70 s each on 2 cores).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HVDCLIP_RUN = Path(sys.executable).with_name("hvdclip-run")


def run_example(script, *args):
    env = os.environ | {"OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [str(HVDCLIP_RUN), "-np", "2", "--gloo", "--timeout", "400", "--", sys.executable, str(ROOT / "examples" / script), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def rank_lines(stdout, rank):
    """Lines printed by `rank`, without the launcher's `[rank]<stdout>:` tag."""
    return [re.sub(r"^\[[\d,]*\]<stdout>:", "", line) for line in stdout.splitlines() if re.match(rf"^\[(1,)?{rank}\]<stdout>:", line)]


def test_train_py_reaches_its_stated_accuracy(tmp_path):
    out = run_example("train.py", "--checkpoint-dir", str(tmp_path / "ckpts"), "--save", str(tmp_path / "digits.keras"))
    lines = rank_lines(out, 0)
    accuracy = float(re.search(r"test accuracy (\d\.\d+) on 357 held-out digits \(2 ranks\)", "\n".join(lines)).group(1))
    assert accuracy >= 0.97, "\n".join(lines)
    assert sum(line.startswith("Epoch ") for line in lines) == 15 and not rank_lines(out, 1), "only rank 0 prints"
    assert (tmp_path / "digits.keras").exists() and (tmp_path / "ckpts" / "ckpt-330.index").exists()


def test_recsys_py_learns_from_sparse_gradients():
    lines = rank_lines(run_example("recsys.py", "--epochs", "2"), 0)
    found = re.search(r"held-out AUC (\d\.\d+) on 20000 impressions \(2 ranks\); the hidden click model scores (\d\.\d+)", "\n".join(lines))
    assert found, "\n".join(lines)
    auc, best = float(found.group(1)), float(found.group(2))
    assert 0.68 <= auc <= best, "\n".join(lines)


def test_seed_loop_py_trains_identical_ranks_with_the_clip_active():
    out = run_example("seed_loop.py")
    lines = rank_lines(out, 0)
    epochs = [re.search(r"^epoch (\d): loss ([\d.]+), clipped (\d+) of (\d+) steps", line) for line in lines]
    epochs = [found for found in epochs if found]
    assert len(epochs) == 3 and float(epochs[-1].group(2)) < float(epochs[0].group(2)) / 10, "\n".join(lines)
    assert int(epochs[0].group(3)) == int(epochs[0].group(4)) > 0, "the seed's targets are large: the clip bites from the start"
    digests = {re.search(r"rank (\d): weights (\w+)", line).groups() for r in (0, 1) for line in rank_lines(out, r) if "weights" in line}
    assert len(digests) == 2 and len({digest for _, digest in digests}) == 1, digests


def test_keras_fit_py_reaches_its_stated_accuracy():
    lines = rank_lines(run_example("keras_fit.py"), 0)
    found = re.search(r"test accuracy (\d\.\d+) on 357 held-out digits \(2 ranks\)", "\n".join(lines))
    assert found and float(found.group(1)) >= 0.96, "\n".join(lines)
    assert re.search(r"grad_norm [\d.]+, clip_rate [\d.]+", "\n".join(lines)), "\n".join(lines)
