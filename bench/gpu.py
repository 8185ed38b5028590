"""Every GPU figure the issues ask for, in one run on one GPU (the lent H200, or your own):

    python bench/gpu.py --out $OUT/gpu_report.md            # on a CUDA machine, ~5 min
    python bench/gpu.py --smoke --out /tmp/gpu_smoke.md     # the same code path on a CPU, tiny

1. MFU and tokens/s of the 125M and 1B presets on one GPU (bf16 autocast, no recompute);
2. for the 1B preset, per recompute mode: torch.cuda.max_memory_allocated next to the
   planner's prediction, and the step time;
3. the step time of granularity=auto against full and selective at the same memory budget;
4. how much of the offload copy time is hidden: full+offload's extra time over full, against
   the time the same bytes take to copy device->host->device without overlap.

Training data are random tokens written to a temporary directory (no tokenizer, no download).
Steps are timed with CUDA synchronisation; nothing is checkpointed.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigtrain import planner as P  # noqa: E402
from bigtrain.job import resolve  # noqa: E402
from bigtrain.config import load_config  # noqa: E402
from bigtrain.recompute.policy import spans_of  # noqa: E402
from bigtrain.trainer import Trainer  # noqa: E402

GiB = 2**30
MODES = {
    "none": [],
    "selective(norm,mlp_act)": ["recompute.granularity=selective", "recompute.modules=norm,mlp_act"],
    "selective(norm,mlp)": ["recompute.granularity=selective", "recompute.modules=norm,mlp"],
    "full": ["recompute.granularity=full"],
    "full+offload": ["recompute.granularity=full", "recompute.offload=true"],
}


def random_data(vocab: int, tokens: int) -> str:
    out = Path(tempfile.mkdtemp(prefix="bigtrain-gpu-data-"))
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 20)):
        rng.integers(3, vocab, n, dtype=np.uint16).tofile(out / f"{split}.bin")
    meta = {"vocab_size": vocab, "dtype": "uint16", "train_tokens": tokens, "val_tokens": tokens // 20,
            "bos_id": 1, "eos_id": 2}
    (out / "meta.json").write_text(json.dumps(meta))
    return str(out)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(config: str, overrides: list[str], steps: int) -> dict:
    """Build a Trainer, run `steps` optimizer steps; step times, peak memory, tokens/s, MFU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    tps = tokens / step
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    mfu = trainer._mfu(tps)
    plan_spans = trainer.recompute_spans or spans_of(cfg.recompute, cfg.model.n_layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    est = P.estimate(resolve(trainer.cfg, 1, device), plan_spans)
    del trainer
    return {"step_s": step, "tokens_per_s": tps, "mfu": mfu, "peak": peak, "predicted": est.peak,
            "predicted_phase": est.peak_phase, "policy": P.mixed_name(plan_spans), "kept_host": est.host}


def copy_time(nbytes: int) -> float:
    """Seconds to copy nbytes device->pinned host->device without overlap (the offload traffic)."""
    if not torch.cuda.is_available() or nbytes == 0:
        return 0.0
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        host.copy_(dev, non_blocking=True)
        dev.copy_(host, non_blocking=True)
    sync()
    return (time.perf_counter() - t0) / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, not the GPU")
    a = ap.parse_args()
    lines = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)"
    emit(f"# bench/gpu.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    emit(f"GPU: {gpu}; torch {torch.__version__}; command: {' '.join(sys.argv)}\n")
    small = ["model.n_layers=2", "model.dim=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=256",
             "train.seq_len=64", "train.micro_batch_size=2", "train.device=cpu"] if a.smoke else []
    data = random_data(32000 if not a.smoke else 512, 4_000_000 if not a.smoke else 50_000)
    common = [f"data.path={data}", "log.progress=false", "log.wandb.mode=disabled",
              "train.out_dir=" + tempfile.mkdtemp(prefix="bigtrain-gpu-run-"), *small,
              *(["model.vocab_size=0"] if a.smoke else [])]

    emit("## 1. MFU on one GPU (bf16 autocast, no recompute, global batch = micro-batch)\n")
    emit("| preset | micro-batch x seq | step s | tokens/s | MFU | peak GiB |")
    emit("|---|---|---|---|---|---|")
    for preset in ("configs/llama-125m.yaml", "configs/llama-1b.yaml"):
        cfg = load_config(preset, [*common])
        mb = cfg.train.micro_batch_size
        r = run(preset, [*common, f"train.global_batch_size={mb}"], a.steps)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        emit(f"| {Path(preset).stem} | {mb} x {cfg.train.seq_len} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
             f"{mfu} | {r['peak'] / GiB:.2f} |")

    emit("\n## 2. 1B preset per recompute mode: measured vs predicted peak, step time\n")
    emit("| mode | max_memory_allocated GiB | predicted GiB (phase) | predicted / measured | step s | vs none |")
    emit("|---|---|---|---|---|---|")
    one_b = [*common, "train.global_batch_size=8", "train.micro_batch_size=8"] if not a.smoke else \
        [*common, "train.global_batch_size=2"]
    results = {}
    for mode, extra in MODES.items():
        r = results[mode] = run("configs/llama-1b.yaml", [*one_b, *extra], a.steps)
        ratio = r["predicted"] / r["peak"] if r["peak"] else float("nan")
        emit(f"| {mode} | {r['peak'] / GiB:.2f} | {r['predicted'] / GiB:.2f} ({r['predicted_phase']}) | {ratio:.3f} | "
             f"{r['step_s']:.3f} | {r['step_s'] / results['none']['step_s']:.3f} |")

    emit("\n## 3. auto vs full and selective at the same budget\n")
    budget = int((results["full"]["predicted"] + results["none"]["predicted"]) / 2)
    r = run("configs/llama-1b.yaml", [*one_b, "recompute.granularity=auto", f"recompute.memory_budget={budget}B"],
            a.steps)
    emit(f"budget {budget / GiB:.2f} GiB (halfway between full's and none's predicted peaks); auto chose {r['policy']}\n")
    emit("| policy | max_memory_allocated GiB | step s |")
    emit("|---|---|---|")
    for name, res in (("auto", r), ("full", results["full"]), ("selective(norm,mlp)", results["selective(norm,mlp)"])):
        emit(f"| {name} | {res['peak'] / GiB:.2f} | {res['step_s']:.3f} |")

    emit("\n## 4. Offload: how much of the copy time is hidden\n")
    moved = results["full+offload"]["kept_host"]
    copy = copy_time(int(moved))
    extra = results["full+offload"]["step_s"] - results["full"]["step_s"]
    hidden = 1 - max(0.0, extra) / copy if copy > 0 else float("nan")
    emit(f"full+offload moves {moved / GiB:.3f} GiB per step each way; copying that device->host->device "
         f"without overlap takes {copy * 1e3:.1f} ms; full+offload's step is {extra * 1e3:+.1f} ms vs full: "
         f"{100 * hidden:.0f}% of the copy time hidden.")
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
