"""data.mix: weighted mixtures of prepared directories.

Loader tests use hand-made sources whose token at position i is start + i, so a row's first token
names its source and window; the end-to-end test prepares two small corpora with one tokenizer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.config import DataConfig, load_config
from bigtrain.data import mixture
from bigtrain.data.dataset import BatchLoader
from bigtrain.data.mixture import MixtureLoader, Source, data_meta, open_sources
from bigtrain.errors import ConfigError, UserError

STARTS = (0, 20_000, 40_000)  # source i's tokens start at STARTS[i]


def make_source(path: Path, n_train: int, start: int, n_val: int = 0, **meta) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    np.arange(start, start + n_train, dtype=np.uint16).tofile(path / "train.bin")
    np.arange(start, start + n_val, dtype=np.uint16).tofile(path / "val.bin")
    m = {"vocab_size": 1 << 16, "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_val,
         "bos_id": 1, "eos_id": 2, "tokenizer": "tokenizer.model", **meta}
    (path / "meta.json").write_text(json.dumps(m))
    return path


def sources(tmp_path: Path, sizes=(1001, 301, 97), weights=(0.5, 0.3, 0.2)) -> list[Source]:
    dirs = [make_source(tmp_path / f"s{i}", n, STARTS[i]) for i, n in enumerate(sizes)]
    data = DataConfig(mix=[f"{d}:{w}" for d, w in zip(dirs, weights)])
    return open_sources(data)


def origin(batch: torch.Tensor) -> list[int]:
    """The source of each row of a batch (from its first token)."""
    return [int(np.searchsorted(STARTS, t, side="right")) - 1 for t in batch[:, 0].tolist()]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_shares_match_weights(tmp_path, monkeypatch):
    """Each sample's source is an independent draw, so source i's count over n samples is
    Binomial(n, w_i): it must lie within 4 standard deviations, sqrt(n w_i (1 - w_i)), of n w_i
    (a false failure has probability ~6e-5 per source; the seed is fixed, so the test is exact)."""
    monkeypatch.setattr(mixture, "CHOICE_BLOCK", 1000)  # the batches below cross many blocks
    srcs = sources(tmp_path)
    weights = [s.weight for s in srcs]
    assert weights == pytest.approx([0.5, 0.3, 0.2])
    loader = MixtureLoader(srcs, seq_len=8, micro_batch=16, seed=5)
    counts = np.zeros(3, dtype=np.int64)
    for _ in range(500):  # 8000 samples
        batch = loader.next_batch()
        counts += np.bincount(origin(batch), minlength=3)
        # every row is a real window of its own source: consecutive tokens from a multiple of seq_len
        assert torch.equal(batch - batch[:, :1], torch.arange(9).expand(16, 9))
        assert all((int(t) - STARTS[o]) % 8 == 0 for t, o in zip(batch[:, 0], origin(batch)))
    n = counts.sum()
    assert loader.source_counts() == {"s0": counts[0], "s1": counts[1], "s2": counts[2]}
    for c, w in zip(counts, weights):
        assert abs(c - n * w) <= 4 * math.sqrt(n * w * (1 - w)), (counts, weights)
    # Over more samples (choices only, no tokens read) the bound is relatively tighter.
    big = np.bincount(loader.choices(0, 400_000), minlength=3)
    for c, w in zip(big, weights):
        assert abs(c - 400_000 * w) <= 4 * math.sqrt(400_000 * w * (1 - w)), big
    # Each source's samples walk its own permutations: s2 (12 windows) has seen every window
    # equally often over whole epochs.
    ids = []
    fresh = MixtureLoader(srcs, seq_len=8, micro_batch=16, seed=5)
    while len(ids) < 36:
        b = fresh.next_batch()
        ids += [(int(t) - STARTS[2]) // 8 for t, o in zip(b[:, 0], origin(b)) if o == 2]
    assert all(sorted(ids[e * 12:(e + 1) * 12]) == list(range(12)) for e in range(3))


def test_layout_independence(tmp_path):
    """dp=1, 2 and 4 take the same global samples (a small source wraps within one global batch)."""
    srcs = sources(tmp_path, sizes=(2001, 801, 41))  # s2: 5 windows of 8, fewer than a global batch
    single = MixtureLoader(srcs, seq_len=8, micro_batch=8, seed=3)
    pair = [MixtureLoader(srcs, seq_len=8, micro_batch=4, seed=3, rank=r, world=2) for r in range(2)]
    quad = [MixtureLoader(srcs, seq_len=8, micro_batch=2, seed=3, rank=r, world=4) for r in range(4)]
    for _ in range(40):
        expect = single.next_batch()
        assert torch.equal(torch.cat([r.next_batch() for r in pair]), expect)
        assert torch.equal(torch.cat([r.next_batch() for r in quad]), expect)
    assert single.source_counts() == pair[1].source_counts() == quad[3].source_counts()
    assert single.consumed == pair[0].consumed == quad[2].consumed == 320
    # a different seed is a different stream
    other = MixtureLoader(srcs, seq_len=8, micro_batch=8, seed=4)
    fresh = MixtureLoader(srcs, seq_len=8, micro_batch=8, seed=3)
    assert not all(torch.equal(other.next_batch(), fresh.next_batch()) for _ in range(5))


def test_resume_same_and_other_layout(tmp_path):
    srcs = sources(tmp_path)
    a = MixtureLoader(srcs, seq_len=16, micro_batch=4, seed=11)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint manifest holds
    assert state["consumed"] == 28 and sum(state["source_consumed"]) == 28
    rest = [a.next_batch() for _ in range(10)]

    b = MixtureLoader(srcs, seq_len=16, micro_batch=4, seed=11)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch()) for x in rest)  # bitwise, same layout
    # dp=1 -> dp=2: the union of the two ranks' batches is the dp=1 run's
    ranks = [MixtureLoader(srcs, seq_len=16, micro_batch=2, seed=11, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    assert all(torch.equal(x, torch.cat([r.next_batch() for r in ranks])) for x in rest)
    assert ranks[0].source_counts() == a.source_counts()

    def refused(loader, st) -> str:
        with pytest.raises(UserError) as ei:
            loader.load_state_dict(st)
        return one_line(ei)

    assert "seed must match" in refused(MixtureLoader(srcs, 16, 4, seed=12), state)
    assert "seq_len must match" in refused(MixtureLoader(srcs, 8, 4, seed=11), state)
    reweighted = sources(tmp_path, weights=(0.4, 0.4, 0.2))
    assert "weights must match" in refused(MixtureLoader(reweighted, 16, 4, seed=11), state)
    assert "sum" in refused(b, {**state, "source_consumed": [1, 2, 3]})
    # a single directory's position is not a mixture's, and the other way round
    plain = BatchLoader(srcs[0].train, 16, 4, seed=11)
    plain.next_batch()
    assert "single data.path" in refused(b, plain.state_dict())
    assert "data.mix mixture" in refused(plain, state)


def test_config_form_and_errors(tmp_path):
    cfg = load_config(None, ["data.mix=data/web:0.7,data/code:0.3"])
    assert cfg.data.mix == ["data/web:0.7", "data/code:0.3"]
    assert cfg.data.mixture() == [("data/web", 0.7), ("data/code", 0.3)]
    assert load_config(None, ["data.mix=[a:7, b:3]", "data.path=b"]).data.mixture() == [("a", 7.0), ("b", 3.0)]
    assert load_config(None).data.mixture() == []
    for bad, fragment in [("data.mix=data/web", "is not DIR:WEIGHT"), ("data.mix=web:lots", "is not DIR:WEIGHT"),
                          ("data.mix=:0.5", "is not DIR:WEIGHT"), ("data.mix=a:0,b:1", "finite number > 0"),
                          ("data.mix=a:-1", "finite number > 0"), ("data.mix=a:nan", "finite number > 0"),
                          ("data.mix=a:1,./a:2", "twice")]:
        with pytest.raises(ConfigError) as ei:
            load_config(None, [bad])
        assert fragment in one_line(ei) and ("DIR:WEIGHT" in str(ei.value) or "twice" in fragment), bad
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.mix=a:1,b:1", "data.path=c"])
    assert "both name the training data" in one_line(ei)
    f = tmp_path / "mix.yaml"
    f.write_text("data:\n  mix: [data/web:0.7, ../code:0.3]\n")
    assert load_config(f).data.mixture() == [("data/web", 0.7), ("../code", 0.3)]


@pytest.mark.slow
def test_cli_refuses_bad_mixtures_in_one_line(tmp_path):
    from tests.conftest import TINY, assert_user_error, run_cli

    a = make_source(tmp_path / "a", 5000, 0, tokenizer_sha256="aa" * 32)
    other = make_source(tmp_path / "other", 5000, 0, tokenizer_sha256="bb" * 32)
    train = ["train", "--config", "configs/debug.yaml", *TINY, f"train.out_dir={tmp_path / 'run'}"]
    assert_user_error(run_cli(*train, f"data.mix={a}:1,{other}:1"), "different tokenizers", "--tokenizer")
    assert_user_error(run_cli(*train, f"data.mix={a}"), "is not DIR:WEIGHT", "data.mix=DIR:WEIGHT,DIR:WEIGHT")


def test_mixture_loader_speed(tmp_path):
    srcs = sources(tmp_path, sizes=(60_000, 20_000, 5_000))
    loader = MixtureLoader(srcs, seq_len=256, micro_batch=16, seed=0)
    t0 = time.perf_counter()
    for _ in range(200):
        loader.next_batch()
    assert time.perf_counter() - t0 < 2.0


def test_sources_must_share_a_tokenizer(tmp_path):
    a = make_source(tmp_path / "a", 500, 0, tokenizer_sha256="aa" * 32)
    same = make_source(tmp_path / "same", 500, 0, tokenizer_sha256="aa" * 32)
    old = make_source(tmp_path / "old", 500, 0)  # no tokenizer_sha256: vocab and special ids are compared
    assert data_meta(DataConfig(mix=[f"{a}:1", f"{same}:1", f"{old}:1"]))["tokenizer_sha256"] == "aa" * 32
    for bad, fragment in [(make_source(tmp_path / "sha", 500, 0, tokenizer_sha256="bb" * 32), "tokenizer_sha256"),
                          (make_source(tmp_path / "vocab", 500, 0, vocab_size=30000), "vocab_size=30000"),
                          (make_source(tmp_path / "eos", 500, 0, eos_id=3), "eos_id=3")]:
        with pytest.raises(UserError) as ei:
            data_meta(DataConfig(mix=[f"{a}:1", f"{bad}:1"]))
        msg = one_line(ei)
        assert fragment in msg and "different tokenizers" in msg and f"--tokenizer {a}" in msg
    with pytest.raises(UserError) as ei:
        data_meta(DataConfig(mix=[f"{a}:1", f"{tmp_path / 'nope'}:1"]))
    assert "bigtrain prepare" in one_line(ei)
    tiny = make_source(tmp_path / "tiny", 10, 0)
    with pytest.raises(UserError) as ei:
        MixtureLoader(open_sources(DataConfig(mix=[f"{a}:1", f"{tiny}:1"])), seq_len=16, micro_batch=2, seed=0)
    assert "not one window" in one_line(ei)


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    """tiny_data and a second corpus prepared with its tokenizer."""
    from bigtrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("mix")
    lines = [f"Entry {i}: a lazy cat sleeps beside {i % 13} warm stones and dreams of fish." for i in range(300)]
    (root / "other.txt").write_text("\n".join(lines))
    prepare([str(root / "other.txt")], str(root / "other"), tokenizer=str(tiny_data))
    return tiny_data, root / "other"


@pytest.mark.slow
def test_trainer_with_a_mixture_trains_and_resumes_exactly(two_corpora, tmp_path):
    from bigtrain import checkpoint as ckpt
    from bigtrain.trainer import Trainer
    from tests.conftest import TINY

    torch.set_num_threads(1)
    a, b = two_corpora

    def cfg(out, *extra):
        return load_config("configs/debug.yaml", [*TINY, f"data.mix={a}:0.6,{b}:0.4", f"train.out_dir={out}",
                                                  "train.steps=6", "train.save_every=3", "model.dropout=0.1", *extra])

    t = Trainer(cfg(tmp_path / "full"))
    assert t.cfg.data.path == str(a)  # the resolved config names the first source (its tokenizer.model)
    assert set(t.components.val_sets) == {a.name, b.name}
    full = t.train()
    assert len(full) == 6 and all(math.isfinite(r["loss"]) for r in full) and "val_loss" in full[-1]
    counts = t.train_loader.source_counts()
    assert sum(counts.values()) == 6 * 8 and min(counts.values()) > 0

    resumed = Trainer(cfg(tmp_path / "resumed", f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000003'}"))
    assert resumed.step == 3
    rest = resumed.train()
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[3:]]  # bitwise
    assert rest[-1]["val_loss"] == full[-1]["val_loss"]
    assert resumed.train_loader.source_counts() == counts
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step_00000006"


def _train_ranks(rank, world, overrides):
    import os

    from bigtrain.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    t = Trainer(load_config("configs/debug.yaml", overrides))
    return [r["loss"] for r in t.train()], t.train_loader.source_counts()


@pytest.mark.slow
def test_mixture_checkpoint_at_dp1_resumes_at_dp2(two_corpora, tmp_path):
    """A dp=1 checkpoint of a mixture resumed on two gloo ranks continues the same global samples:
    the per-source counts agree exactly and the losses to fp32 rounding (the DP all-reduce sums in
    another order; tests/test_distributed_train.py's tolerance)."""
    from bigtrain import checkpoint as ckpt
    from tests.conftest import TINY
    from tests.multiproc import run_ranks

    a, b = two_corpora

    def overrides(out, *extra):
        return [*TINY, f"data.mix={a}:0.6,{b}:0.4", f"train.out_dir={out}", "train.micro_batch_size=2",
                "train.global_batch_size=8", "train.steps=5", "train.save_every=3", "model.dropout=0.0", *extra]

    ref, ref_counts = _train_ranks(0, 1, overrides(tmp_path / "ref"))
    step3 = ckpt.checkpoint_root(tmp_path / "ref") / "step_00000003"
    results = run_ranks(_train_ranks, 2, overrides(tmp_path / "dp2", "parallel.dp=2", f"train.resume={step3}"),
                        timeout=240)
    for losses, counts in results:
        assert counts == ref_counts
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[3:]), rtol=1e-5, atol=0)
