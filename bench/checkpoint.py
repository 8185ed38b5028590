"""Per-step host syncs and checkpoint bytes, side by side in one invocation (CPU or GPU).

    .venv/bin/python bench/checkpoint.py --data data/shakespeare [--steps 40] [--repeats 2]
        [--compare-tree DIR] [--skip-sync] [--skip-bytes]

1. tokens/s with log.every=1 against log.every=10 (single process and dp=2 under torchrun):
   log.every=1 reads the loss and grad norm every step, log.every=10 every tenth. tokens/s is
   the training tokens of the logged windows after the first, over their wall time.
2. checkpoint bytes of the same step at dp=1, dp=2 and tp=2 x dp=2: each tensor written once
   means the three agree to within the per-rank RNG state.
3. (--async-save) wall time of a run that saves every 2 steps, train.async_save false vs true
   (tokens/s excludes save time by design, so the whole run's seconds are compared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=128", "train.seq_len=128",
         "train.micro_batch_size=4", "train.global_batch_size=8", "log.progress=false", "log.wandb.mode=disabled",
         "train.eval_every=0", "data.eval_batches=1"]


def train(data: str, nproc: int, extra: list[str], threads: int, root: Path = ROOT) -> Path:
    out = Path(tempfile.mkdtemp(prefix="bench-ckpt-")) / "run"
    args = ["train", "--config", "configs/debug.yaml", *MODEL, f"data.path={data}", f"train.out_dir={out}", *extra]
    cmd = [sys.executable, "-m", "bigtrain.cli", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "bigtrain.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(root)}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return out


def tokens_per_s(out: Path, tokens_per_step: int, every: int) -> float:
    """Tokens over time of every logged window but the first (warm-up)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["step"] > max(every, 10)]
    tokens = sum(tokens_per_step * every for _ in windows)
    seconds = sum(tokens_per_step * every / r["tokens_per_s"] for r in windows)
    return tokens / seconds


def sync_bench(data: str, steps: int, repeats: int, trees: dict[str, Path]) -> None:
    """Runs interleaved (every tree and log.every in turn, `repeats` rounds) so that a change in
    the machine's load hits all of them alike; the median of the rounds is shown."""
    tokens = 8 * 128
    print(f"{'tree':8} {'layout':8} {'log.every=1':>12} {'log.every=10':>13} {'ratio':>7}  (tokens/s)")
    for name, nproc, extra in (("single", 1, []), ("dp2", 2, ["parallel.dp=2"])):
        tps = {(t, e): [] for t in trees for e in (1, 10)}
        for _ in range(repeats):
            for tree, root in trees.items():
                for every in (1, 10):
                    run = train(data, nproc, [*extra, f"train.steps={steps}", "train.save_every=0",
                                              f"log.every={every}"], threads=1, root=root)
                    tps[tree, every].append(tokens_per_s(run, tokens, every))
        for tree in trees:
            one, ten = (statistics.median(tps[tree, e]) for e in (1, 10))
            print(f"{tree:8} {name:8} {one:12.0f} {ten:13.0f} {ten / one:7.3f}", flush=True)


def checkpoint_bytes(step_dir: Path) -> dict:
    files = {p.name: p.stat().st_size for p in step_dir.rglob("*") if p.is_file()}
    return {"total": sum(files.values()), "files": len(files)}


def bytes_bench(data: str, root: Path = ROOT) -> None:
    base = None
    print(f"{'layout':8} {'files':>5} {'bytes':>12} {'vs dp1':>7}")
    for name, nproc, extra in (("dp1", 1, []), ("dp2", 2, ["parallel.dp=2"]),
                               ("tp2dp2", 4, ["parallel.tp=2", "parallel.dp=2"])):
        run = train(data, nproc, [*extra, "train.steps=2", "log.every=1"], threads=1, root=root)
        b = checkpoint_bytes(run / "checkpoints" / "step_00000002")
        base = base or b["total"]
        print(f"{name:8} {b['files']:5d} {b['total']:12d} {b['total'] / base:7.3f}", flush=True)


def async_bench(data: str, steps: int, repeats: int, out_root: str | None) -> None:
    seconds = {False: [], True: []}
    for _ in range(repeats):
        for background in (False, True):
            t0 = time.perf_counter()
            extra = [f"train.steps={steps}", "train.save_every=2", "log.every=10", "checkpoint.keep_last=2",
                     f"train.async_save={str(background).lower()}"]
            if out_root:
                extra.append(f"train.out_dir={tempfile.mkdtemp(dir=out_root)}/run")
            train(data, 1, extra, threads=1)
            seconds[background].append(time.perf_counter() - t0)
    sync, bg = (statistics.median(seconds[b]) for b in (False, True))
    print(f"save every 2 of {steps} steps: {sync:.1f} s in the foreground, {bg:.1f} s in the background "
          f"(ratio {bg / sync:.3f}; process start included)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a prepared data directory")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-sync", action="store_true")
    ap.add_argument("--skip-bytes", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--async-save", action="store_true", help="also time train.async_save")
    ap.add_argument("--out-root", help="where the --async-save runs write (a real disk; default: the temp dir)")
    ap.add_argument("--compare-tree", type=Path, help="another checkout (e.g. the commit before) run alongside")
    a = ap.parse_args()
    trees = {"this": ROOT, **({"other": a.compare_tree.resolve()} if a.compare_tree else {})}
    print(f"load: {os.getloadavg()}")
    if not a.skip_sync:
        sync_bench(a.data, a.steps, a.repeats, trees)
    if a.async_save:
        async_bench(a.data, a.steps, a.repeats, a.out_root)
    if not a.skip_bytes:
        for tree, root in trees.items():
            print(f"checkpoint bytes, {tree} tree")
            bytes_bench(a.data, root)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
