"""A thin wrapper around a sentencepiece model file.

The models written by `bigtrain prepare` use identity normalisation, no dummy prefix and byte
fallback, so `decode(encode(text)) == text` for any text: characters the vocabulary lacks become
their UTF-8 bytes instead of an unknown token. `prepare --tokenizer` reads any other sentencepiece
model (a Hugging Face Llama tokenizer.model, say) through `read_tokenizer`; `check_vocab` is the
train-time check that a model fits the data's vocabulary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from bigtrain.errors import UserError


class Tokenizer:
    """Text <-> token ids with the sentencepiece model at `path` (usually data.path/tokenizer.model)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"tokenizer {str(self.path)!r} does not exist; run `bigtrain prepare` to make one")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"tokenizer {str(self.path)!r} is not a sentencepiece model ({reason}); "
                            f"rerun `bigtrain prepare`") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; accepts a list, a numpy array or a 1-d tensor."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


TOKENIZER_FILE = "tokenizer.model"

_TOKENIZER_CHOICES = ("give a sentencepiece .model file or a directory holding tokenizer.model "
                      "(a `bigtrain import-hf` run, a Hugging Face Llama model, a prepared data directory)")


def find_tokenizer(path: str | Path) -> Path:
    """The sentencepiece model that `prepare --tokenizer PATH` names: PATH itself, or PATH/tokenizer.model
    for a directory (where import-hf, export-hf, prepare and Hugging Face Llama models keep it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / TOKENIZER_FILE
        if f.is_file():
            return f
        # Llama 3 and most newer models ship only tokenizer.json (tiktoken-style BPE), which
        # sentencepiece cannot read: say so rather than "no tokenizer".
        has = " (it has tokenizer.json, which is not a sentencepiece model)" if (p / "tokenizer.json").is_file() else ""
        raise UserError(f"tokenizer directory {str(path)!r} has no {TOKENIZER_FILE}{has}; {_TOKENIZER_CHOICES}")
    if not p.is_file():
        raise UserError(f"tokenizer {str(path)!r} does not exist; {_TOKENIZER_CHOICES}")
    return p


def read_tokenizer(path: str | Path) -> tuple[bytes, spm.SentencePieceProcessor]:
    """The bytes of the sentencepiece model `path` names (see find_tokenizer), loaded and checked."""
    f = find_tokenizer(path)
    try:
        model = f.read_bytes()
        sp = spm.SentencePieceProcessor(model_proto=model)
    except (RuntimeError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"tokenizer {str(f)!r} is not a sentencepiece model ({reason}); {_TOKENIZER_CHOICES}") from None
    # Prepared token files end every document with EOS, so the boundary is visible in training.
    if sp.eos_id() < 0:
        raise UserError(f"tokenizer {str(f)!r} has no EOS piece, which prepare puts after every document; "
                        f"give a tokenizer with one (every Llama tokenizer.model has </s>)")
    return model, sp


def model_type(model: bytes) -> str | None:
    """"bpe", "unigram", "word" or "char" for a serialized sentencepiece model (None without protobuf)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf is optional for sentencepiece; the type is only informative
        return None
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    return pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()


def check_vocab(meta: dict, model_vocab_size: int, model_tokenizer: str | Path | None = None) -> None:
    """Refuse to train a model on token ids it cannot embed, or on another tokenizer's ids.

    `meta` is data.path's meta.json, `model_vocab_size` the resolved model.vocab_size, and
    `model_tokenizer` the tokenizer.model that came with the model's weights (an import-hf run
    directory has one), if any. A model vocabulary larger than the data's is fine (padded
    vocabularies). Without this, a too-small embedding fails deep in the first step (an index
    error on CPU, a device-side assert on GPU), and a foreign tokenizer fails silently: the
    loss is high and the model forgets what it knew.
    """
    vocab = int(meta["vocab_size"])
    source = meta.get("tokenizer_source") or "prepare's own trained tokenizer"
    if model_vocab_size < vocab:
        raise UserError(f"model.vocab_size={model_vocab_size} is smaller than the data's vocabulary ({vocab}, from "
                        f"{source}); prepare the data with the model's tokenizer (bigtrain prepare --tokenizer RUN_DIR) "
                        f"or set model.vocab_size >= {vocab}")
    mine = Path(model_tokenizer) if model_tokenizer is not None else None
    if mine is not None and mine.is_file() and "tokenizer_sha256" in meta:
        if hashlib.sha256(mine.read_bytes()).hexdigest() != meta["tokenizer_sha256"]:
            raise UserError(f"the data was tokenized with {source}, not with the model's own {str(mine)!r}; "
                            f"prepare it with: bigtrain prepare --tokenizer {str(mine)!r} --corpus ...")
