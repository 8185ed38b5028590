"""Checkpoints: one file per rank plus a manifest, written atomically, loaded with weights_only.

Layout of a run directory:

    checkpoints/step_00000100/manifest.json    written last by rank 0: step, layout, config
    checkpoints/step_00000100/rank00000.pt     this rank's model/optimizer shards, RNG, data position

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
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigtrain.errors import UserError
from bigtrain.parallel.layers import full_from_shards, full_shape, my_slice, shard_of
from bigtrain.safe_load import load_tensors

STEP_RE = re.compile(r"^step_(\d{8})$")


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


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, obj) -> None:
    """torch.save to a temporary name, fsync, rename: the file is either old, new, or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: str | Path, step: int, rank_state: dict, manifest: dict, dims, keep_last: int,
                    write_extra=None) -> Path:
    """Write this rank's state; rank 0 adds the manifest and publishes the directory.

    Collective: every rank of the job calls it (barriers keep the phases in order).
    `write_extra(directory)`, when given, is called on every rank to add engine files (DeepSpeed).
    """
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if dims.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run that died while saving this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    if write_extra is not None:
        write_extra(tmp)
    write_file(tmp / f"rank{dims.rank:05d}.pt", rank_state)
    _barrier()
    if dims.rank == 0:
        write_json(tmp / "manifest.json", {**manifest, "step": step, "world_size": dims.world_size,
                                           "tp": dims.tp, "dp": dims.dp, "complete": True})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. end of a resumed run): replace it
            old = root / f".old_step_{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        prune(out_dir, keep_last)
    _barrier()
    return final


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
    if not isinstance(manifest, dict):
        raise UserError(f"checkpoint manifest {str(path)!r} is corrupt: a {type(manifest).__name__}, not an object")
    return manifest


def read_rank_file(ckpt: str | Path, rank: int) -> dict:
    path = Path(ckpt) / f"rank{rank:05d}.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {str(ckpt)!r} has no file for rank {rank} ({path.name})")
    return load_tensors(path)


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
    written at another tp/dp layout: rebuild every full tensor from the saved TP group of
    data-parallel rank 0, then cut this rank's slice with the parameter's own Shard."""
    states = [read_rank_file(path, r) for r in range(manifest["tp"])]
    meta = states[0]["shards"]
    params = dict(module.named_parameters())

    def mine(name: str, full: torch.Tensor) -> torch.Tensor:
        return my_slice(params[name], full) if name in params else full

    model = {n: mine(n, t) for n, t in full_tensors([s["model"] for s in states], meta).items()}
    optim = {"groups": states[0]["optim"]["groups"], "state": {}}
    for name, entry in states[0]["optim"]["state"].items():
        optim["state"][name] = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim > 0 and name in meta:  # exp_avg, exp_avg_sq: like the param
                full = unshard([s["optim"]["state"][name][key] for s in states], meta[name])
                optim["state"][name][key] = mine(name, full)
            else:  # the step counter: the same on every rank
                optim["state"][name][key] = value
    return model, optim


def full_model_state(path: str | Path, manifest: dict) -> dict:
    """The full model state of a checkpoint, whatever its layout: TP ranks sit next to each other,
    so ranks 0..tp-1 (data-parallel rank 0) hold one complete copy between them."""
    states = [read_rank_file(path, r) for r in range(manifest["tp"])]
    return full_tensors([s["model"] for s in states], states[0]["shards"])
