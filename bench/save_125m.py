"""Checkpoints of the 125M preset on this machine: how long the training loop stops for a save
(blocking against train.async_save), the bytes a checkpoint takes at dp=1 and dp=2, and tokens/s
with log.every=1 against 10.

1. Stop time: one process, configs/llama-125m.yaml on the CPU (fp32, seq --seq, micro-batch 1),
   after one training step: `state.save_state` in the foreground (what every save does without
   train.async_save) against with an AsyncSaver (what train.save_every does under
   train.async_save: the state copied to host memory, the write in a thread), rounds interleaved;
   for the background save also the seconds until its write has finished (the next save waits).
2. Bytes: `bigtrain train` for 1 step at dp=1 and dp=2 (torchrun, gloo), the step's directory.
3. tokens/s: `bigtrain train` --sync-steps steps with log.every=1 and 10, interleaved.

    PYTHONPATH=. .venv/bin/python bench/save_125m.py --data data/shakespeare [--rounds 3]
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
sys.path.insert(0, str(ROOT))


def overrides(data: str, out: Path, seq: int) -> list[str]:
    return [f"data.path={data}", f"train.out_dir={out}", "train.device=cpu", "train.dtype=fp32",
            f"train.seq_len={seq}", "train.micro_batch_size=1", "train.global_batch_size=1", "log.progress=false",
            "log.wandb.mode=disabled", "train.eval_every=0", "checkpoint.keep_last=1"]


def stop_times(data: str, seq: int, rounds: int) -> dict:
    from bigtrain import state
    from bigtrain.config import load_config
    from bigtrain.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-save-"))
    trainer = Trainer(load_config("configs/llama-125m.yaml", overrides(data, tmp / "run", seq)))
    trainer.train_step()
    saver = state.AsyncSaver(trainer.dims.new_side_group())
    blocking, background, written = [], [], []
    for i in range(rounds):
        # what Trainer.save does in the foreground, and under train.async_save at save_every
        t0 = time.perf_counter()
        state.save_state(trainer.components, 2 * i + 1, trainer.train_loader.state_dict())
        blocking.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state.save_state(trainer.components, 2 * i + 2, trainer.train_loader.state_dict(), saver)
        background.append(time.perf_counter() - t0)
        saver.wait()
        written.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in (tmp / "run" / "checkpoints").rglob("*") if f.is_file()) // \
        len(list((tmp / "run" / "checkpoints").glob("step_*")))
    return {"blocking": blocking, "background": background, "written": written, "bytes": size}


def run_train(data: str, nproc: int, extra: list[str], seq: int) -> Path:
    out = Path(tempfile.mkdtemp(prefix="bench-save-")) / "run"
    args = ["train", "--config", "configs/llama-125m.yaml", *overrides(data, out, seq), *extra]
    cmd = [sys.executable, "-m", "bigtrain.cli", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "bigtrain.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return out


def checkpoint_bytes(out: Path) -> tuple[int, int]:
    step = sorted((out / "checkpoints").glob("step_*"))[-1]
    files = [f for f in step.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def tokens_per_s(out: Path) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first window has the warm-up
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sync-steps", type=int, default=30)
    ap.add_argument("--skip-bytes", action="store_true")
    ap.add_argument("--skip-sync", action="store_true")
    args = ap.parse_args()
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"load: {uptime()}")
    st = stop_times(args.data, args.seq, args.rounds)
    med = {k: statistics.median(v) for k, v in st.items() if k != "bytes"}
    print(f"\n125M, one process, checkpoint of {st['bytes'] / 1e6:,.1f} MB; seconds the loop stops, median of {args.rounds}")
    print("| save | loop stops s | rounds | write finished after s |")
    print("|---|---|---|---|")
    print(f"| blocking (train.async_save=false) | {med['blocking']:.2f} | {', '.join(f'{x:.2f}' for x in st['blocking'])} | - |")
    print(f"| background (train.async_save=true) | {med['background']:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in st['background'])} | {med['written']:.2f} |")
    if not args.skip_bytes:
        print("\n| layout | files | bytes | vs dp=1 |")
        print("|---|---|---|---|")
        one = None
        for nproc, extra in ((1, []), (2, ["parallel.dp=2", "train.global_batch_size=2"])):
            files, size = checkpoint_bytes(run_train(args.data, nproc, ["train.steps=1", *extra], args.seq))
            one = one or size
            print(f"| dp={nproc} | {files} | {size:,} | {size / one:.3f} |", flush=True)
    if not args.skip_sync:
        rates: dict[int, list[float]] = {1: [], 10: []}
        for _ in range(2):
            for every in (1, 10):
                out = run_train(args.data, 1, [f"train.steps={args.sync_steps}", f"log.every={every}",
                                               "train.save_every=0"], args.seq)
                rates[every].append(tokens_per_s(out))
        a, b = statistics.median(rates[1]), statistics.median(rates[10])
        print(f"\ntokens/s, median of 2 interleaved runs of {args.sync_steps} steps: log.every=1 {a:,.0f}, "
              f"log.every=10 {b:,.0f}, ratio {a / b:.3f}")
    print(f"load: {uptime()}")


if __name__ == "__main__":
    main()
