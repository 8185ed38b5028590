"""Weighted mixtures of prepared directories (`data.mix`): one layout-independent, resumable stream.

Global sample k of a mixture comes from source s_k, drawn independently for every k with the
mixture's (normalised) weights from a generator seeded by (seed, k // CHOICE_BLOCK); it is
sample j_k of that source's own stream, j_k = how many of samples 0..k-1 came from s_k, and a
source's stream is BatchLoader's: window perm_e[j mod n] of epoch e = j // n, perm_e a
permutation seeded by (seed, source index, e). So, as for one directory, the samples of a global
batch depend only on the seed and the position, never on the number of ranks: rank r of `world`
takes samples [c + r*b, c + (r+1)*b) of the next c + world*b, and every rank follows the whole
global batch's sources to keep the per-source positions. The state is the global position c and
those per-source positions at c (a checkpoint never replays the history), and any layout resumes it.

Sources must share one tokenizer (their ids mean the same text): `mixture_meta` compares meta.json's
tokenizer_sha256 where the sources record it, and vocab_size/bos_id/eos_id always.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigtrain.config import DataConfig
from bigtrain.data.dataset import TokenDataset, check_loader_args, load_meta
from bigtrain.errors import UserError

CHOICE_BLOCK = 1 << 16
"""Samples whose sources one generator draws (the choices of a block are made, and cached, at once)."""
_CHOICE_TAG = 0x6D697863  # "mixc": keeps the source-choice and window streams apart from BatchLoader's
_SOURCE_TAG = 0x6D697873  # "mixs"


def source_names(dirs: list[str]) -> list[str]:
    """Short names for metrics (val_loss/NAME): each directory's last component, or the path as
    written where two share one."""
    base = [Path(d).name or d for d in dirs]
    return [b if base.count(b) == 1 else os.path.normpath(d) for b, d in zip(base, dirs)]


def data_meta(data: DataConfig) -> dict:
    """The meta.json that stands for the training data: data.path's, or the mixture's shared one."""
    mixture = data.mixture()
    return mixture_meta([d for d, _ in mixture]) if mixture else load_meta(data.path)


def mixture_meta(dirs: list[str]) -> dict:
    """The sources' common tokenizer facts (the first source's meta, preferring one that records
    tokenizer_sha256); one line naming the two sources that disagree otherwise."""
    metas = [load_meta(d) for d in dirs]
    first = dirs[0]
    with_sha = [(d, m) for d, m in zip(dirs, metas) if "tokenizer_sha256" in m]
    fix = (f"prepare every source with one tokenizer (bigtrain prepare --tokenizer {first} --corpus ... "
           f"--out DIR)")
    for d, m in with_sha[1:]:
        d0, m0 = with_sha[0]
        if m["tokenizer_sha256"] != m0["tokenizer_sha256"]:
            raise UserError(f"data.mix: {d} and {d0} were tokenized with different tokenizers (tokenizer_sha256 "
                            f"{m['tokenizer_sha256'][:12]}... vs {m0['tokenizer_sha256'][:12]}...); {fix}")
    for d, m in zip(dirs[1:], metas[1:]):
        for key in ("vocab_size", "bos_id", "eos_id"):
            if m[key] != metas[0][key]:
                raise UserError(f"data.mix: {d} has {key}={m[key]} but {first} has {key}={metas[0][key]}: "
                                f"different tokenizers; {fix}")
    return with_sha[0][1] if with_sha else metas[0]


@dataclass
class Source:
    name: str
    weight: float  # normalised: the weights of a mixture sum to 1
    train: TokenDataset
    val: TokenDataset


def open_sources(data: DataConfig) -> list[Source]:
    """data.mix's directories, opened (train and val splits), with normalised weights."""
    mixture = data.mixture()
    mixture_meta([d for d, _ in mixture])
    total = sum(w for _, w in mixture)
    names = source_names([d for d, _ in mixture])
    return [Source(n, w / total, TokenDataset(d, "train"), TokenDataset(d, "val"))
            for n, (d, w) in zip(names, mixture)]


class _Windows:
    """One source's stream of windows: sample j is window perm_e[j mod n], e = j // n."""

    def __init__(self, n_windows: int, entropy: list[int]):
        self.n = n_windows
        self.entropy = entropy
        self._perms: dict[int, np.ndarray] = {}

    def at(self, j: np.ndarray) -> np.ndarray:
        epoch, pos = np.divmod(j, self.n)
        idx = np.empty(len(j), dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            idx[sel] = self._perm(int(e))[pos[sel]]
        return idx

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([*self.entropy, epoch]).permutation(self.n)
            if len(self._perms) >= 2:  # a batch usually spans at most two epochs of a source
                del self._perms[min(self._perms)]
            self._perms[epoch] = perm
        return perm


class MixtureLoader:
    """Micro-batches of (b, s + 1) token windows from a weighted mixture, for data-parallel rank
    `rank` of `world` (BatchLoader's interface: next_batch, state_dict, load_state_dict).

    `source_counts()` gives the samples each source has contributed to the whole job so far
    (all ranks; times seq_len for tokens), the same at any layout and across a resume.
    """

    def __init__(self, sources: list[Source], seq_len: int, micro_batch: int, seed: int,
                 rank: int = 0, world: int = 1):
        check_loader_args(seq_len, micro_batch, rank, world)
        if not sources:
            raise UserError("a data mixture needs at least one source")
        self.sources = sources
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        seed64 = seed % (1 << 64)  # SeedSequence needs non-negative entropy
        self._windows = []
        for i, s in enumerate(sources):
            n = max(0, (len(s.train) - 1) // seq_len)
            if n < 1:
                raise UserError(f"data.mix source {s.name}: train split has {len(s.train)} tokens, not one window "
                                f"of seq_len={seq_len}; lower seq_len, prepare more data or drop the source")
            self._windows.append(_Windows(n, [seed64, _SOURCE_TAG, i]))
        self._choice_entropy = [seed64, _CHOICE_TAG]
        self._cdf = np.cumsum([s.weight for s in sources])
        self._cdf /= self._cdf[-1]
        self._blocks: dict[int, np.ndarray] = {}
        self._offsets = np.arange(seq_len + 1)
        self.consumed = 0
        """Samples taken so far by all ranks together (the global position c)."""
        self.taken = np.zeros(len(sources), dtype=np.int64)
        """Samples taken from each source by all ranks together, at position c."""

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def choices(self, first: int, count: int) -> np.ndarray:
        """Source indices of global samples [first, first + count)."""
        out = np.empty(count, dtype=np.int64)
        k = first
        while k < first + count:
            block, pos = divmod(k, CHOICE_BLOCK)
            n = min(CHOICE_BLOCK - pos, first + count - k)
            out[k - first:k - first + n] = self._block(block)[pos:pos + n]
            k += n
        return out

    def _block(self, block: int) -> np.ndarray:
        src = self._blocks.get(block)
        if src is None:
            u = np.random.default_rng([*self._choice_entropy, block]).random(CHOICE_BLOCK)
            # u < cdf[0] -> 0, ...; the clip guards a last cdf entry that rounds below 1.
            src = np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self._cdf) - 1)
            if len(self._blocks) >= 2:
                del self._blocks[min(self._blocks)]
            self._blocks[block] = src
        return src

    def next_batch(self) -> torch.Tensor:
        """This rank's next (b, s + 1) int64 batch: inputs are [:, :-1], targets [:, 1:]."""
        b, n = self.micro_batch, self.micro_batch * self.world
        src = self.choices(self.consumed, n)  # the whole global batch: every rank keeps the positions
        j = np.empty(n, dtype=np.int64)  # each sample's position in its source's stream
        for i in np.unique(src):
            sel = src == i
            j[sel] = self.taken[i] + np.arange(int(sel.sum()))
        mine = slice(self.rank * b, (self.rank + 1) * b)
        batch = np.empty((b, self.seq_len + 1), dtype=np.int64)
        for i in np.unique(src[mine]):
            sel = src[mine] == i
            idx = self._windows[i].at(j[mine][sel])
            batch[sel] = self.sources[i].train.tokens[idx[:, None] * self.seq_len + self._offsets]
        self.taken += np.bincount(src, minlength=len(self.sources))
        self.consumed += n
        return torch.from_numpy(batch)

    def weights(self) -> dict[str, float]:
        """Each source's normalised weight, by name (the weights of val_loss under data.mix)."""
        return {s.name: s.weight for s in self.sources}

    def source_counts(self) -> dict[str, int]:
        """Samples each source has contributed so far, all ranks together (x seq_len = tokens)."""
        return {s.name: int(t) for s, t in zip(self.sources, self.taken)}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "source_consumed": [int(t) for t in self.taken],
                "seq_len": self.seq_len, "seed": self.seed, "mix": self._mix_state()}

    def _mix_state(self) -> list[dict]:
        return [{"name": s.name, "weight": s.weight, "tokens": len(s.train)} for s in self.sources]

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`'s global position; any rank/world/micro_batch may load it."""
        if "mix" not in state:
            raise UserError("the checkpoint's data position is of a single data.path, not of a data.mix mixture; "
                            "resume with the checkpoint's data settings (or start fresh with train.resume=none)")
        mine = {"seq_len": self.seq_len, "seed": self.seed}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(f"data loader state has {key}={state.get(key)!r} but this run has {key}={value!r}; "
                                f"{key} must match the checkpoint's (or start fresh with train.resume=none)")
        saved = [(m.get("weight"), m.get("tokens")) if isinstance(m, dict) else m for m in state["mix"]]
        if saved != [(m["weight"], m["tokens"]) for m in self._mix_state()]:
            was = ", ".join(f"{m.get('name')}:{m.get('weight')!r} ({m.get('tokens')} tokens)"
                            if isinstance(m, dict) else repr(m) for m in state["mix"])
            now = ", ".join(f"{s.name}:{s.weight!r} ({len(s.train)} tokens)" for s in self.sources)
            raise UserError(f"data loader state has the mixture [{was}] but this run has [{now}]; the sources, "
                            f"their data and their weights must match the checkpoint's (or start fresh with "
                            f"train.resume=none)")
        consumed, taken = state.get("consumed"), state.get("source_consumed")
        if not _count(consumed) or not isinstance(taken, list) or len(taken) != len(self.sources) \
                or not all(_count(t) for t in taken) or sum(taken) != consumed:
            raise UserError(f"data loader state has consumed={consumed!r}, source_consumed={taken!r}; expected "
                            f"non-negative integers, one per source, summing to consumed")
        self.consumed = int(consumed)
        self.taken = np.array(taken, dtype=np.int64)


def _count(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0
