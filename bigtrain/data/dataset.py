"""Token files written by `bigtrain prepare`, and a resumable, layout-independent batch stream.

A split is cut into n = (tokens - 1) // seq_len windows of seq_len + 1 tokens (inputs and the
next-token targets), window i starting at i * seq_len, so windows share one boundary token and
none overlaps the next. The loader numbers samples globally: sample k is window perm_e[k mod n]
of epoch e = k // n, where perm_e is a permutation seeded by (seed, e). Data-parallel rank r of
`world` takes samples [c + r*b, c + (r+1)*b) of the next c + world*b, b = micro_batch, so the
samples of a global batch depend only on the seed and the position c, never on how many ranks
share them; a checkpointed c resumes the stream exactly, under any layout.

Shapes: b = micro-batch, s = seq_len.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import numpy as np
import torch

from bigtrain.errors import UserError

SPLITS = ("train", "val")
META_KEYS = ("vocab_size", "dtype", "train_tokens", "val_tokens", "bos_id", "eos_id")
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "uint64")
"""What a token file may hold: unsigned integers (a float16 file has uint16's item size but is garbage as ids)."""
SCAN_CHUNK = 1 << 24
"""Tokens per chunk when a token file is scanned for its largest id at open (16 Mi tokens, 32 MiB of uint16)."""


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_meta(meta: dict, f: Path, fix: str) -> None:
    """The type and range of every field of meta.json: one line naming the field and what it must be."""
    def bad(key, want):
        raise UserError(f"{f}: {key}={meta[key]!r} {want}; {fix}")

    if not _is_int(meta["vocab_size"]) or meta["vocab_size"] < 1:
        bad("vocab_size", "must be a positive integer")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in TOKEN_DTYPES:
        bad("dtype", f"is not allowed; token files hold one of {', '.join(TOKEN_DTYPES)}")
    if meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1:
        bad("vocab_size", f"does not fit in dtype {meta['dtype']} (at most {np.iinfo(meta['dtype']).max + 1} ids)")
    for key in ("train_tokens", "val_tokens"):
        if not _is_int(meta[key]) or meta[key] < 0:
            bad(key, "must be an integer >= 0")
    for key in ("bos_id", "eos_id"):  # sentencepiece writes -1 for a disabled piece
        if not _is_int(meta[key]) or not -1 <= meta[key] < meta["vocab_size"]:
            bad(key, f"must be an integer in [-1, vocab_size={meta['vocab_size']})")


def load_meta(path: str | Path) -> dict:
    """meta.json of a prepared data directory (`data.path`)."""
    p = Path(path)
    fix = f"run `bigtrain prepare --out {path}` first"
    if not p.is_dir():
        raise UserError(f"data.path {str(path)!r} does not exist; {fix}")
    f = p / "meta.json"
    if not f.is_file():
        raise UserError(f"data.path {str(path)!r} has no meta.json; {fix}")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{f} is not valid JSON ({e}); rerun `bigtrain prepare --out {path}`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{f} holds a {type(meta).__name__}, not an object of fields; rerun `bigtrain prepare --out {path}`")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{f} lacks {missing}; rerun `bigtrain prepare --out {path}`")
    check_meta(meta, f, f"rerun `bigtrain prepare --out {path}`")
    return meta


class TokenDataset:
    """One split ("train" or "val") of a prepared directory as a read-only memmap of token ids."""

    def __init__(self, path: str | Path, split: str):
        if split not in SPLITS:
            raise UserError(f"split {split!r} is not allowed; choose one of {', '.join(SPLITS)}")
        self.path = Path(path)
        self.split = split
        self.meta = load_meta(path)
        dtype = np.dtype(self.meta["dtype"])
        n = self.meta[f"{split}_tokens"]
        f = self.path / f"{split}.bin"
        fix = f"rerun `bigtrain prepare --out {path}`"
        size = f.stat().st_size if f.is_file() else None
        if size is not None and size % dtype.itemsize:
            raise UserError(f"{f} has {size} bytes, not a whole number of {dtype.name} tokens "
                            f"({dtype.itemsize} bytes each): a truncated file or the wrong dtype in meta.json; {fix}")
        if size != n * dtype.itemsize:
            found = "is missing" if size is None else f"has {size} bytes"
            raise UserError(f"{f} {found} but meta.json says {n} {dtype.name} tokens; {fix}")
        # np.memmap cannot map an empty file; an empty split stays usable as an empty array.
        self.tokens = np.memmap(f, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)
        self.max_id = _max_id(self.tokens)
        vocab = self.meta["vocab_size"]
        if self.max_id >= vocab:
            raise UserError(f"{f} holds token id {self.max_id} but meta.json says vocab_size={vocab} (ids must be "
                            f"< vocab_size): the tokens and meta.json come from different tokenizers; {fix}")

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, {self.split!r}, tokens={len(self)})"


def _max_id(tokens: np.ndarray) -> int:
    """The largest id in a (memmapped) token array, read in chunks: one pass, bounded memory."""
    best = -1
    for i in range(0, len(tokens), SCAN_CHUNK):
        best = max(best, int(tokens[i:i + SCAN_CHUNK].max()))
    return best


def check_loader_args(seq_len: int, micro_batch: int, rank: int, world: int) -> None:
    """What every batch loader (one directory, or a data.mix mixture) needs of its arguments."""
    if seq_len < 1 or micro_batch < 1:
        raise UserError(f"seq_len={seq_len} and micro_batch={micro_batch} must be >= 1")
    if not 0 <= rank < world:
        raise UserError(f"data-parallel rank {rank} is not in [0, world={world})")


class BatchLoader:
    """Micro-batches of (b, s + 1) token windows for data-parallel rank `rank` of `world`.

    `rank`/`world` are the data-parallel rank and size: tensor-parallel peers pass the same rank
    and get the same batches. Call `next_batch()` once per micro-batch (gradient accumulation
    included); every call, on every rank, advances the global position by micro_batch * world.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, micro_batch: int, seed: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        check_loader_args(seq_len, micro_batch, rank, world)
        self.dataset = dataset
        self.tokens = dataset.tokens
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.shuffle = shuffle
        self.n_windows = max(0, (len(dataset) - 1) // seq_len)
        need = micro_batch * world
        if self.n_windows < need:
            raise UserError(f"{dataset.split} split has {len(dataset)} tokens = {self.n_windows} windows of "
                            f"seq_len={seq_len}; need at least {need} (micro_batch {micro_batch} x world {world}); "
                            f"lower seq_len or prepare more data")
        self.consumed = 0
        """Samples taken so far by all ranks together (the global position c)."""
        self._perms: dict[int, np.ndarray] = {}
        self._offsets = np.arange(seq_len + 1)

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                # SeedSequence needs non-negative entropy; the modulo keeps negative seeds distinct.
                rng = np.random.default_rng([self.seed % (1 << 64), epoch])
                perm = rng.permutation(self.n_windows)
            else:
                perm = np.arange(self.n_windows)
            # A batch spans at most two epochs (n_windows >= micro_batch * world), so two suffice.
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = perm
        return perm

    def windows(self, first: int, count: int) -> np.ndarray:
        """Window indices of global samples [first, first + count)."""
        k = np.arange(first, first + count)
        epoch, pos = np.divmod(k, self.n_windows)
        idx = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            idx[sel] = self._perm(int(e))[pos[sel]]
        return idx

    def next_batch(self) -> torch.Tensor:
        """This rank's next (b, s + 1) int64 batch: inputs are [:, :-1], targets [:, 1:]."""
        b = self.micro_batch
        idx = self.windows(self.consumed + self.rank * b, b)
        # One fancy-indexing gather from the memmap: (b, 1) starts + (s + 1,) offsets.
        batch = self.tokens[idx[:, None] * self.seq_len + self._offsets]  # (b, s + 1)
        self.consumed += b * self.world
        return torch.from_numpy(batch.astype(np.int64))

    @property
    def epoch(self) -> float:
        """Passes over the split so far, fractional."""
        return self.consumed / self.n_windows

    def source_counts(self) -> dict[str, int]:
        """Samples per data.mix source ({} for one directory; see MixtureLoader)."""
        return {}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "tokens": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`'s global position; any rank/world/micro_batch may load it."""
        if "mix" in state:
            raise UserError("the checkpoint's data position is of a data.mix mixture, not of a single data.path; "
                            "resume with the checkpoint's data.mix (or start fresh with train.resume=none)")
        mine = {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle, "tokens": len(self.dataset)}
        for key, value in mine.items():
            if key in state and state[key] != value:
                why = "the data changed since the checkpoint" if key == "tokens" else f"{key} must match the checkpoint's"
                raise UserError(f"data loader state has {key}={state[key]!r} but this run has {key}={value!r}; "
                                f"{why} (or start fresh with train.resume=none)")
        consumed = state.get("consumed")
        if isinstance(consumed, bool) or not isinstance(consumed, numbers.Integral) or consumed < 0:
            raise UserError(f"data loader state has consumed={consumed!r}; expected a non-negative integer")
        self.consumed = int(consumed)
