import pytest

from bigtrain.config import OptimConfig
from bigtrain.model import build_model, init_weights
from bigtrain.optim import build_optimizer, lr_at
from tests.test_model import tiny


def test_warmup_then_cosine():
    c = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, c, 100) == pytest.approx(0.1)
    assert lr_at(9, c, 100) == pytest.approx(1.0)
    assert lr_at(10, c, 100) == pytest.approx(1.0)
    assert lr_at(99, c, 100) == pytest.approx(0.1)
    mid = lr_at(10 + 89 // 2, c, 100)
    assert 0.5 < mid < 0.6
    lrs = [lr_at(s, c, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd():
    c = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert lr_at(4, c, 100) == pytest.approx(1.0)
    assert lr_at(79, c, 100) == pytest.approx(1.0)
    assert lr_at(80, c, 100) < 1.0
    assert lr_at(99, c, 100) == pytest.approx(0.0)


def test_constant():
    c = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert lr_at(0, c, 10) == lr_at(9, c, 10) == 0.5


def test_weight_decay_groups():
    m = init_weights(build_model(tiny(tie_embeddings=True)), seed=0)
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(m.parameters()))  # tied weight counted once
