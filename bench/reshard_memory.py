"""Peak host memory of a resharding resume: the 125M preset saved at tp=2 (two gloo ranks),
resumed in one process (tp=1). Each resume runs in a fresh process; the figure is the growth of
peak RSS (ru_maxrss) during `state.restore_state` over the RSS just before it, next to the
issue-14 bound of 1.5 x the model's fp32 bytes plus this rank's optimizer shard.

    PYTHONPATH=. .venv/bin/python bench/reshard_memory.py --data data/shakespeare
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = ["train.seq_len=64", "train.micro_batch_size=1", "train.global_batch_size=2", "train.steps=1",
         "train.save_every=1", "log.progress=false", "log.wandb.mode=disabled", "data.eval_batches=1",
         "train.device=cpu", "train.dtype=fp32"]


def _save_at_tp2(rank, world, overrides):
    from bigtrain.config import load_config
    from bigtrain.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    Trainer(load_config("configs/llama-125m.yaml", overrides)).train()


CHILD = """
import json, resource, sys
from bigtrain import state
from bigtrain.build import build
from bigtrain.config import load_config
c = build(load_config("configs/llama-125m.yaml", json.loads(sys.argv[1])))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import psutil, threading, time
def anon():
    line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024
peak_anon, done = [anon()], threading.Event()
def sample():  # RssAnon's high-water mark (the kernel keeps one for all of RSS only)
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], anon())
        time.sleep(0.002)
sampler = threading.Thread(target=sample, daemon=True)
anon_before = anon()
rss_before = psutil.Process().memory_info().rss
sampler.start()
step = state.restore_state(c, c.resume_from)
done.set(); sampler.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
kib = lambda k: int(status[k].split()[0]) * 1024  # noqa: E731
anon, file_backed = kib("RssAnon"), kib("RssFile")
n = sum(p.numel() for p in {id(p): p for p in c.module.parameters()}.values())
print(json.dumps({"step": step, "rss_before": rss_before, "peak_before": before, "peak_after": peak,
                  "anon_before": anon_before, "anon_peak": peak_anon[0],
                  "anon_after": anon, "file_after": file_backed, "params": n}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared data directory (vocab <= 4096)")
    args = ap.parse_args()
    from tests.multiproc import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        base = [f"data.path={args.data}", "model.vocab_size=4096", *SMALL]
        run_ranks(_save_at_tp2, 2, [*base, f"train.out_dir={run}", "parallel.tp=2"], timeout=600)
        step = sorted((run / "checkpoints").glob("step_*"))[-1]
        resume = [*base, f"train.out_dir={Path(tmp) / 'resumed'}", f"train.resume={step}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(resume)], capture_output=True, text=True,
                             env=env, cwd=ROOT, check=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    mb = 2**20
    model = 4 * r["params"]
    optim = 8 * r["params"]  # AdamW exp_avg + exp_avg_sq, fp32, this rank's (tp=1: all)
    # The resume's own growth: what ru_maxrss rose above the RSS just before restore_state.
    grew = r["peak_after"] - max(r["rss_before"], 0)
    grew_anon = r["anon_peak"] - r["anon_before"]
    bound = 1.5 * model + optim
    print("| case | params | fp32 model MiB | optimizer shard MiB | peak RSS growth during restore MiB "
          "(with the mapped checkpoint pages) | peak anonymous growth MiB (sampled every 2 ms) | "
          "bound (1.5 x model + optimizer) MiB | anonymous within |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 125M (vocab 4096), tp=2 -> tp=1 | {r['params'] / 1e6:.1f}M | {model / mb:.0f} | {optim / mb:.0f} | "
          f"{grew / mb:.0f} | {grew_anon / mb:.0f} | {bound / mb:.0f} | {'yes' if grew_anon <= bound else 'no'} |")
    print(f"(ru_maxrss before restore {r['peak_before'] / mb:.0f} MiB, after {r['peak_after'] / mb:.0f} MiB; "
          f"RSS just before {r['rss_before'] / mb:.0f} MiB; after the restore: anonymous {r['anon_after'] / mb:.0f} MiB, "
          f"file-backed (the memory-mapped checkpoint pages, reclaimable) {r['file_after'] / mb:.0f} MiB)")


if __name__ == "__main__":
    main()
