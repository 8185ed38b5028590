"""The planner's predictions next to what really happens, in one run:

    .venv/bin/python bench/plan.py [--skip-fake] [--matrix-only]

1. activation bytes kept for backward: the formula vs the saved-bytes accountant on real CPU
   tensors (debug and 125M presets, seq 256, micro-batch 1, fp32), per recompute mode;
2. the whole step's peak: the planner vs MemTracker over two real training steps of the 1B
   preset under fake tensors (every op and allocation runs, no memory is used);
3. the generated matrix (bigtrain.planner.measure.MATRIX): the planner's peak vs the real
   single-process trainer's (MemTracker over 2 real Trainer.train_step() calls on CPU tensors);
4. rank 0 of tp=2/4/8 layouts under fake tensors with torch's fake process group vs the plan.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigtrain import planner as P  # noqa: E402
from bigtrain.job import resolve  # noqa: E402
from bigtrain.config import load_config  # noqa: E402
from bigtrain.model import build_model, init_weights  # noqa: E402
from bigtrain.parallel.dims import ParallelDims  # noqa: E402
from bigtrain.parallel.loss import cross_entropy  # noqa: E402
from bigtrain.recompute import ActivationAccountant, apply_recompute  # noqa: E402
from bigtrain.planner.formula import outside_tensors  # noqa: E402
from bigtrain.recompute.policy import spans_of  # noqa: E402

MiB, GiB = 2**20, 2**30
MODES = {
    "none": [],
    "selective(norm,mlp_act)": ["recompute.granularity=selective", "recompute.modules=norm,mlp_act"],
    "selective(norm,mlp)": ["recompute.granularity=selective", "recompute.modules=norm,mlp"],
    "full": ["recompute.granularity=full"],
    "offload": ["recompute.offload=true", "recompute.offload_min_size=0"],
    "full+offload": ["recompute.granularity=full", "recompute.offload=true", "recompute.offload_min_size=0"],
}
FAKE = {  # 1B preset, fp32 on the CPU unless said; global batch = micro-batch (no accumulation)
    "none, micro-batch 4": ["train.micro_batch_size=4", "train.global_batch_size=4"],
    "selective(norm,mlp), micro-batch 4": ["train.micro_batch_size=4", "train.global_batch_size=4",
                                           "recompute.granularity=selective", "recompute.modules=norm,mlp"],
    "full, micro-batch 16": ["train.micro_batch_size=16", "train.global_batch_size=16", "recompute.granularity=full"],
    "full, micro-batch 1": ["train.micro_batch_size=1", "train.global_batch_size=1", "recompute.granularity=full"],
    "none, micro-batch 2, bf16 autocast": ["train.micro_batch_size=2", "train.global_batch_size=2", "train.dtype=bf16"],
}


def activations(preset: str, seq: int) -> list[str]:
    rows = []
    for mode, extra in MODES.items():
        cfg = load_config(preset, ["train.dtype=fp32", "model.dropout=0.0", "model.vocab_size=4096",
                                   f"train.seq_len={seq}", "train.micro_batch_size=1", "train.global_batch_size=1", *extra])
        lay = resolve(cfg, 1, "cpu")
        model = init_weights(apply_recompute(build_model(cfg.model), ParallelDims.single(), cfg.recompute), seed=0)
        tokens = torch.randint(0, 4096, (1, seq + 1))
        with ActivationAccountant(model) as acc:
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], None, 4096)
        loss.backward()
        est = P.estimate(lay, spans_of(cfg.recompute, cfg.model.n_layers))
        dev = sum(b.device for b in acc.report.blocks.values())
        host = sum(b.host for b in acc.report.blocks.values())
        out_pred = sum(outside_tensors(lay.shape, lay.padded_vocab).values())
        rows.append(f"| {Path(preset).stem} | {mode} | {est.activations / MiB:.2f} | {dev / MiB:.2f} | "
                    f"{est.host / MiB:.2f} | {host / MiB:.2f} | "
                    f"{out_pred / MiB:.2f} | {acc.report.outside.device / MiB:.2f} | "
                    f"{(est.activations + est.host) / max(1, dev + host):.4f} |")
    return rows


def matrix() -> None:
    import tempfile

    from bigtrain.data.prepare import prepare
    from bigtrain.planner.measure import MATRIX, MATRIX_BASE, matrix_config, measured_peak, planned
    from tests.conftest import _corpus_text

    tmp = Path(tempfile.mkdtemp())
    (tmp / "corpus.txt").write_text(_corpus_text())
    prepare([str(tmp / "corpus.txt")], str(tmp / "data"), vocab_size=400)
    print("\n## Peak of a training step: planner vs the real trainer (CPU tensors, MemTracker, 2 steps)\n")
    print("Base: configs/debug.yaml + " + " ".join(MATRIX_BASE)
          + ", fp32. Offload cases: the host pool's 1 GiB chunk is the same memory on the CPU and is counted; "
          "the last column is the error without it.\n")
    print("| case | policy | predicted MiB | measured MiB | error | error without the host pool |")
    print("|---|---|---|---|---|---|")
    for case in MATRIX:
        cfg = matrix_config(case, str(tmp / "data"), str(tmp / "run"))
        est = planned(cfg)
        real = measured_peak(cfg, steps=2)
        rest = ""
        if real["host pool"]:
            r = real["Total"] - real["host pool"]
            rest = f"{100 * ((est.peak - est.host_pinned) / r - 1):+.2f}%"
        print(f"| {case} | {est.policy} | {est.peak / MiB:.2f} | {real['Total'] / MiB:.2f} | "
              f"{100 * (est.peak / real['Total'] - 1):+.2f}% | {rest} |", flush=True)

def simulate() -> None:
    print("\n## Rank 0 of tp > 1 under fake tensors and torch's fake process group vs the plan (2 steps)\n")
    print("| layout | predicted MiB | simulated MiB | error | seconds |")
    print("|---|---|---|---|---|")
    from bigtrain.planner.measure import SIMULATE_BASE, SIMULATE_LAYOUTS

    for name, extra in SIMULATE_LAYOUTS.items():
        cfg = load_config("configs/debug.yaml", [*SIMULATE_BASE, *extra])
        job = resolve(cfg, cfg.parallel.tp, "cpu")
        spans = spans_of(cfg.recompute, cfg.model.n_layers)
        est = P.estimate(job, spans)
        t0 = time.perf_counter()
        sim = P.simulated_peak(job, spans, steps=2)["Total"]
        print(f"| {name} | {est.peak / MiB:.2f} | {sim / MiB:.2f} | {100 * (est.peak / sim - 1):+.2f}% | "
              f"{time.perf_counter() - t0:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--skip-fake", action="store_true")
    ap.add_argument("--matrix-only", action="store_true", help="only sections 3 and 4")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"# bench/plan.py, {time.strftime('%Y-%m-%d')}: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    if a.matrix_only:
        matrix()
        simulate()
        return
    print(f"## Kept activations: formula vs accountant (real CPU tensors, fp32, seq {a.seq}, micro-batch 1)\n")
    print("| preset | mode | predicted device MiB | measured device MiB | predicted host MiB | measured host MiB "
          "| predicted outside MiB | measured outside MiB | predicted / measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in ("configs/debug.yaml", "configs/llama-125m.yaml"):
        for row in activations(preset, a.seq):
            print(row, flush=True)
    if a.skip_fake:
        return
    print("\n## Peak of the whole step: planner vs MemTracker under fake tensors (1B preset, seq 2048, 2 steps)\n")
    print("| case | predicted peak GiB | predicted phase | fake-tensor peak GiB | predicted / measured | seconds |")
    print("|---|---|---|---|---|---|")
    for case, extra in FAKE.items():
        cfg = load_config("configs/llama-1b.yaml", ["train.dtype=fp32", *extra])
        est = P.estimate(resolve(cfg, 1, "cpu"), spans_of(cfg.recompute, cfg.model.n_layers))
        t0 = time.perf_counter()
        fake = P.fake_peak(resolve(cfg, 1, "cpu"), steps=2)["Total"]
        print(f"| {case} | {est.peak / GiB:.3f} | {est.peak_phase} | {fake / GiB:.3f} | {est.peak / fake:.4f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    matrix()
    simulate()


if __name__ == "__main__":
    main()
