"""Is the data loader ever the bottleneck? Loader tokens/s against what the 125M trainer consumes.

One rank's loader at the llama-125m preset's shapes (seq 2048, micro-batch 16, vocab 49152):
`BatchLoader.next_batch()` over a synthetic prepared directory of --tokens uint16 tokens (random
ids, an EOS every ~1000 tokens, page cache warm after the first pass), the same with
`document_ids` computed for data.document_mask, and a two-source `data.mix` (0.7/0.3). Against:

- the 125M trainer's measured consumption on this machine (one process, train.device=cpu, fp32,
  micro-batch 1, --train-steps steps after one warm-up step);
- the most one GPU could consume: tokens/s at the H200's dense bf16 peak (989 TFLOP/s) at 100%
  MFU, flops_per_token(125M, 2048) per token -- an upper bound no trainer reaches.

Each rank runs its own loader (in its own process), so the per-rank rate is the one to compare.

    python bench/loader.py                     # 64M tokens, 3 s per loader, 2 trainer steps
    python bench/loader.py --train-steps 0     # loaders only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigtrain.config import load_config  # noqa: E402
from bigtrain.data.dataset import BatchLoader, TokenDataset  # noqa: E402
from bigtrain.model import document_ids, flops_per_token  # noqa: E402

H200_BF16_DENSE = 989e12
EOS = 2


def make_dir(root: Path, name: str, tokens: int, vocab: int, seed: int) -> Path:
    d = root / name
    d.mkdir()
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, tokens, dtype=np.uint16)
    ids[rng.integers(0, tokens, tokens // 1000)] = EOS
    val = tokens // 100
    ids[:-val].tofile(d / "train.bin")
    ids[-val:].tofile(d / "val.bin")
    meta = {"vocab_size": vocab, "dtype": "uint16", "train_tokens": tokens - val, "val_tokens": val,
            "bos_id": 1, "eos_id": EOS}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def rate(next_batch, seconds: float, documents: bool = False) -> tuple[float, int]:
    """(tokens/s, batches) of next_batch() over `seconds` (after one warm-up call)."""
    b = next_batch()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next_batch()
        if documents:
            document_ids(b[:, :-1], EOS)
        n += 1
    dt = time.perf_counter() - t0
    return n * b.shape[0] * (b.shape[1] - 1) / dt, n


def trainer_rate(cfg_overrides: list[str], steps: int) -> float:
    """The 125M trainer's tokens/s on this machine (train_step calls, after one warm-up)."""
    from bigtrain.trainer import Trainer

    trainer = Trainer(load_config("configs/llama-125m.yaml", cfg_overrides))
    trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    t = trainer.cfg.train
    return steps * t.global_batch_size * t.seq_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64 << 20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--train-steps", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config("configs/llama-125m.yaml")
    s, b, vocab = cfg.train.seq_len, cfg.train.micro_batch_size, cfg.model.vocab_size
    print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = make_dir(root, "a", args.tokens, vocab, 0)
        c = make_dir(root, "c", args.tokens // 4, vocab, 1)
        single = BatchLoader(TokenDataset(a, "train"), s, b, seed=0)
        rows = {"BatchLoader (one directory)": rate(single.next_batch, args.seconds)}
        rows["BatchLoader + document_ids"] = rate(single.next_batch, args.seconds, documents=True)
        from bigtrain.config import DataConfig
        from bigtrain.data.mixture import MixtureLoader, open_sources

        mix = MixtureLoader(open_sources(DataConfig(mix=[f"{a}:0.7", f"{c}:0.3"])), s, b, seed=0)
        rows["MixtureLoader (2 sources, 0.7/0.3)"] = rate(mix.next_batch, args.seconds)
        data = str(a)
        if args.train_steps:
            consumed = trainer_rate([f"data.path={data}", "train.device=cpu", "train.dtype=fp32",
                                     "train.micro_batch_size=1", "train.global_batch_size=1", "log.progress=false",
                                     "log.wandb.mode=disabled", f"train.out_dir={root / 'run'}",
                                     "recompute.granularity=full"], args.train_steps)
        else:
            consumed = None
    gpu = H200_BF16_DENSE / flops_per_token(cfg.model, s)
    print(f"\nseq {s}, micro-batch {b}, vocab {vocab}; tokens/s of one rank's loader")
    print("| loader | tokens/s | batches | vs one H200 at 100% MFU | vs the 125M trainer here |")
    print("|---|---|---|---|---|")
    for name, (tps, n) in rows.items():
        here = f"{tps / consumed:,.0f}x" if consumed else "-"
        print(f"| {name} | {tps / 1e6:,.1f} M | {n} | {tps / gpu:,.1f}x | {here} |")
    print(f"\none H200 at 100% MFU would consume {gpu / 1e6:.2f} M tokens/s "
          f"({flops_per_token(cfg.model, s) / 1e9:.2f} GFLOP/token)")
    if consumed:
        print(f"the 125M trainer here (CPU fp32, micro-batch 1, full recompute): {consumed:,.0f} tokens/s")
    print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
