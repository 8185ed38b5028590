"""Tokens/s of real `bigtrain train` runs, side by side in one invocation, plus a FLOPs check.

    .venv/bin/python bench/throughput.py [--config configs/debug.yaml] [--steps 30]
        [--layouts single,tp2,dp2] [--flops-only] [key.sub=value ...]

Each layout is a full training run (torchrun with gloo for more than one process) on the same
config; tokens/s is the median of the logged steps after the first few (warm-up excluded). The
FLOPs check compares flops_per_token() with torch's FlopCounterMode on one forward+backward
(--flops-only skips the training runs, e.g. for a model too big to train on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name -> (processes, overrides)
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2": (2, ["parallel.dp=2"]),
}


def run_layout(config: str, nproc: int, overrides: list[str], steps: int, threads: int) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="bench-")) / "run"
    args = ["train", "--config", config, *overrides, f"train.steps={steps}", f"train.out_dir={out}",
            "train.save_every=0", "train.eval_every=0", "log.every=1", "log.progress=false",
            "log.wandb.mode=disabled"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "bigtrain.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bigtrain.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"layout failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def flops_check(config: str, overrides: list[str]) -> tuple[float, float]:
    from bigtrain.config import load_config
    from bigtrain.model import build_model, flops_per_token, init_weights
    from bigtrain.job import resolve

    cfg = resolve(load_config(config, overrides), 1, "cpu").cfg  # model.vocab_size from the data
    model = init_weights(build_model(cfg.model), seed=0)
    b, s = cfg.train.micro_batch_size, cfg.train.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (b, s))
    # CPU fused SDPA has no registered FLOP formula; the math backend counts the same attention.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    return flops_per_token(cfg.model, s), fc.get_total_flops() / (b * s)


def same_global_batch(config: str, overrides: list[str], nproc: int, extra: list[str]) -> list[str]:
    """Data-parallel layouts keep the config's global batch: when micro_batch_size * dp exceeds
    it, each rank gets global / dp sequences per micro-batch (so every layout trains the same
    tokens per step and the final losses stay comparable)."""
    from bigtrain.config import load_config

    cfg = load_config(config, [*overrides, *extra])
    dp = cfg.parallel.dp or nproc // cfg.parallel.tp
    t = cfg.train
    if dp > 1 and t.micro_batch_size * dp > t.global_batch_size and t.global_batch_size % dp == 0:
        return [f"train.micro_batch_size={t.global_batch_size // dp}"]
    return []


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="logged steps excluded from the median")
    p.add_argument("--layouts", default="single", help=f"comma-separated, from {', '.join(LAYOUTS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--flops-only", action="store_true", help="only the FLOPs check, no training runs")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    layouts = [] if a.flops_only else a.layouts.split(",")
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        p.error(f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")

    cores = os.cpu_count() or 1
    print(f"machine: {cpu_model()}, {cores} cores, torch {torch.__version__}, "
          f"cuda={torch.cuda.is_available()}")
    print(f"config: {a.config} {' '.join(a.overrides)}, {a.steps} steps, median after {a.warmup}\n")
    if layouts:
        print("| layout | processes | overrides | tokens/s (median) | ratio vs first | final loss |")
        print("|---|---|---|---|---|---|")
    base = None
    for name in layouts:
        nproc, extra = LAYOUTS[name]
        extra = [*extra, *same_global_batch(a.config, a.overrides, nproc, extra)]
        threads = a.threads or max(1, cores // nproc)
        recs = run_layout(a.config, nproc, [*a.overrides, *extra], a.steps, threads)
        tps = statistics.median(r["tokens_per_s"] for r in recs[a.warmup:])
        base = base or tps
        print(f"| {name} | {nproc} | {' '.join(extra) or '-'} | {tps:,.0f} | {tps / base:.2f} | "
              f"{recs[-1]['loss']:.4f} |", flush=True)
    est, measured = flops_check(a.config, a.overrides)
    print(f"\nFLOPs/token: formula {est / 1e6:.2f} M, FlopCounterMode {measured / 1e6:.2f} M "
          f"(ratio {measured / est:.3f})")


if __name__ == "__main__":
    main()
