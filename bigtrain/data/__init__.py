"""Data pipeline: corpus -> sentencepiece tokenizer -> token files -> resumable batches."""

from bigtrain.data.prepare import prepare
from bigtrain.data.tokenizer import Tokenizer, check_vocab

__all__ = ["BatchLoader", "TokenDataset", "Tokenizer", "check_vocab", "load_meta", "prepare"]

_DATASET = ("BatchLoader", "TokenDataset", "load_meta")


def __getattr__(name: str):
    # The dataset half imports torch (1-2 s, ~200 MB); `bigtrain prepare` and each of its
    # encoding processes import this package but never need it.
    if name in _DATASET:
        from bigtrain.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
