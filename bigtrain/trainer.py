"""The training loop.

    Trainer(cfg).train()     # bigtrain.build makes the pieces; this module runs the steps

`train_step()` runs one optimizer step (with gradient accumulation), `evaluate()` the
validation loss, `train()` the whole run with logging, evaluation, checkpoints and exact resume
(bigtrain.state saves and restores).
"""

from __future__ import annotations


import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from bigtrain import state
from bigtrain.build import build
from bigtrain.config import Config, dump_yaml
from bigtrain.data.dataset import BatchLoader, TokenDataset
from bigtrain.errors import UserError
from bigtrain.metrics import MetricsLogger, memory_stats, peak_flops
from bigtrain.model import count_params, flops_per_token
from bigtrain.optim import lr_at
from bigtrain.parallel.dims import vocab_padding_note
from bigtrain.parallel.loss import step_loss
from bigtrain.recompute import ActivationAccountant
from bigtrain.planner.formula import block_formula
from bigtrain.recompute.accounting import format_report


class Trainer:
    def __init__(self, cfg: Config):
        c = build(cfg)
        self.components = c
        self.job, self.cfg = c.job, c.job.cfg  # the resolved config (model.vocab_size filled in)
        self.dims, self.device, self.rng = c.dims, c.device, c.rng
        self.module, self.engine = c.module, c.engine
        self.model = c.engine.model  # the data-parallel wrapper (or the module itself)
        self.train_loader, self.val_data = c.train_loader, c.val_data
        self.val_sets = c.val_sets  # data.mix: each source's validation split by name ({} otherwise)
        self.recompute_spans, self.recompute_note = c.recompute_spans, c.recompute_note
        self.is_main = self.dims.rank == 0
        self.out_dir = Path(self.cfg.train.out_dir)
        self.step = state.restore_state(c, c.resume_from) if c.resume_from is not None else 0
        self._activations_measured = False  # log.activation_memory: measured once, in the first step
        self.flops_per_token = flops_per_token(self.cfg.model, self.cfg.train.seq_len)
        self.peak_flops = peak_flops(self.device, self.cfg)

    # ---------------------------------------------------------------------------------------
    def loss_on(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a (b, s+1) batch of token ids."""
        return step_loss(self.model, batch, self.job, self.dims)

    def train_step(self) -> dict:
        """One optimizer step over global_batch_size sequences; returns this step's metrics.
        "loss" (this rank's mean over its micro-batches) and "grad_norm" stay device tensors:
        reading them would block the host on the device every step, so the trainer reduces
        and reads them only at logging steps (`Losses.read`)."""
        self.model.train()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        self.engine.set_lr(lr)
        loss_sum = torch.zeros((), device=self.device)
        measure = self.cfg.log.activation_memory and not self._activations_measured
        report = None
        accum = self.job.accum
        for i in range(accum):
            batch = self.train_loader.next_batch().to(self.device, non_blocking=True)
            with self.engine.accumulate(last=i == accum - 1):
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
        m = {"loss": loss_sum / accum, "lr": lr, "grad_norm": grad_norm}
        if report is not None:
            m["activation_report"] = report
        return m

    def _format_activations(self, acc: ActivationAccountant) -> str:
        """The accountant's per-span table next to the formula's prediction."""
        return (f"activation memory kept for backward, rank {self.dims.rank}, one micro-batch, "
                f"recompute.granularity={self.cfg.recompute.granularity}:\n"
                + format_report(acc.report, block_formula(self.job.shape, self.cfg.recompute, self.recompute_spans)))

    @torch.no_grad()
    def evaluate(self, data: TokenDataset | None = None) -> float:
        """Mean loss over the first data.eval_batches micro-batches of a validation split (default
        self.val_data; per DP rank)."""
        self.model.eval()
        loader = self._val_loader(data)
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.data.eval_batches):
            total += self.loss_on(loader.next_batch().to(self.device)).float()
        self.model.train()
        return self._dp_mean(total / self.cfg.data.eval_batches)

    def validation(self) -> dict[str, float]:
        """An evaluation step's metrics: val_loss; with data.mix, val_loss/<source> for every source
        whose split holds a batch, and val_loss their mean under the mixture's weights."""
        if not self.val_sets:
            return {"val_loss": self.evaluate()}
        per = {n: self.evaluate(self.val_sets[n]) for n in self._evaluable}
        w = self.train_loader.weights()
        return {"val_loss": sum(w[n] * v for n, v in per.items()) / sum(w[n] for n in per),
                **{f"val_loss/{n}": v for n, v in per.items()}}

    def _val_loader(self, data: TokenDataset | None = None) -> BatchLoader:
        return BatchLoader(self.val_data if data is None else data, self.cfg.train.seq_len, self.cfg.train.micro_batch_size,
                           seed=0, rank=self.dims.dp_rank, world=self.dims.dp, shuffle=False)

    def _no_evaluation_reason(self) -> str | None:
        """Why no validation split can be evaluated (too short for one batch), or None; sets
        self._evaluable, the data.mix sources whose split can be (a mixture needs one)."""
        reasons = {}
        for name, data in (self.val_sets or {"": self.val_data}).items():
            try:
                self._val_loader(data)
            except UserError as e:
                reasons[name] = str(e)
        self._evaluable = [n for n in self.val_sets if n not in reasons]
        return None if self._evaluable else next(iter(reasons.values()), None)

    def _dp_mean(self, value: torch.Tensor) -> float:
        return self._dp_means(value.reshape(1))[0]

    def _dp_means(self, values: torch.Tensor) -> list[float]:
        """Each element's mean over data-parallel ranks (one all-reduce for all of them)."""
        values = values.detach().float().clone()
        if self.dims.dp_group is not None:
            dist.all_reduce(values, group=self.dims.dp_group)
            values /= self.dims.dp
        return values.tolist()

    # ---------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        t = self.cfg.train
        can_evaluate = self._announce()
        logger = MetricsLogger(self.cfg, self.out_dir, enabled=self.is_main, start_step=self.step)
        timeout = timedelta(seconds=self.cfg.parallel.timeout_s)
        self.saver = state.AsyncSaver(self.dims.new_side_group(timeout)) if self.components.async_save else None  # collective
        window = _Window()
        records, stop = [], StopRequest(self.cfg.train.stop_check_every)
        try:
            while self.step < t.steps:
                m = self.train_step()
                if "activation_report" in m:
                    logger.print(m.pop("activation_report"))
                logger.advance()
                window.add(m["loss"])
                last = self.step == t.steps
                logging = self.step % self.cfg.log.every == 0 or last
                record = self._record(m, window) if logging else None
                if last:
                    # Save before the final evaluation: nothing after the last step can cost the run.
                    self.save()
                if record is not None:
                    if can_evaluate and ((t.eval_every and self.step % t.eval_every == 0) or last):
                        record.update(self.validation())
                    logger.log(record)
                    records.append(record)
                    window.restart()
                if not last and t.save_every and self.step % t.save_every == 0:
                    self.save(background=True)
                    window.restart(keep=True)  # saving is not training time
                elif not last and stop.agreed(self.device, self.step, logging):
                    self.save()
                    logger.print(f"stopping on {stop.name} after step {self.step}: checkpoint saved; "
                                 f"train.resume=auto continues from it")
                    break
        finally:
            stop.close()
            logger.close()
            self._join_saver(quiet=True)  # an exception is on its way: do not replace it
        return records

    def _join_saver(self, quiet: bool = False) -> None:
        saver, self.saver = getattr(self, "saver", None), None
        if saver is None:
            return
        try:
            saver.wait()
        except Exception:  # noqa: BLE001
            if not quiet:
                raise

    def _announce(self) -> bool:
        """Write config.yaml and print the run's header (rank 0); True if evaluation is possible."""
        cfg = self.cfg
        why = self._no_evaluation_reason()
        if not self.is_main:
            return why is None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
        print(dump_yaml(cfg), flush=True)
        n = count_params(self.module)
        print(f"model: {n / 1e6:.2f}M parameters on this rank, layout tp={self.dims.tp} dp={self.dims.dp}, "
              f"{self.job.accum} micro-batch(es) per step, device {self.device}", flush=True)
        for note in (vocab_padding_note(self.job.vocab_size, self.job.tp), self.recompute_note):
            if note:
                print(note, flush=True)
        if cfg.train.async_save == "auto" and cfg.train.save_every:
            how = "in the background (its host copy fits the host budget)" if self.components.async_save else \
                "in the foreground (train.async_save=true writes them in the background)"
            print(f"checkpoints every {cfg.train.save_every} steps are written {how}", flush=True)
        if why is not None:
            print(f"warning: no validation loss in this run: {why}", flush=True)
        skipped = [n for n in self.val_sets if n not in self._evaluable]
        if why is None and skipped:
            print(f"warning: no val_loss/<source> for data.mix source(s) {', '.join(skipped)}: validation split "
                  f"shorter than one batch; val_loss averages the others", flush=True)
        return why is None

    def _record(self, m: dict, window: "_Window") -> dict:
        """The metrics.jsonl record of a logging step (the window's mean loss and throughput)."""
        _sync(self.device)
        t = self.cfg.train
        tps = t.global_batch_size * t.seq_len * window.steps / window.elapsed()
        # The window's step losses, averaged over DP ranks in one all-reduce and read here,
        # then summed on the host in step order: the same floats as reading each step's.
        loss = sum(self._dp_means(torch.stack(window.losses))) / window.steps
        # data.mix: tokens/<source>, each source's training tokens so far, all ranks ({} otherwise)
        sources = {f"tokens/{n}": k * t.seq_len for n, k in self.train_loader.source_counts().items()}
        return {"step": self.step, "loss": loss, "lr": m["lr"], "grad_norm": _as_float(m["grad_norm"]),
                "tokens_per_s": tps, "mfu": self._mfu(tps), **memory_stats(self.device), **sources}

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.peak_flops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.dims.world_size)

    # ---------------------------------------------------------------------------------------
    def save(self, background: bool = False):
        """Checkpoint now (collective). background=True under train.async_save: copy the state
        and write it while training continues. Every other save (the last, SIGTERM's) waits for
        the one in flight and writes in the foreground: the run ends right after it."""
        saver = getattr(self, "saver", None)
        if saver is not None and not background:
            self._join_saver()
            saver = None
        return state.save_state(self.components, self.step, self.train_loader.state_dict(), saver)


class StopRequest:
    """SIGTERM / SIGUSR1 (slurm's warning before the time limit, a preemption, `kill`): finish
    the current step, save a checkpoint, stop. Every rank must stop at the same step (saving is
    collective), so the ranks agree with one tiny all-reduce -- a host sync -- but only at
    logging steps (which sync anyway) and every `check_every` steps: a stop comes at most
    check_every - 1 steps after the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, check_every: int = 1):
        self.check_every = check_every
        self.name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name

    def agreed(self, device: torch.device, step: int = 0, logging: bool = True) -> bool:
        """True on every rank, at the same step, once any rank has been signalled. Decided only
        at logging steps and steps divisible by check_every (the same steps on every rank)."""
        if not logging and step % self.check_every:
            return False
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


class _Window:
    """Training losses (this rank's, device tensors, unread) and time since the last logged step."""

    def __init__(self):
        self.restart()

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())

    @property
    def steps(self) -> int:
        return len(self.losses)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def restart(self, keep: bool = False) -> None:
        """Start a new window; keep=True keeps its losses and only restarts the clock."""
        if not keep:
            self.losses = []
        self.start = time.perf_counter()


def _as_float(value) -> float:
    """A gradient norm as a float: engines return a device tensor (read here, at a logging
    step), a float, or None (DeepSpeed before its first step)."""
    return float("nan") if value is None else float(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
