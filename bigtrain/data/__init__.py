"""Data pipeline: corpus -> sentencepiece tokenizer -> token files -> resumable batches."""

from bigtrain.data.dataset import BatchLoader, TokenDataset, load_meta
from bigtrain.data.prepare import prepare
from bigtrain.data.tokenizer import Tokenizer

__all__ = ["BatchLoader", "TokenDataset", "Tokenizer", "load_meta", "prepare"]
