"""Shared fixtures: a tiny prepared corpus and the overrides of a tiny, fast model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The tests' tensors are small: one thread avoids OpenMP oversubscription on a busy 2-core machine
# (measured: the double-precision gradcheck took 2 s alone and 225 s beside two other jobs).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

# Small enough to train a few steps in a second on one CPU core, big enough to show learning.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8", "optim.warmup_steps=2",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "log.every=1", "log.progress=false", "log.wandb.mode=disabled",
        "data.eval_batches=2"]


def _corpus_text() -> str:
    lines = []
    for i in range(400):
        lines.append(f"Line {i}: the quick brown fox jumps over the lazy dog, number {i % 17}.")
        lines.append("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data directory (vocab 400) from a small synthetic corpus."""
    from bigtrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.txt"
    corpus.write_text(_corpus_text())
    out = root / "prepared"
    prepare([str(corpus)], str(out), vocab_size=400)
    return out


def run_cli(*args: str, env: dict | None = None, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m bigtrain.cli ARGS` in a fresh process (single-threaded torch)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "bigtrain.cli", *args], capture_output=True, text=True,
                       env=e, timeout=timeout, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"bigtrain {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: exit code 2, one stderr line with every fragment, no traceback."""
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
