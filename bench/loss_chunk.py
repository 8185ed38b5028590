"""What train.loss_chunk saves and costs: the real trainer's peak memory (MemTracker over 2 real
train_step() calls on CPU tensors, as the planner's matrix measures it), the planner's
prediction, and the step time, for the whole-sequence loss and chunks of --chunks positions.

Default shape: the llama-125m preset's 49152-token vocabulary (where the logits are the largest
activation) on a smaller body (dim 512, 4 blocks) so that a CPU step takes about a second.
Rounds are interleaved (each chunk size in turn), the median per step is shown.

    PYTHONPATH=. .venv/bin/python bench/loss_chunk.py --data data/shakespeare [--chunks 0,512,128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigtrain.config import load_config  # noqa: E402
from timing import interleaved_step_times, load_line  # noqa: E402  (bench/ is on sys.path: the script's folder)

BODY = ["model.dim=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=8", "train.seq_len=512",
        "train.micro_batch_size=4", "train.global_batch_size=4"]


def config(data: str, chunk: int, extra: list[str]):
    out = Path(tempfile.mkdtemp(prefix="bench-chunk-")) / "run"
    return load_config("configs/llama-125m.yaml", [*BODY, f"data.path={data}", f"train.out_dir={out}",
                                                   "train.device=cpu", "train.dtype=fp32", "log.progress=false",
                                                   "log.wandb.mode=disabled", f"train.loss_chunk={chunk}", *extra])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--chunks", default="0,512,128")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from bigtrain.planner.measure import measured_peak, planned
    from bigtrain.trainer import Trainer

    chunks = [int(c) for c in a.chunks.split(",")]
    print(load_line())
    rows = {}
    for c in chunks:
        cfg = config(a.data, c, a.overrides)
        rows[c] = {"planned": planned(cfg).peak, "measured": measured_peak(cfg, steps=2)["Total"]}
    trainers = {c: Trainer(config(a.data, c, a.overrides)) for c in chunks}
    for c, times in interleaved_step_times(trainers, a.rounds, a.steps).items():
        rows[c]["times"] = times
    cfg = trainers[chunks[0]].cfg
    print(f"\nconfigs/llama-125m.yaml + {' '.join(BODY + a.overrides)} (vocab {cfg.model.vocab_size}), fp32 CPU")
    print("| train.loss_chunk | measured peak MiB | planned MiB | error | vs whole | s per step | vs whole |")
    print("|---|---|---|---|---|---|---|")
    base = rows[chunks[0]]
    for c, r in rows.items():
        med, bmed = statistics.median(r["times"]), statistics.median(base["times"])
        print(f"| {c or 'whole'} | {r['measured'] / 2**20:.1f} | {r['planned'] / 2**20:.1f} | "
              f"{100 * (r['planned'] / r['measured'] - 1):+.2f}% | {r['measured'] / base['measured']:.3f} | "
              f"{med:.3f} [{', '.join(f'{x:.2f}' for x in r['times'])}] | {med / bmed:.3f} |")
    print(load_line())


if __name__ == "__main__":
    main()
