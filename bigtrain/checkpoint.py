"""Checkpoints: one file per rank plus a manifest, written atomically, loaded with weights_only.

Layout of a run directory:

    checkpoints/step_00000100/manifest.json    written last by rank 0: step, layout, config, data
                                               position, which file holds which tensors
    checkpoints/step_00000100/rank00000.pt     this rank's RNG state; for data-parallel rank 0
                                               (ranks 0..tp-1) also its TP rank's model and
                                               optimizer shards, written once, not once per replica

Every rank writes into `checkpoints/.tmp_step_XXXXXXXX/` (each file to a temporary name, fsynced
and renamed), then rank 0 writes the manifest and renames the whole directory into place. A rename
is atomic, so a directory named step_* is always complete: a run killed at any moment, also in the
middle of a save, resumes from the newest step_* directory and never sees half a checkpoint.

Model and optimizer tensors are stored by parameter name with their shard metadata
(`shard_dim`, full shape), so a checkpoint written at one tensor-parallel layout can be rebuilt
into full tensors and re-sliced for another.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigtrain.errors import UserError
from bigtrain.parallel.layers import full_from_shards, full_shape, shard_of
from bigtrain.safe_load import load_tensors

STEP_RE = re.compile(r"^step_(\d{8})$")
RANK_FILE_RE = re.compile(r"^(rank(\d{5})\.pt|deepspeed/mp_rank_\d{2}_model_states\.pt)$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


# --------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch CPU, every CUDA device) as plain tensors and ints, so that it
# loads under weights_only=True.


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------
# Model and optimizer state keyed by parameter name


def shard_meta(model: nn.Module) -> dict:
    """{name: {"shard_dim": int | None, "full_shape": [...]}} for every parameter."""
    meta = {}
    for name, p in model.named_parameters():
        s = shard_of(p)
        meta[name] = {"shard_dim": s.dim if s is not None else None, "full_shape": list(full_shape(p))}
    return meta


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """torch's optimizer state is keyed by position; key it by parameter name instead, so it
    survives a different parameter order or layout."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_to_name = {}
    for group_sd, group in zip(sd["param_groups"], optimizer.param_groups):
        for idx, p in zip(group_sd["params"], group["params"]):
            index_to_name[idx] = names[id(p)]
    return {"state": {index_to_name[i]: s for i, s in sd["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    state = {}
    for group_sd, group in zip(sd["param_groups"], optimizer.param_groups):
        for i, p in zip(group_sd["params"], group["params"]):
            if names[id(p)] in saved["state"]:
                state[i] = saved["state"][names[id(p)]]
    if len(saved["groups"]) != len(sd["param_groups"]):
        raise UserError("checkpoint optimizer has a different number of parameter groups than this model")
    groups = [{**saved_g, "params": g["params"]} for saved_g, g in zip(saved["groups"], sd["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------
# Save


def _barrier(group=None) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports a full disk
    as a cryptic RuntimeError ("unexpected pos 704 vs 598"), this keeps the real cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def write_file(path: Path, obj) -> None:
    """torch.save to a temporary name, fsync, rename: the file is either old, new, or absent.
    A failed write raises the OSError that caused it (ENOSPC, EIO, ...)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            w = _RecordingWriter(f)
            try:
                torch.save(obj, w)
            except RuntimeError:
                if w.error is not None:
                    raise w.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:  # a failed write() names no file: name it for the user
            e.filename = str(tmp)
        raise
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: str | Path, step: int, rank_state: dict, manifest: dict, dims, keep_last: int,
                    write_extra=None, group=None) -> Path:
    """Write this rank's state; rank 0 adds the manifest and publishes the directory.

    Collective: every rank of the job calls it. After each phase the ranks agree on its
    success with one small all-reduce (not a barrier: a rank that failed to write must not
    leave the others waiting), so a failure anywhere -- a full disk, EIO, a read-only mount --
    makes every rank remove the partial directory and raise the same one-line UserError, with
    the previous checkpoints untouched. `write_extra(directory)`, when given, is called on every
    rank to add engine files (DeepSpeed; a failure inside DeepSpeed's own collectives is
    DeepSpeed's: it ends at parallel.timeout_s at worst). `group`: the process group of those
    agreements (a background save has its own, so that they never interleave with training's).
    """
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    phases = [
        lambda: _prepare(root, tmp) if dims.rank == 0 else None,
        lambda: write_file(tmp / f"rank{dims.rank:05d}.pt", rank_state),
        lambda: write_extra(tmp) if write_extra is not None else None,
        lambda: _publish(root, tmp, final, {**manifest, "step": step, "world_size": dims.world_size,
                                             "tp": dims.tp, "dp": dims.dp, "complete": True})
        if dims.rank == 0 else None,
    ]
    for phase in phases:
        error = _attempt(phase)
        failures = agree_on_failure(error, group)
        if failures:
            message = _cleanup_after_failure(out_dir, step, tmp, dims.rank, failures, group)
            if error is not None and not isinstance(error, OSError):
                raise error  # a bug, not the disk: keep its traceback (the peers report it in one line)
            raise UserError(message) from None
    if dims.rank == 0:
        prune(out_dir, keep_last)  # never fails: ignore_errors
    return final


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    # Partial directories of saves killed mid-way (SIGKILL leaves no chance to clean up): never
    # a checkpoint, and on a full disk the space the next save needs.
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale)
    tmp.mkdir()


def _publish(root: Path, tmp: Path, final: Path, manifest: dict) -> None:
    """Rank 0: the manifest last, then one atomic rename makes the checkpoint visible."""
    write_json(tmp / "manifest.json", manifest)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. end of a resumed run): replace it
        old = root / f".old_step_{final.name[5:]}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)  # put the complete previous one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def _attempt(phase) -> BaseException | None:
    """Run one phase of a save; its exception (returned, not raised, so that every rank still
    reaches the agreement) or None."""
    try:
        phase()
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        return e
    return None


def agree_on_failure(error: BaseException | None, group=None) -> list[tuple[int, str]]:
    """Collective: (rank, message) of every rank whose `error` is set, the same list on every
    rank. One 1-element all-reduce when all succeeded (on the GPU under NCCL, which cannot
    reduce CPU tensors); the messages travel only after a failure."""
    message = None if error is None else _describe(error)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [] if message is None else [(0, message)]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend(group) == "nccl" \
        else torch.device("cpu")
    flag = torch.tensor([float(message is not None)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    if flag.item() == 0:
        return []
    messages = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(messages, message, group=group)
    return [(r, m) for r, m in enumerate(messages) if m is not None]


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _cleanup_after_failure(out_dir, step: int, tmp: Path, rank: int, failures: list[tuple[int, str]],
                           group=None) -> str:
    """Every rank removes its own files of the failed save, then rank 0 the directory (after a
    barrier: all ranks are here, the agreement said so). Returns the one-line error."""
    for name in (f"rank{rank:05d}.pt", f"rank{rank:05d}.pt.tmp"):
        try:
            (tmp / name).unlink(missing_ok=True)
        except OSError:
            pass  # rank 0's rmtree below tries again
    _barrier(group)
    left = ""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.exists():
            left = f"; could not remove the partial {str(tmp)!r}: delete it by hand"
    _barrier(group)
    first_rank, first = failures[0]
    where = f"rank {first_rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    latest = latest_checkpoint(out_dir)
    kept = (f"the newest complete checkpoint is still {latest.name} (train.resume=auto continues from it)"
            if latest is not None else "there is no earlier checkpoint")
    return f"could not save the checkpoint of step {step}: {where}: {first}; the partial checkpoint was removed{left}, {kept}"


def prune(out_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Load


def find_checkpoint(run: str | Path, step: int | None) -> Path:
    """A run directory's latest complete checkpoint, or the one of `step`."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"--run {str(run)!r} is not a directory")
    if step is None:
        path = latest_checkpoint(run)
        if path is None:
            raise UserError(f"run directory {str(run)!r} holds no complete checkpoint (checkpoints/step_*)")
        return path
    path = checkpoint_root(run) / f"step_{step:08d}"
    if not (path / "manifest.json").is_file():
        have = [int(p.name[5:]) for p in list_checkpoints(run)]
        raise UserError(f"run {str(run)!r} has no checkpoint for step {step}; it has steps {have}")
    return path


def read_manifest(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{str(ckpt)!r} is not a complete bigtrain checkpoint (no manifest.json); "
                        f"pass a checkpoints/step_XXXXXXXX directory or train.resume=auto")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint manifest {str(path)!r} is corrupt: {e}") from None
    check_manifest(Path(ckpt), manifest)
    return manifest


# field -> the JSON types it may have (bool is an int to Python: refused separately below)
_MANIFEST_FIELDS = {"step": int, "world_size": int, "tp": int, "dp": int, "config": dict}


def check_manifest(directory: Path, manifest) -> None:
    """Refuse, in one line, a manifest that disagrees with itself or with its directory: a
    missing or mistyped field, tp * dp != world_size, a step that is not the directory's, or a
    rank file missing for its world_size -- before any rank reads a tensor."""
    where = f"checkpoint manifest {str(directory / 'manifest.json')!r}"
    if not isinstance(manifest, dict):
        raise UserError(f"{where} is not a JSON object")
    for key, typ in _MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise UserError(f"{where}: field {key!r} is {value!r}, expected {'an integer' if typ is int else 'an object'}")
    if not isinstance(manifest["config"].get("model"), dict):
        raise UserError(f"{where}: field 'config' has no 'model' section")
    if manifest["step"] < 0 or min(manifest["world_size"], manifest["tp"], manifest["dp"]) < 1:
        raise UserError(f"{where}: step must be >= 0 and world_size, tp, dp >= 1 (step {manifest['step']}, "
                        f"world_size {manifest['world_size']}, tp {manifest['tp']}, dp {manifest['dp']})")
    if manifest["tp"] * manifest["dp"] != manifest["world_size"]:
        raise UserError(f"{where}: tp({manifest['tp']}) * dp({manifest['dp']}) != world_size({manifest['world_size']})")
    m = STEP_RE.match(directory.name)
    if m and int(m.group(1)) != manifest["step"]:
        raise UserError(f"{where}: step {manifest['step']} does not match the directory {directory.name}")
    files = manifest.get("tensor_files", {"model": [f"rank{r:05d}.pt" for r in range(manifest["tp"])]})
    if not (isinstance(files, dict) and isinstance(files.get("model"), list) and len(files["model"]) == manifest["tp"]
            and all(isinstance(f, str) and RANK_FILE_RE.match(f) for f in files["model"])):
        raise UserError(f"{where}: field 'tensor_files' is {files!r}, expected {{'model': [one rankNNNNN.pt per tp rank]}}")
    names = {f"rank{r:05d}.pt" for r in range(manifest["world_size"])} | set(files["model"])
    missing = sorted(n for n in names if not (directory / n).is_file())
    if missing:
        ranks = [int(m.group(2)) for m in map(RANK_FILE_RE.match, missing) if m.group(2)]
        which = f"no file for rank(s) {ranks[:4]}" if ranks else "missing files"
        raise UserError(f"{where}: world_size {manifest['world_size']} but {which} "
                        f"({', '.join(missing[:2])}); the checkpoint is incomplete")


def tensor_files(tp: int, weights_file: str | None = None) -> dict:
    """The manifest's record of which file holds which tensors: tp rank i's model shards and
    bigtrain's optimizer state (DDP) are in model[i], written by data-parallel rank 0 of that
    TP group, which is global rank i. Every rank's own file holds its RNG state (and the shard
    metadata). With `weights_file` (DeepSpeed ZeRO-1/2, which writes the weights itself) model[i]
    is that file, its tensors under model_key, and the optimizer is DeepSpeed's."""
    names = [f"rank{r:05d}.pt" for r in range(tp)]
    if weights_file is None:
        return {"model": names, "optim": names}
    return {"model": [weights_file.format(tp_rank=r) for r in range(tp)], "model_key": "module", "optim": "deepspeed"}


def model_shards(ckpt: str | Path, manifest: dict, mmap: bool = False) -> list[dict]:
    """TP ranks 0..tp-1's {name: tensor} model shards, from the files the manifest names."""
    files = manifest.get("tensor_files", {})
    key = files.get("model_key")
    if key is None:
        return [load_tensors(Path(ckpt) / name, mmap=mmap)["model"] for name in _shard_file_names(manifest)]
    from bigtrain.safe_load import deepspeed_allowed  # imports deepspeed: only for its checkpoints

    return [load_tensors(Path(ckpt) / name, deepspeed_allowed())[key] for name in files["model"]]


def check_resumable(directory: Path, manifest: dict) -> None:
    """What a resume needs beyond the weights (export-hf and sample need only those)."""
    if not isinstance(manifest.get("data"), dict):
        raise UserError(f"checkpoint manifest {str(Path(directory) / 'manifest.json')!r}: field 'data' (the data "
                        f"position) is {manifest.get('data')!r}, expected an object; it cannot be resumed")


def read_shard_file(ckpt: str | Path, manifest: dict, tp_rank: int) -> dict:
    """The file holding tp rank `tp_rank`'s model and optimizer shards."""
    return load_tensors(Path(ckpt) / manifest["tensor_files"]["model"][tp_rank])


def read_rank_file(ckpt: str | Path, rank: int, mmap: bool = False) -> dict:
    """A rank file's tensors (mmap: memory-mapped, read only where touched -- for a small part of
    a file that also holds model and optimizer shards)."""
    path = Path(ckpt) / f"rank{rank:05d}.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {str(ckpt)!r} has no file for rank {rank} ({path.name})")
    return load_tensors(path, mmap=mmap)


def load_model_state(model: nn.Module, saved: dict, source: str) -> None:
    """Copy saved tensors into the model, naming the first mismatch as a user error."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise UserError(f"checkpoint {source} does not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} (was it written with another model config?)")
    with torch.no_grad():
        for name, p in params.items():
            t = saved[name]
            if tuple(t.shape) != tuple(p.shape):
                raise UserError(f"checkpoint {source}: parameter {name} has shape {tuple(t.shape)}, "
                                f"the model expects {tuple(p.shape)} (another model config or layout?)")
            p.copy_(t)


def unshard(pieces: list[torch.Tensor], info: dict) -> torch.Tensor:
    """One full (unsharded, unpadded) tensor from the tensor-parallel ranks' pieces, in tp-rank
    order (vocab padding sits at the end); replicated tensors are taken from tp rank 0."""
    dim = info["shard_dim"]
    if dim is None:
        return pieces[0]
    return full_from_shards(pieces, dim, info["full_shape"][dim]).contiguous()


def full_tensors(shards: list[dict], meta: dict) -> dict:
    """unshard() for every parameter of the TP ranks' {name: tensor} dicts."""
    return {name: unshard([s[name] for s in shards], info) for name, info in meta.items()}


def reshard(path: str | Path, manifest: dict, module: nn.Module) -> tuple[dict, dict]:
    """(model state, optimizer state by name) for this rank of `module`'s layout, from a checkpoint
    written at another tp/dp layout, read from the saved TP group of data-parallel rank 0.

    Bounded: the files are memory-mapped (torch.load(mmap=True, weights_only=True)) and each
    tensor is cut straight from the saved pieces (`part_of`), so a rank reads only the rows of
    its own slices and never holds a full tensor it does not keep."""
    states = [load_tensors(Path(path) / name, mmap=True) for name in _shard_file_names(manifest)]
    meta = states[0]["shards"]
    params = dict(module.named_parameters())

    def mine(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        return part_of(pieces, meta[name], shard_of(params[name]) if name in params else None)

    model = {n: mine(n, [s["model"][n] for s in states]) for n in meta}
    optim = {"groups": states[0]["optim"]["groups"], "state": {}}
    for name, entry in states[0]["optim"]["state"].items():
        optim["state"][name] = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim > 0 and name in meta:  # exp_avg, exp_avg_sq: like the param
                optim["state"][name][key] = mine(name, [s["optim"]["state"][name][key] for s in states])
            else:  # the step counter: the same on every rank
                optim["state"][name][key] = value.clone() if torch.is_tensor(value) else value
    return model, optim


class ZeroFragments:
    """One TP rank's DeepSpeed ZeRO-1/2 optimizer state, by parameter name: the fp32 master
    weights and Adam moments that the data-parallel ranks' partitions hold between them.

    Every DP rank d's file (deepspeed/[bf16_]zero_pp_rank_{d}_mp_rank_{tp:02d}_optim_states.pt)
    holds, per parameter group, a flat slice of the group's concatenated parameters and, in
    `param_slice_mappings`, where each parameter's fragment of it starts and how long it is; a
    parameter is its fragments in DP-rank order. The files are memory-mapped and a tensor is
    joined only when asked for (`tensor`), so reading costs one full tensor at a time."""

    KEYS = ("param", "exp_avg", "exp_avg_sq")

    def __init__(self, path: Path, manifest: dict, tp_rank: int):
        from bigtrain.safe_load import deepspeed_allowed  # imports deepspeed: only for its checkpoints

        allowed = deepspeed_allowed()
        root = Path(path) / "deepspeed"
        model_states = load_tensors(root / f"mp_rank_{tp_rank:02d}_model_states.pt", allowed, mmap=True)
        self.shapes = {n: tuple(sh) for group in model_states["param_shapes"] for n, sh in group.items()}
        self.fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.steps: dict[str, torch.Tensor] = {}
        self.groups: list[dict] = []
        for d in range(manifest["dp"]):
            files = sorted(root.glob(f"*zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt"))
            if len(files) != 1:
                raise UserError(f"checkpoint {str(path)!r}: DeepSpeed's optimizer partition of dp rank {d}, tp rank "
                                f"{tp_rank} is {'missing' if not files else 'there twice'} under {root}")
            osd = load_tensors(files[0], allowed, mmap=True)["optimizer_state_dict"]
            base = osd["base_optimizer_state"]
            if d == 0:
                self.groups = [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                flat = {"param": osd["single_partition_of_fp32_groups"][g], **base["state"][g]}
                for name, frag in mapping.items():
                    entry = self.fragments.setdefault(name, {k: [] for k in self.KEYS})
                    for key in self.KEYS:
                        entry[key].append(flat[key].narrow(0, frag.start, frag.numel))
                    self.steps.setdefault(name, flat["step"])
        missing = sorted(set(self.shapes) - set(self.fragments))
        if missing:
            raise UserError(f"checkpoint {str(path)!r}: DeepSpeed's optimizer partitions hold no fragment of "
                            f"{missing[:3]}")

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """Parameter `name`'s `key` ("param", "exp_avg" or "exp_avg_sq"), whole (this TP rank's shard)."""
        shape = self.shapes[name]
        parts = self.fragments[name][key]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        if flat.numel() != math.prod(shape):
            raise UserError(f"DeepSpeed checkpoint: {name}'s fragments hold {flat.numel()} values, its shape "
                            f"{shape} needs {math.prod(shape)}")
        return flat.view(shape)


def reshard_deepspeed(path: str | Path, manifest: dict, module: nn.Module) -> tuple[dict, dict]:
    """reshard() from a DeepSpeed ZeRO-1/2 checkpoint, for a DDP run at any layout: the model is
    DeepSpeed's fp32 master weights (in bf16 training more precise than its module's), the
    optimizer state its Adam moments, both re-keyed by name and cut to this rank's slices."""
    if manifest["config"]["parallel"].get("zero_stage") == 3:
        raise UserError(f"checkpoint {str(path)!r} was written by DeepSpeed ZeRO-3, whose partitions resume only "
                        f"under parallel.engine=deepspeed parallel.zero_stage=3 at tp={manifest['tp']} "
                        f"dp={manifest['dp']}")
    meta = read_rank_file(path, 0, mmap=True)["shards"]
    params = dict(module.named_parameters())
    tp_states = [ZeroFragments(Path(path), manifest, r) for r in range(manifest["tp"])]

    def mine(name: str, key: str) -> torch.Tensor:
        pieces = [st.tensor(name, key) for st in tp_states]
        return part_of(pieces, meta[name], shard_of(params[name]) if name in params else None)

    model = {n: mine(n, "param") for n in meta}
    state = {n: {"step": tp_states[0].steps[n].clone(), "exp_avg": mine(n, "exp_avg"),
                 "exp_avg_sq": mine(n, "exp_avg_sq")} for n in meta}
    return model, {"groups": tp_states[0].groups, "state": state}


def _shard_file_names(manifest: dict) -> list[str]:
    """The files holding TP ranks 0..tp-1's tensors (ranks 0..tp-1 before tensor_files existed)."""
    return manifest.get("tensor_files", {}).get("model") or [f"rank{r:05d}.pt" for r in range(manifest["tp"])]


def part_of(pieces: list[torch.Tensor], info: dict, shard) -> torch.Tensor:
    """`shard(unshard(pieces, info))` -- this rank's slice of a tensor saved as TP pieces -- as a
    new tensor, without building the full one: only the saved rows inside the slice are read
    (from memory-mapped pieces, only their pages). Bitwise the same: both only copy."""
    dim = info["shard_dim"]
    if shard is None or dim is None or shard.dim != dim:  # a replicated side: the full tensor is the part
        full = unshard(pieces, info)
        part = shard(full) if shard is not None else full
        # A copy only where the part is not a whole tensor of its own (a memory-mapped piece, a
        # view into a larger one): copying a tensor just concatenated doubles the transient
        # and fragments the heap.
        storage = part.untyped_storage()
        shared = any(storage.data_ptr() == q.untyped_storage().data_ptr() for q in pieces)
        whole = part.is_contiguous() and storage.nbytes() == part.numel() * part.element_size()
        return part if whole and not shared else part.clone()
    rows = pieces[0].shape[dim]  # per saved piece; the last ones may end in vocab padding
    lo, hi = shard.start, min(shard.start + shard.size, info["full_shape"][dim])  # rows past full_shape: padding
    shape = list(pieces[0].shape)
    shape[dim] = shard.size
    out = pieces[0].new_zeros(shape)
    for i, piece in enumerate(pieces):
        a, b = max(lo, i * rows), min(hi, (i + 1) * rows)
        if a < b:
            out.narrow(dim, a - lo, b - a).copy_(piece.narrow(dim, a - i * rows, b - a))
    return out


def full_model_state(path: str | Path, manifest: dict) -> dict:
    """The full model state of a checkpoint, whatever its layout: TP ranks sit next to each other,
    so ranks 0..tp-1 (data-parallel rank 0) hold one complete copy between them (in the files
    tensor_files names: DeepSpeed's own under ZeRO-1/2)."""
    return full_tensors(model_shards(path, manifest), read_rank_file(path, 0)["shards"])
