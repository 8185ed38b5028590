"""A thin wrapper around a sentencepiece model file.

The models written by `bigtrain prepare` use identity normalisation, no dummy prefix and byte
fallback, so `decode(encode(text)) == text` for any text: characters the vocabulary lacks become
their UTF-8 bytes instead of an unknown token.
"""

from __future__ import annotations

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
