"""What data.document_mask costs: step time and peak memory with and without it, side by side.

configs/debug.yaml on the CPU (fp32) over a prepared directory of many short documents, the same
batches for both: `Trainer.train_step()` timed over --steps steps after a warm-up, rounds
interleaved (mask, no mask, mask, ...), median per step; and the planner's predicted peak for
each (its document term: the (b, 1, s, s) mask and the per-token rotary angles).

    PYTHONPATH=. .venv/bin/python bench/document_mask.py --data DIR [--seq 256] [--steps 10] [--rounds 3]
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


def trainer(data: str, seq: int, mask: bool, extra: list[str]):
    from bigtrain.trainer import Trainer

    out = Path(tempfile.mkdtemp(prefix="bench-docmask-")) / "run"
    cfg = load_config("configs/debug.yaml", [f"data.path={data}", f"train.out_dir={out}", "train.device=cpu",
                                             "train.dtype=fp32", f"train.seq_len={seq}", f"model.max_seq_len={seq}",
                                             "log.progress=false", "log.wandb.mode=disabled",
                                             f"data.document_mask={str(mask).lower()}", *extra])
    return Trainer(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from bigtrain.planner import estimate
    from bigtrain.recompute.policy import spans_of

    print(load_line())
    runs = {m: trainer(a.data, a.seq, m, a.overrides) for m in (False, True)}
    times = interleaved_step_times(runs, a.rounds, a.steps)
    cfg = runs[False].cfg
    print(f"\nconfigs/debug.yaml {' '.join(a.overrides)}, seq {a.seq}, micro-batch {cfg.train.micro_batch_size}, "
          f"global {cfg.train.global_batch_size}, median of {a.rounds} rounds of {a.steps} steps")
    print("| data.document_mask | s per step | vs without | planned peak MiB |")
    print("|---|---|---|---|")
    base = statistics.median(times[False])
    for m, t in runs.items():
        est = estimate(t.job, spans_of(t.cfg.recompute, t.cfg.model.n_layers))
        med = statistics.median(times[m])
        print(f"| {str(m).lower()} | {med:.3f} [{', '.join(f'{x:.3f}' for x in times[m])}] | {med / base:.3f} | "
              f"{est.peak / 2**20:.1f} |")
    print(load_line())


if __name__ == "__main__":
    main()
