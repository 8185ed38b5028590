"""A mixture run's metrics: per-source training tokens and validation losses in metrics.jsonl."""

import json

import pytest

from bigtrain.config import load_config
from bigtrain.trainer import Trainer
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def test_mixture_metrics_per_source(tiny_data, tmp_path):
    from bigtrain.data.prepare import prepare
    from tests.conftest import _corpus_text

    (tmp_path / "b.txt").write_text(_corpus_text().upper())
    other = tmp_path / "other"
    prepare([str(tmp_path / "b.txt")], str(other), tokenizer=str(tiny_data), workers=1)
    out = tmp_path / "run"
    cfg = load_config("configs/debug.yaml", [*TINY, f"data.path={tiny_data}", f"data.mix={tiny_data}:0.75,{other}:0.25",
                                             f"train.out_dir={out}", "train.steps=4", "train.eval_every=2"])
    trainer = Trainer(cfg)
    records = trainer.train()
    names = list(trainer.train_loader.weights())
    assert len(names) == 2
    last = records[-1]
    tokens = [last[f"tokens/{n}"] for n in names]
    assert sum(tokens) == 4 * cfg.train.global_batch_size * cfg.train.seq_len  # every training token counted once
    per = [last[f"val_loss/{n}"] for n in names]
    w = trainer.train_loader.weights()
    assert last["val_loss"] == pytest.approx(sum(w[n] * v for n, v in zip(names, per)) / sum(w.values()), rel=1e-12)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(f"tokens/{n}" in r for r in logged for n in names)
    assert [r["step"] for r in logged if "val_loss" in r] == [2, 4]
