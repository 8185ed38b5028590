"""The planner against the real trainer: peaks of real `train_step()` calls on CPU tensors
(MemTracker), and the generated matrix of configs it is checked on (tests/test_plan_matrix.py,
bench/plan.py). Not imported by bigtrain.planner (it builds a Trainer, which uses the planner).
"""

from __future__ import annotations

from bigtrain.config import load_config
from bigtrain.job import resolve
from bigtrain.planner.memory import estimate
from bigtrain.planner.search import choose_recompute, mixed_name, uniform
from bigtrain.planner.simulate import peak_tracker
from bigtrain.recompute.policy import spans_of
from bigtrain.trainer import Trainer


def measured_peak(cfg, steps: int = 3) -> dict:
    """Peak memory (bytes by MemTracker category, and "Total") of `steps` real
    `Trainer.train_step()` calls of the single-process trainer on real CPU tensors: parameters,
    gradients, optimizer states, activations and every temporary, as allocated. `cfg` must
    train on the CPU (train.device=cpu) from a prepared data.path."""
    trainer = Trainer(cfg)
    tracker = peak_tracker()
    tracker.track_external(trainer.module, trainer.engine.optimizer)
    loss_on = trainer.loss_on

    def fresh_stats(batch):  # MemTracker's per-module stats allow one forward at a time
        tracker.reset_mod_stats()
        return loss_on(batch)

    trainer.loss_on = fresh_stats
    with tracker:
        for _ in range(steps):
            trainer.train_step()
    snap = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snap.values()))
    out = {str(getattr(k, "value", k)): v for k, v in per_device.items()}
    pool = trainer.module.block_runner.saved.pool
    out["host pool"] = pool.pinned_bytes if pool is not None else 0  # part of Total (same memory on the CPU)
    return out


# The generated matrix the planner is checked on against the real trainer (tests/test_plan_matrix.py,
# bench/plan.py): every policy, micro-batch and accumulation, small and large vocabularies, tied
# and untied embeddings, dims from 64 to 2048. Overrides of configs/debug.yaml, fp32 on the CPU.
MATRIX_BASE = ["model.dim=128", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128",
               "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=4", "model.vocab_size=512",
               "model.tie_embeddings=true"]
_SEL = "recompute.granularity=selective recompute.modules="
_OFF = "recompute.offload=true recompute.offload_min_size=0"
MATRIX = {
    "none": "",
    "full": "recompute.granularity=full",
    "full uniform x2": "recompute.granularity=full recompute.num_layers=2",
    "full block x2": "recompute.granularity=full recompute.method=block recompute.num_layers=2",
    "selective(norm)": _SEL + "norm",
    "selective(mlp_act)": _SEL + "mlp_act",
    "selective(core_attn)": _SEL + "core_attn",
    "selective(mlp)": _SEL + "mlp",
    "selective(norm,mlp_act)": _SEL + "norm,mlp_act",
    "selective(norm,mlp)": _SEL + "norm,mlp",
    "selective(norm,core_attn,mlp)": _SEL + "norm,core_attn,mlp",
    "selective(pointwise)": _SEL + "pointwise",
    "selective(pointwise,core_attn)": _SEL + "pointwise,core_attn",
    "offload": _OFF,
    "full+offload": "recompute.granularity=full " + _OFF,
    "selective(mlp)+offload": _SEL + "mlp " + _OFF,
    "selective(pointwise)+offload": _SEL + "pointwise " + _OFF,
    "none, document mask": "data.document_mask=true",
    "full, document mask, seq 128": "recompute.granularity=full data.document_mask=true train.seq_len=128",
    # the mask (b, 1, s, s) outweighs the blocks' activations here
    "full, document mask, dim 64, seq 512": "recompute.granularity=full data.document_mask=true model.dim=64 "
                                            "model.max_seq_len=512 train.seq_len=512",
    "selective(pointwise), document mask": _SEL + "pointwise data.document_mask=true",
    "selective(mlp)+offload, document mask": _SEL + "mlp " + _OFF + " data.document_mask=true",
    "none, bf16": "train.dtype=bf16",
    "full, bf16": "recompute.granularity=full train.dtype=bf16",
    "selective(norm,mlp_act), bf16": _SEL + "norm,mlp_act train.dtype=bf16",
    "selective(pointwise), bf16": _SEL + "pointwise train.dtype=bf16",
    "selective(mlp)+offload, bf16": _SEL + "mlp " + _OFF + " train.dtype=bf16",
    "full, bf16, vocab 8192 untied": "recompute.granularity=full train.dtype=bf16 model.vocab_size=8192 "
                                     "model.tie_embeddings=false",
    "none, loss in chunks of 16": "train.loss_chunk=16",
    "full, loss in chunks of 8, vocab 8192": "recompute.granularity=full train.loss_chunk=8 model.vocab_size=8192",
    "selective(pointwise), loss chunks, bf16, untied": _SEL + "pointwise train.loss_chunk=16 train.dtype=bf16 "
                                                       "model.tie_embeddings=false",
    "none, loss chunks, accumulation 2": "train.loss_chunk=32 train.global_batch_size=8",
    "auto (a mix)": "recompute.granularity=auto recompute.memory_budget=AUTO",
    "none, accumulation 2": "train.global_batch_size=8",
    "full, accumulation 3": "recompute.granularity=full train.global_batch_size=12",
    "selective(mlp), micro-batch 8": _SEL + "mlp train.micro_batch_size=8 train.global_batch_size=8",
    "none, vocab 8192 untied": "model.vocab_size=8192 model.tie_embeddings=false",
    "full, vocab 8192 tied": "recompute.granularity=full model.vocab_size=8192",
    "full, untied": "recompute.granularity=full model.tie_embeddings=false",
    "none, dim 64": "model.dim=64",
    "selective(norm,mlp), dim 512": _SEL + "norm,mlp model.dim=512 model.n_heads=8 model.n_kv_heads=4",
    "full, dim 1024, seq 32": "recompute.granularity=full model.dim=1024 model.n_heads=8 model.n_layers=2 train.seq_len=32 train.micro_batch_size=2 train.global_batch_size=2",
    "none, dim 2048, seq 16": "model.dim=2048 model.n_heads=16 model.n_kv_heads=8 model.n_layers=1 train.seq_len=16 train.micro_batch_size=1 train.global_batch_size=1",
}

# The tp > 1 layouts the fake-process-group dry run is checked on (tests/test_plan_simulate.py,
# bench/plan.py): overrides of configs/debug.yaml on top of SIMULATE_BASE.
SIMULATE_BASE = ["train.dtype=fp32", "model.vocab_size=512", "train.seq_len=256", "train.micro_batch_size=8",
                 "train.global_batch_size=8", "model.n_kv_heads=8"]
SIMULATE_LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2 sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp2 full": ["parallel.tp=2", "recompute.granularity=full"],
    "tp4 full partition": ["parallel.tp=4", "recompute.granularity=full", "recompute.partition=true"],
    "tp4 sp selective": ["parallel.tp=4", "parallel.sequence_parallel=true", "recompute.granularity=selective",
                         "recompute.modules=norm,mlp"],
    "tp8": ["parallel.tp=8"],
    "tp8 full": ["parallel.tp=8", "recompute.granularity=full"],
    "tp8 full partition, accumulation 2": ["parallel.tp=8", "recompute.granularity=full", "recompute.partition=true",
                                           "train.global_batch_size=16"],
    "tp8 sp full": ["parallel.tp=8", "parallel.sequence_parallel=true", "recompute.granularity=full"],
    "tp2 sp bf16": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.dtype=bf16"],
    "tp2 full, document mask": ["parallel.tp=2", "recompute.granularity=full", "data.document_mask=true"],
    "tp2 loss chunks": ["parallel.tp=2", "train.loss_chunk=64"],
    "tp4 sp loss chunks": ["parallel.tp=4", "parallel.sequence_parallel=true", "train.loss_chunk=64"],
    "tp4 sp bf16 selective(pointwise)": ["parallel.tp=4", "parallel.sequence_parallel=true", "train.dtype=bf16",
                                         "recompute.granularity=selective", "recompute.modules=pointwise"],
}


def matrix_config(case: str, data_path: str, out_dir: str):
    """The config of one matrix case (its data and run directory given)."""
    extra = MATRIX[case].split()
    base = [*MATRIX_BASE, "train.device=cpu", "train.dtype=fp32", f"data.path={data_path}", f"train.out_dir={out_dir}",
            "train.save_every=0", "train.eval_every=0", "log.progress=false", "log.wandb.mode=disabled"]
    if any(x.endswith("=AUTO") for x in extra):
        # a budget between uniform full and none, so that auto picks a mix
        probe = load_config("configs/debug.yaml", base)
        job = resolve(probe, 1, "cpu")
        L = probe.model.n_layers
        lo, hi = (estimate(job, uniform(p, L)).peak for p in ("full", "none"))
        extra = [x.replace("AUTO", f"{(lo + hi) // 2}B") for x in extra]
    return load_config("configs/debug.yaml", [*base, *extra])


def planned(cfg):
    """The planner's Estimate for cfg trained in one CPU process (auto's choice included)."""
    job = resolve(cfg, 1, "cpu")
    spans = choose_recompute(job)[0] or spans_of(cfg.recompute, cfg.model.n_layers)
    return estimate(job, spans, mixed_name(spans))
