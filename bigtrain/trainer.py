"""The training loop.

    config -> ParallelDims -> plain model on meta -> parallelize -> init weights per rank
           -> data-parallel wrapper -> Trainer.train() -> metrics and checkpoints

`Trainer(cfg)` builds everything; `train_step()` runs one optimizer step (with gradient
accumulation), `evaluate()` the validation loss, `train()` the whole run with logging, evaluation,
checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bigtrain import checkpoint as ckpt
from bigtrain.config import Config, dump_yaml, parse_bytes, to_dict
from bigtrain.data.dataset import BatchLoader, TokenDataset, load_meta
from bigtrain.distributed import init_distributed
from bigtrain.errors import UserError
from bigtrain.hf import is_weights_only, load_weights
from bigtrain.metrics import MetricsLogger, memory_stats, peak_flops
from bigtrain.model import build_model, count_params, flops_per_token, init_weights
from bigtrain.optim import lr_at
from bigtrain.parallel.dims import ParallelDims, check_model
from bigtrain.parallel.engine import build_engine
from bigtrain.parallel.loss import cross_entropy
from bigtrain.parallel.parallelize import parallelize
from bigtrain.parallel.random import RNGTracker, seed_rng
from bigtrain.recompute import ActivationAccountant, apply_recompute
from bigtrain.recompute.accounting import block_formula, format_report


def resolve_vocab(cfg: Config) -> dict:
    """Read the data's metadata and fill model.vocab_size from the tokenizer when it is 0."""
    meta = load_meta(cfg.data.path)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(meta["vocab_size"])
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size({cfg.model.vocab_size}) is smaller than the tokenizer's "
                        f"vocabulary ({meta['vocab_size']}) in data.path {cfg.data.path!r}")
    return meta


def build_parallel_model(cfg: Config, dims: ParallelDims, device: torch.device, rng: RNGTracker,
                         plan: list | None = None) -> torch.nn.Module:
    """Plain model on meta -> tensor/sequence parallel layers -> recompute policy -> weights
    materialised from the seed. (Data parallelism wraps the result: see build_engine.)
    `plan`: the per-block policy recompute.granularity=auto chose (see choose_recompute)."""
    check_model(cfg.model, dims.tp)
    model = build_model(cfg.model)  # on the meta device: no memory until init_weights
    if dims.tp > 1:
        parallelize(model, dims, sequence_parallel=cfg.parallel.sequence_parallel, rng=rng)
    apply_recompute(model, dims, cfg.recompute, sequence_parallel=cfg.parallel.sequence_parallel, plan=plan)
    return init_weights(model, cfg.train.seed, device=device)


def choose_recompute(cfg: Config, dims: ParallelDims, device: torch.device) -> tuple[list | None, str]:
    """For recompute.granularity=auto: the per-block policy that fits recompute.memory_budget
    with the least estimated overhead, and a table explaining it; (None, "") otherwise."""
    if cfg.recompute.granularity != "auto":
        return None, ""
    from bigtrain import plan as planner

    lay = planner.layout_of(cfg, dims.world_size, device.type)
    budget = parse_bytes(cfg.recompute.memory_budget)
    chosen = planner.choose_policy(cfg, lay, budget)
    full = planner.estimate(cfg, lay, planner.uniform("full", cfg.model.n_layers), "full")
    g = 2.0 ** 30
    text = (f"recompute.granularity=auto, budget {budget / g:.2f} GiB per GPU: chose {chosen.policy}\n"
            "| policy | est. peak GiB | peak in | est. extra step time |\n|---|---|---|---|\n"
            f"| {chosen.policy} (chosen) | {chosen.peak / g:.2f} | {chosen.peak_phase} | {100 * chosen.overhead:.1f}% |\n"
            f"| full, every block | {full.peak / g:.2f} | {full.peak_phase} | {100 * full.overhead:.1f}% |")
    return chosen.spans, text


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dims, self.device = init_distributed(cfg)
        self.is_main = self.dims.rank == 0
        self.out_dir = Path(cfg.train.out_dir)
        self.data_meta = resolve_vocab(cfg)
        t = cfg.train
        per_step = t.micro_batch_size * self.dims.dp
        if t.global_batch_size % per_step:
            raise UserError(f"train.global_batch_size({t.global_batch_size}) is not a multiple of "
                            f"train.micro_batch_size({t.micro_batch_size}) * dp({self.dims.dp}) = {per_step}")
        self.accum_steps = t.global_batch_size // per_step
        resume_from = self._find_resume()

        # Dropout streams: the default generators (same on every rank) and the tracker's "tp"
        # stream (distinct per TP rank); weights use their own per-parameter seeds.
        self.rng = seed_rng(t.seed, self.dims)
        self.recompute_plan, self.recompute_note = choose_recompute(cfg, self.dims, self.device)
        self.module = build_parallel_model(cfg, self.dims, self.device, self.rng, self.recompute_plan)
        if resume_from is not None and is_weights_only(resume_from):
            self._load_weights_only(resume_from)  # before the engine: DeepSpeed copies the weights
            resume_from = None
        self.engine = build_engine(self.module, self.dims, cfg, self.accum_steps, self.device)
        self.model = self.engine.model  # the data-parallel wrapper (or the module itself)
        self.autocast = _autocast(cfg, self.device)
        self.train_loader = BatchLoader(TokenDataset(cfg.data.path, "train"), t.seq_len, t.micro_batch_size,
                                        seed=t.seed, rank=self.dims.dp_rank, world=self.dims.dp)
        self.val_data = TokenDataset(cfg.data.path, "val")
        self.step = 0
        self._activations_measured = False  # log.activation_memory: measured once, in the first step
        if resume_from is not None:
            self.load(resume_from)
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops = peak_flops(self.device, cfg)

    # ---------------------------------------------------------------------------------------
    def _find_resume(self) -> Path | None:
        r = self.cfg.train.resume
        latest = ckpt.latest_checkpoint(self.out_dir)
        if r == "auto":
            return latest
        if r == "none":
            if latest is not None:
                raise UserError(f"train.out_dir {str(self.out_dir)!r} already holds checkpoints (latest "
                                f"{latest.name}); pass train.resume=auto to continue it, or choose another train.out_dir")
            return None
        path = Path(r)
        if not path.exists():
            raise UserError(f"train.resume={r!r}: no such checkpoint directory; use auto, none or a checkpoints/step_* path")
        return path

    def loss_on(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a (b, s+1) batch of token ids."""
        x, y = batch[:, :-1], batch[:, 1:]  # (b, s), (b, s)
        with self.autocast:
            logits = self.model(x)  # (b, s, v/tp)
        return cross_entropy(logits, y, group=self.dims.tp_group, vocab_size=self.cfg.model.vocab_size)

    def train_step(self) -> dict:
        """One optimizer step over global_batch_size sequences; returns this step's metrics."""
        self.model.train()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        self.engine.set_lr(lr)
        loss_sum = torch.zeros((), device=self.device)
        measure = self.cfg.log.activation_memory and not self._activations_measured
        report = None
        for i in range(self.accum_steps):
            batch = self.train_loader.next_batch().to(self.device, non_blocking=True)
            with self.engine.accumulate(last=i == self.accum_steps - 1):
                if measure and i == 0:
                    with ActivationAccountant(self.module) as acc:
                        loss = self.loss_on(batch)
                    report = self._format_activations(acc)
                    self._activations_measured = True
                else:
                    loss = self.loss_on(batch)
                self.engine.backward(loss)
            loss_sum += loss.detach()
        grad_norm = self.engine.step()
        self.step += 1
        m = {"loss": self._dp_mean(loss_sum / self.accum_steps), "lr": lr, "grad_norm": grad_norm}
        if report is not None:
            m["activation_report"] = report
        return m

    def _format_activations(self, acc: ActivationAccountant) -> str:
        """The accountant's per-span table next to the formula's prediction."""
        from bigtrain.plan import layout_of

        shape = layout_of(self.cfg, self.dims.world_size, self.device.type).shape  # what the planner assumes
        return (f"activation memory kept for backward, rank {self.dims.rank}, one micro-batch, "
                f"recompute.granularity={self.cfg.recompute.granularity}:\n"
                + format_report(acc.report, block_formula(shape, self.cfg.recompute, self.recompute_plan)))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first data.eval_batches micro-batches of the validation split (per DP rank)."""
        self.model.eval()
        loader = BatchLoader(self.val_data, self.cfg.train.seq_len, self.cfg.train.micro_batch_size,
                             seed=0, rank=self.dims.dp_rank, world=self.dims.dp, shuffle=False)
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.data.eval_batches):
            total += self.loss_on(loader.next_batch().to(self.device)).float()
        self.model.train()
        return self._dp_mean(total / self.cfg.data.eval_batches)

    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        if self.dims.dp_group is not None:
            dist.all_reduce(value, group=self.dims.dp_group)
            value /= self.dims.dp
        return float(value)

    # ---------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        cfg, t = self.cfg, self.cfg.train
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
            print(dump_yaml(cfg), flush=True)
            n = count_params(self.module)
            print(f"model: {n / 1e6:.2f}M parameters on this rank, layout tp={self.dims.tp} dp={self.dims.dp}, "
                  f"{self.accum_steps} micro-batch(es) per step, device {self.device}", flush=True)
            if self.recompute_note:
                print(self.recompute_note, flush=True)
        logger = MetricsLogger(cfg, self.out_dir, enabled=self.is_main, start_step=self.step)
        records = []
        tokens_per_step = t.global_batch_size * t.seq_len
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        stop = StopRequest()
        try:
            while self.step < t.steps:
                m = self.train_step()
                if "activation_report" in m:
                    logger.print(m.pop("activation_report"))
                logger.advance()
                window_loss += m["loss"]
                window_steps += 1
                if self.step % cfg.log.every == 0 or self.step == t.steps:
                    _sync(self.device)
                    elapsed = time.perf_counter() - window_start
                    tps = tokens_per_step * window_steps / elapsed
                    record = {"step": self.step, "loss": window_loss / window_steps, "lr": m["lr"],
                              "grad_norm": m["grad_norm"], "tokens_per_s": tps,
                              "mfu": self._mfu(tps), **memory_stats(self.device)}
                    if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                        record["val_loss"] = self.evaluate()
                    logger.log(record)
                    records.append(record)
                    window_loss, window_steps = 0.0, 0
                    window_start = time.perf_counter()
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                    self.save()
                    window_start = time.perf_counter()  # saving is not training time
                elif stop.agreed(self.device):
                    self.save()
                    logger.print(f"stopping on {stop.name} after step {self.step}: checkpoint saved; "
                                 f"train.resume=auto continues from it")
                    break
        finally:
            stop.close()
            logger.close()
        return records

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.peak_flops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.dims.world_size)

    # ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        with self.engine.full_parameters():
            model = {n: p.detach().cpu().clone() for n, p in self.module.named_parameters()}
        state = {
            "model": model,
            **self.engine.state_dict(),
            "shards": ckpt.shard_meta(self.module),
            "rng": ckpt.rng_state(),
            "rng_tracker": self.rng.get_states(),  # the "tp" dropout stream of this TP rank
            "step": self.step,
        }
        manifest = {"config": to_dict(self.cfg), "data": self.train_loader.state_dict(),
                    "engine": self.cfg.parallel.engine}
        return ckpt.save_checkpoint(self.out_dir, self.step, state, manifest, self.dims,
                                    self.cfg.checkpoint.keep_last, write_extra=self.engine.save)

    def load(self, path: Path) -> None:
        manifest = ckpt.read_manifest(path)
        _check_same_model(manifest["config"]["model"], to_dict(self.cfg)["model"], path)
        if manifest.get("engine", "ddp") != self.cfg.parallel.engine:
            raise UserError(f"checkpoint {str(path)!r} was written with parallel.engine={manifest.get('engine')}; "
                            f"resume it with the same engine")
        same_layout = (manifest["tp"], manifest["dp"]) == (self.dims.tp, self.dims.dp)
        if same_layout:
            state = ckpt.read_rank_file(path, self.dims.rank)
            model_state, rng = state["model"], state["rng"]
            self.engine.load_state_dict(state)
            if "rng_tracker" in state:
                self.rng.set_states(state["rng_tracker"])
        elif self.cfg.parallel.engine == "deepspeed":
            raise UserError(f"checkpoint {str(path)!r} was written at tp={manifest['tp']} dp={manifest['dp']}; "
                            f"DeepSpeed checkpoints resume only at the same layout (tp={self.dims.tp} dp={self.dims.dp} now)")
        else:
            model_state, optim_state = ckpt.reshard(path, manifest, self.module)
            self.engine.load_state_dict({"optim": optim_state})
            # The default RNG streams advance identically on every rank: take rank 0's. The
            # per-TP-rank "tp" streams have no counterpart at another tp: they start afresh from
            # the seed (this only matters with dropout inside split regions).
            rng = ckpt.read_rank_file(path, 0)["rng"]
        if not (same_layout and self.engine.loads_module_weights):
            ckpt.load_model_state(self.module, model_state, str(path))
        self.engine.load(path)
        ckpt.set_rng_state(rng)
        self.train_loader.load_state_dict(manifest["data"])
        self.step = int(manifest["step"])
        if self.is_main:
            how = "" if same_layout else f" (resharded from tp={manifest['tp']} dp={manifest['dp']})"
            print(f"resumed from {path} at step {self.step}{how}", flush=True)

    def _load_weights_only(self, path: Path) -> None:
        """A weights-only checkpoint (`bigtrain import-hf`): its model weights at this layout, with
        a fresh optimizer, data order and RNG, from step 0."""
        manifest = ckpt.read_manifest(path)
        _check_same_model(manifest["config"]["model"], to_dict(self.cfg)["model"], path)
        load_weights(self.module, path)
        if self.is_main:
            print(f"initialised from the weights of {path} (weights only: fresh optimizer, step 0)", flush=True)


class StopRequest:
    """SIGTERM / SIGUSR1 (slurm's warning before the time limit, a preemption, `kill`): finish
    the current step, save a checkpoint, stop. Every rank must stop at the same step (saving is
    collective), so the ranks agree with one tiny all-reduce per step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has been signalled."""
        flag = self.name is not None
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.name is None:
                self.name = "a signal on another rank"
        return flag

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_same_model(saved: dict, current: dict, path: Path) -> None:
    # max_seq_len and dropout do not change the weights' shapes or meaning.
    ignore = {"max_seq_len", "dropout"}
    diff = [f"model.{k}: {saved.get(k)!r} in checkpoint vs {current[k]!r}"
            for k in current if k not in ignore and saved.get(k) != current[k]]
    if diff:
        raise UserError(f"checkpoint {str(path)!r} was written with a different model: {'; '.join(diff)}")


def _autocast(cfg: Config, device: torch.device):
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext()
    # No weight-cast cache: each weight is used once per forward, and a cache would keep a bf16
    # copy of every weight alive until the whole forward ends -- also under recompute, which
    # would otherwise drop them (the planner counts what autograd keeps, not the cache).
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
