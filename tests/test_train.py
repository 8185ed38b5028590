"""End-to-end training on a tiny model: learning, exact resume after SIGKILL, clear user errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bigtrain import checkpoint as ckpt
from bigtrain.config import load_config
from bigtrain.trainer import Trainer
from tests.conftest import ROOT, TINY, assert_user_error, run_cli

pytestmark = pytest.mark.slow


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path={data}", f"train.out_dir={out}", *extra]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_loss_falls_and_metrics_are_complete(tiny_data, tmp_path):
    torch.set_num_threads(1)
    cfg = load_config("configs/debug.yaml", overrides(tiny_data, tmp_path / "run", "train.steps=40",
                                                      "train.save_every=0"))
    records = Trainer(cfg).train()
    assert len(records) == 40
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_rss_gib"):
        assert key in records[-1]
    assert records[-1]["val_loss"] < records[0]["loss"]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000040"]


def _train_args(data, out, *extra):
    return ["train", "--config", "configs/debug.yaml", *overrides(data, out, "train.steps=8", "train.save_every=3",
                                                                  "model.dropout=0.1", *extra)]


@pytest.fixture(scope="module")
def reference_losses(tiny_data, tmp_path_factory):
    """Losses of an uninterrupted 8-step run (dropout on, so RNG state matters)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli(*_train_args(tiny_data, out), check=True)
    ref = losses(out)
    assert sorted(ref) == list(range(1, 9))
    return ref


def _train_until(tiny_data, out: Path, step: int) -> subprocess.Popen:
    """Start the 8-step training run in a subprocess and return once `step` is logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bigtrain.cli", *_train_args(tiny_data, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(json.loads(line)["step"] >= step for line in
                                                    (out / "metrics.jsonl").read_text().splitlines() if line):
            break
        time.sleep(0.02)
    return proc


def test_sigkill_during_training_resumes_exactly(tiny_data, tmp_path, reference_losses):
    out = tmp_path / "run"
    # Kill it as soon as step 5 is logged: after the step-3 checkpoint, before the step-6 one.
    proc = _train_until(tiny_data, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and latest.name in ("step_00000003", "step_00000006")
    run_cli(*_train_args(tiny_data, out, "train.resume=auto"), check=True)
    assert losses(out) == reference_losses  # bitwise: same floats, step for step


def test_sigterm_saves_and_resumes_exactly(tiny_data, tmp_path, reference_losses):
    """SIGTERM (slurm's notice, a preemption): the step finishes, a checkpoint is written at that
    step, the process exits 0, and train.resume=auto continues with the same losses."""
    out = tmp_path / "run"
    proc = _train_until(tiny_data, out, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped_at = ckpt.latest_checkpoint(out)
    if stopped_at.name != "step_00000008":  # (unless the run had already finished)
        assert "stopping on SIGTERM" in err
        assert stopped_at.name not in ("step_00000003", "step_00000006")  # a save of its own
    run_cli(*_train_args(tiny_data, out, "train.resume=auto"), check=True)
    assert losses(out) == reference_losses


KILL_IN_SAVE = """
import os, signal, sys
import bigtrain.checkpoint as c
real = c.write_json
def write_json(path, obj):
    if path.name == "manifest.json" and obj.get("step") == 6:
        os.kill(os.getpid(), signal.SIGKILL)   # rank file written, manifest not: half a checkpoint
    real(path, obj)
c.write_json = write_json
from bigtrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_save_resumes_exactly(tiny_data, tmp_path, reference_losses):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *_train_args(tiny_data, out)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / ".tmp_step_00000006" / "rank00000.pt").exists()
    assert ckpt.latest_checkpoint(out).name == "step_00000003"
    run_cli(*_train_args(tiny_data, out, "train.resume=auto"), check=True)
    assert losses(out) == reference_losses
    assert not (out / "checkpoints" / ".tmp_step_00000006").exists()


def test_keep_last(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_cli(*_train_args(tiny_data, out, "train.save_every=1", "checkpoint.keep_last=2"), check=True)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000007", "step_00000008"]


def test_sample_prints_text(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_cli(*_train_args(tiny_data, out, "train.steps=2"), check=True)
    r = run_cli("sample", "--run", str(out), "--prompt", "To be", "--max-new-tokens", "10", check=True)
    assert r.stdout.startswith("To be") and len(r.stdout.strip()) > len("To be")


def test_bad_inputs_exit_2(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert_user_error(run_cli(*_train_args(tmp_path / "nodata", out)), "nodata", "bigtrain prepare")
    assert_user_error(run_cli(*_train_args(tiny_data, out, "model.n_heads=3")), "model.dim(64) is not divisible by model.n_heads(3)")
    assert_user_error(run_cli(*_train_args(tiny_data, out, "train.seq_len=128")), "train.seq_len(128) exceeds model.max_seq_len(64)")
    assert_user_error(run_cli("train", "--config", "missing.yaml"), "missing.yaml", "does not exist")
    assert_user_error(run_cli("prepare", "--corpus", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "d")), "none*.txt")
    assert_user_error(run_cli("sample", "--run", str(tmp_path / "nothing")), "nothing")

    run_cli(*_train_args(tiny_data, out, "train.steps=3"), check=True)
    metrics_before = (out / "metrics.jsonl").read_text()
    # an existing run is never overwritten by accident
    assert_user_error(run_cli(*_train_args(tiny_data, out, "train.steps=4")), "already holds checkpoints", "train.resume=auto")
    # a different model cannot resume this checkpoint
    assert_user_error(run_cli(*_train_args(tiny_data, out, "train.steps=4", "train.resume=auto", "model.dim=32",
                                            "model.n_heads=2", "model.n_kv_heads=1")),
                       "different model", "model.dim: 64 in checkpoint vs 32")
    assert_user_error(run_cli(*_train_args(tiny_data, out, "train.resume=" + str(tmp_path / "nock"))), "no such checkpoint")
    # a corrupt checkpoint file
    rank_file = ckpt.latest_checkpoint(out) / "rank00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    assert_user_error(run_cli(*_train_args(tiny_data, out, "train.steps=4", "train.resume=auto")), "corrupt")
    assert (out / "metrics.jsonl").read_text() == metrics_before  # nothing written was lost


def test_no_validation_split_trains_and_saves(tmp_path, capsys):
    """`prepare --val-fraction 0` leaves an empty validation split: the run trains, warns once
    that there is no validation loss, and saves its final checkpoint (it used to fail after all
    its steps, before saving)."""
    from bigtrain.data.prepare import prepare
    from tests.conftest import _corpus_text

    (tmp_path / "corpus.txt").write_text(_corpus_text())
    data = tmp_path / "noval"
    prepare([str(tmp_path / "corpus.txt")], str(data), vocab_size=360, val_fraction=0.0)
    records = Trainer(load_config("configs/debug.yaml", overrides(data, tmp_path / "run", "train.steps=3",
                                                                  "train.eval_every=1"))).train()
    assert len(records) == 3 and all("val_loss" not in r for r in records)
    assert "warning: no validation loss in this run: val split has 0 tokens" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000003"]


def test_validation_split_shorter_than_one_batch_trains_and_saves(tiny_data, tmp_path, capsys, monkeypatch):
    """A validation split that is not empty but one token short of one micro-batch (TINY:
    micro_batch 4 windows of seq_len 32, which share boundary tokens: 4*32 + 1 = 129 tokens;
    here 128, fewer than micro_batch*(seq_len+1)): the run says at start-up, before its first
    step, that it has no validation loss, then trains every step, saves its final checkpoint
    and exits 0; resuming it does the same. One more token and it is evaluated."""
    import shutil

    import numpy as np

    need = 4 * 32 + 1
    data = tmp_path / "shortval"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    assert len(val) > need
    val[: need - 1].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": need - 1}))
    out = tmp_path / "run"

    def train(*extra):
        return run_cli("train", "--config", "configs/debug.yaml",
                       *overrides(data, out, "train.eval_every=1", "train.save_every=0", *extra), check=True)

    r = train("train.steps=3")
    warning = ("warning: no validation loss in this run: val split has 128 tokens = 3 windows of seq_len=32; "
               "need at least 4")
    assert r.stdout.count(warning) == 1, r.stdout[-2000:]
    assert sorted(losses(out)) == [1, 2, 3]
    assert not any("val_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"]
    r = train("train.steps=4", "train.resume=auto")
    assert warning in r.stdout and sorted(losses(out)) == [1, 2, 3, 4]
    assert [p.name for p in ckpt.list_checkpoints(out)][-1] == "step_00000004"
    # said at start-up: already printed when the first step begins
    seen = []
    real_step = Trainer.train_step

    def first_step(self):
        if not seen:
            seen.append(capsys.readouterr().out)
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", first_step)
    Trainer(load_config("configs/debug.yaml", overrides(data, tmp_path / "again", "train.steps=1"))).train()
    assert warning in seen[0]
    # the boundary: with one token more the split holds one batch and is evaluated
    val[:need].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": need}))
    cfg = load_config("configs/debug.yaml", overrides(data, tmp_path / "evaluated", "train.steps=1"))
    records = Trainer(cfg).train()
    assert "val_loss" in records[-1]


def test_final_checkpoint_is_saved_before_the_final_evaluation(tiny_data, tmp_path, monkeypatch):
    """Whatever fails in the last evaluation, the last step's checkpoint is already on disk."""
    def broken(self):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(Trainer, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        Trainer(load_config("configs/debug.yaml", overrides(tiny_data, tmp_path / "run", "train.steps=2"))).train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000002"]


IN_BACKGROUND_SAVE = """
import os, signal, sys, threading, time
import bigtrain.checkpoint as c
real = c.write_file
def write_file(path, obj):
    if path.parent.name == ".tmp_step_00000006" and threading.current_thread() is not threading.main_thread():
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))  # while training goes on in the main thread
        time.sleep(1.0)  # the write is still running when the main thread handles the signal
    real(path, obj)
c.write_file = write_file
from bigtrain.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_signal_during_a_background_save(sig, tiny_data, tmp_path, reference_losses):
    """train.async_save: a SIGKILL while the step-6 checkpoint is written in the background
    leaves step 3 as the newest complete checkpoint; a SIGTERM then waits for that write, saves
    the step it stops at and exits 0. Either way train.resume=auto gives the uninterrupted losses."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", IN_BACKGROUND_SAVE, sig,
                        *_train_args(tiny_data, out, "train.async_save=true")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    names = [p.name for p in ckpt.list_checkpoints(out)]
    if sig == "SIGKILL":
        assert r.returncode == -signal.SIGKILL and names[-1] == "step_00000003", (r.returncode, names)
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert "step_00000006" in names and names[-1] != "step_00000006", names  # 6 finished, then its own stop save
        assert "stopping on SIGTERM" in r.stderr
    run_cli(*_train_args(tiny_data, out, "train.resume=auto", "train.async_save=true"), check=True)
    assert losses(out) == reference_losses
    assert not list((out / "checkpoints").glob(".tmp_step_*"))
