"""A running job's state in and out of checkpoints: what to resume from, save, restore.

    source = find_resume(cfg)              # train.resume: auto, none or a path
    save_state(c, step, data_state)        # collective: rank files, engine files, manifest
    step = restore_state(c, source)        # same layout, or resharded from another tp/dp

bigtrain.checkpoint holds the file format (atomic directories, rank files, resharding);
this module decides what goes into them for a run's components (`c`, a
bigtrain.build.Components: it is not imported here, since build imports this module).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.distributed as dist

from bigtrain import checkpoint as ckpt
from bigtrain.config import Config, to_dict
from bigtrain.errors import UserError
from bigtrain.job import Job
from bigtrain.parallel.layers import my_slice


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint train.resume names (auto: the newest in train.out_dir, if any)."""
    r, out_dir = cfg.train.resume, Path(cfg.train.out_dir)
    latest = ckpt.latest_checkpoint(out_dir)
    if r == "auto":
        return latest
    if r == "none":
        if latest is not None:
            raise UserError(f"train.out_dir {str(out_dir)!r} already holds checkpoints (latest "
                            f"{latest.name}); pass train.resume=auto to continue it, or choose another train.out_dir")
        return None
    path = Path(r)
    if not path.exists():
        raise UserError(f"train.resume={r!r}: no such checkpoint directory; use auto, none or a checkpoints/step_* path")
    return path


def is_weights_only(path: str | Path) -> bool:
    """Whether a checkpoint holds model weights only (written by import-hf)."""
    return bool(ckpt.read_manifest(path).get("weights_only", False))


def load_weights_only(module, job: Job, path: Path, announce: bool) -> None:
    """A weights-only checkpoint's model weights (any layout) into `module` (any layout): full
    tensors, then each parameter's own tensor-parallel slice. The optimizer, data order and RNG
    start fresh, at step 0."""
    manifest = ckpt.read_manifest(path)
    check_same_model(manifest["config"]["model"], to_dict(job.cfg)["model"], path)
    params = dict(module.named_parameters())
    mine = {}
    for name, t in ckpt.full_model_state(path, manifest).items():
        mine[name] = my_slice(params[name], t) if name in params else t
    ckpt.load_model_state(module, mine, str(path))
    if announce:
        print(f"initialised from the weights of {path} (weights only: fresh optimizer, step 0)", flush=True)


def save_state(c, step: int, data_state: dict, saver: "AsyncSaver | None" = None) -> Path:
    """Checkpoint the job at `step` (collective): RNG state in every rank's file; the model
    shards and bigtrain's optimizer state once per TP rank, in the file of its data-parallel
    rank 0 (the DP replicas hold the same bytes: DDP's update is identical on each); the data
    position in the manifest; rank 0 publishes the directory. With `saver`, what is saved is
    copied now (HostStaging: pinned and non-blocking on CUDA) and written in its background
    thread (returns at once)."""
    holds_shards = c.dims.dp_rank == 0
    weights_file = c.engine.module_weights_file  # DeepSpeed writes the weights itself: not twice
    if saver is not None:
        saver.wait()  # the previous background save still reads the staging buffers
    staging = saver.staging if saver is not None else None
    model = {} if holds_shards and weights_file is None else None
    for name, p in c.engine.each_full_parameter():  # collective under ZeRO-3: every rank iterates
        if model is not None:
            model[name] = staging.copy(("model", name), p) if staging is not None else p.detach().cpu().clone()
    rank_state = {
        "shards": ckpt.shard_meta(c.module),
        "rng": ckpt.rng_state(),
        "rng_tracker": c.rng.get_states(),  # the "tp" dropout stream of this TP rank
        "step": step,
    }
    if holds_shards:
        engine_state = c.engine.state_dict()  # the optimizer's live tensors: the next step changes them
        rank_state.update(**(staging.snapshot(engine_state, ("engine",)) if staging is not None else engine_state))
        if model is not None:
            rank_state["model"] = model
    cfg = c.job.cfg
    manifest = {"config": to_dict(cfg), "data": data_state, "engine": cfg.parallel.engine,
                "tensor_files": ckpt.tensor_files(c.dims.tp, weights_file)}
    final = ckpt.checkpoint_root(cfg.train.out_dir) / f"step_{step:08d}"
    if saver is not None:
        ready = staging.ready()

        def write(group):
            if ready is not None:
                ready.synchronize()  # the non-blocking device->host copies have landed
            ckpt.save_checkpoint(cfg.train.out_dir, step, rank_state, manifest, c.dims, cfg.checkpoint.keep_last,
                                 group=group)

        saver.submit(write)
        return final
    return ckpt.save_checkpoint(cfg.train.out_dir, step, rank_state, manifest, c.dims,
                                cfg.checkpoint.keep_last, write_extra=c.engine.save)


class HostStaging:
    """The host copy of a background save (train.async_save), taken while training waits.

    On CUDA the copies go into pinned buffers kept from one save to the next (pinning is slow:
    cudaHostAlloc stalls every stream) and are issued non-blocking on the compute stream, so the
    loop stops only to enqueue them: the next optimizer step, later on the same stream, cannot
    change a tensor before its copy has read it. `ready()` records the event the writer waits
    for before reading the buffers. On the CPU: plain copies, and no event."""

    def __init__(self):
        self._pinned: dict[tuple, torch.Tensor] = {}

    def copy(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type != "cuda":
            return t.to("cpu", copy=True)
        buf = self._pinned.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        return buf

    def snapshot(self, obj, key: tuple = ()):
        """A copy of nested dicts/lists/tuples with every tensor copied to the host."""
        if torch.is_tensor(obj):
            return self.copy(key, obj)
        if isinstance(obj, dict):
            return {k: self.snapshot(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.snapshot(v, (*key, i)) for i, v in enumerate(obj))
        return obj

    def ready(self):
        """An event after this save's copies (None when none is pending: nothing on CUDA)."""
        if not self._pinned or not torch.cuda.is_available():
            return None
        event = torch.cuda.Event()
        event.record()
        return event


def use_async_save(job, spans) -> bool:
    """train.async_save resolved: true/false as set; auto is on with DDP on CUDA when a save's
    snapshot -- the fp32 model shards and AdamW moments of this rank's TP rank, 12 bytes per
    parameter, copied to host memory -- fits in the host memory budget beside what the policy
    `spans` offloads (planner.host_budget, estimate().host_total). Off on the CPU, where the
    copy takes the training's own memory and the writer thread its cores."""
    choice = job.cfg.train.async_save
    if choice != "auto":
        return choice == "true"
    if job.device != "cuda" or job.cfg.parallel.engine != "ddp" or not job.cfg.train.save_every:
        return False
    from bigtrain.planner import estimate, host_budget, rank_params

    n = rank_params(job)
    fits = 12 * n.total + estimate(job, spans, n=n).host_total <= host_budget(job)
    if dist.is_available() and dist.is_initialized():
        # Every rank must agree (the saver makes a group; the two kinds of save synchronise
        # differently), and nodes may differ in RAM or GPUs: background only if all fit.
        flag = torch.tensor([int(fits)], device=job.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        fits = bool(flag.item())
    return fits


class AsyncSaver:
    """train.async_save: one checkpoint in flight at a time, written by a background thread
    while training continues. The save's agreements run over a gloo group of their own, so they
    never interleave with training's collectives (and need no GPU stream); the atomic rename is
    unchanged, so a step_* directory is complete or absent as before. A failed background save
    raises its one-line error at wait(): the next save or the end of training, the same point on
    every rank."""

    def __init__(self, group):
        self.group = group  # ParallelDims.new_side_group(): None in one process
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.staging = HostStaging()  # the host copy of each save, its buffers reused

    def submit(self, write) -> None:
        """Wait for the previous save, then run write(group) in the background."""
        self.wait()

        def run():
            try:
                write(self.group)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait() on the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="bigtrain-save", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def restore_state(c, path: Path) -> int:
    """Restore weights, optimizer, RNG and data position from a full checkpoint; returns its
    step. At another tp/dp layout (DDP only), or from DeepSpeed ZeRO-1/2 into DDP, the model and
    optimizer are resharded."""
    cfg, dims = c.job.cfg, c.dims
    manifest = ckpt.read_manifest(path)
    ckpt.check_resumable(path, manifest)
    check_same_model(manifest["config"]["model"], to_dict(cfg)["model"], path)
    saved_engine = manifest.get("engine", "ddp")
    from_deepspeed = saved_engine == "deepspeed" and cfg.parallel.engine == "ddp"
    if saved_engine != cfg.parallel.engine and not from_deepspeed:
        raise UserError(f"checkpoint {str(path)!r} was written with parallel.engine={saved_engine}; resume it "
                        f"with that engine (a DeepSpeed ZeRO-1/2 checkpoint also resumes under parallel.engine=ddp)")
    same_layout = (manifest["tp"], manifest["dp"]) == (dims.tp, dims.dp) and not from_deepspeed
    if same_layout:
        saved = ckpt.read_rank_file(path, dims.rank)
        if "model" in saved or c.engine.loads_module_weights:  # (DeepSpeed reads its own files)
            shards = saved
        else:  # a data-parallel replica: its TP rank's shards are in dp rank 0's file
            shards = ckpt.read_shard_file(path, manifest, dims.tp_rank)
        model_state, rng = shards.get("model"), saved["rng"]
        c.engine.load_state_dict(shards)
        if "rng_tracker" in saved:
            c.rng.set_states(saved["rng_tracker"])
    elif cfg.parallel.engine == "deepspeed":
        raise UserError(f"checkpoint {str(path)!r} was written at tp={manifest['tp']} dp={manifest['dp']}; "
                        f"DeepSpeed checkpoints resume only at the same layout (tp={dims.tp} dp={dims.dp} now)")
    else:
        reshard = ckpt.reshard_deepspeed if from_deepspeed else ckpt.reshard
        model_state, optim_state = reshard(path, manifest, c.module)
        c.engine.load_state_dict({"optim": optim_state})
        # The default RNG streams advance identically on every rank: take rank 0's. The
        # per-TP-rank "tp" streams have no counterpart at another tp: they start afresh from
        # the seed (this only matters with dropout inside split regions).
        # Memory-mapped: rank 0's file also holds its model and optimizer shards, which read
        # whole beside the resharded state cost ~6 bytes per parameter of peak host memory.
        rng = ckpt.read_rank_file(path, 0, mmap=True)["rng"]
    if not (same_layout and c.engine.loads_module_weights):
        ckpt.load_model_state(c.module, model_state, str(path))
    c.engine.load(path)
    ckpt.set_rng_state(rng)
    c.train_loader.load_state_dict(manifest["data"])
    step = int(manifest["step"])
    if dims.rank == 0:
        how = "" if same_layout else f" (resharded from tp={manifest['tp']} dp={manifest['dp']}" + \
            (f", DeepSpeed ZeRO-{manifest['config']['parallel']['zero_stage']})" if from_deepspeed else ")")
        print(f"resumed from {path} at step {step}{how}", flush=True)
    return step


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    # max_seq_len and dropout do not change the weights' shapes or meaning.
    ignore = {"max_seq_len", "dropout"}
    diff = [f"model.{k}: {saved.get(k)!r} in checkpoint vs {current[k]!r}"
            for k in current if k not in ignore and saved.get(k) != current[k]]
    if diff:
        raise UserError(f"checkpoint {str(path)!r} was written with a different model: {'; '.join(diff)}")
