"""Metrics: a progress bar, metrics.jsonl in the run directory, and wandb.

Only the main rank (global rank 0) writes anything; values arrive already reduced across ranks.
wandb is imported lazily and every call to it is guarded: an unreachable server or a missing
package must never stop training.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from bigtrain.config import Config
from bigtrain.errors import UserError

# Dense bf16 peak of one device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                    "L4": 121.0, "V100": 125.0, "4090": 165.0, "3090": 71.0}


def peak_flops(device: torch.device, cfg: Config) -> float | None:
    """Peak FLOP/s of one device for MFU: log.peak_tflops if set, else a lookup for known GPUs."""
    if cfg.log.peak_tflops > 0:
        return cfg.log.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def memory_stats(device: torch.device) -> dict:
    """Peak memory of this process in GiB: CUDA allocator figures on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return {"mem_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that died after its last checkpoint), atomically."""
    if not path.exists():
        return
    keep = []
    # errors="replace": a line cut short by a kill (or bytes that are not text at all) is
    # dropped like any line that is not a record, never a reason to stop a resume.
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step <= last_step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


class MetricsLogger:
    """Writes one JSON object per logged step and mirrors it to wandb and the progress bar."""

    def __init__(self, cfg: Config, out_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        truncate_jsonl(self.path, start_step)
        self.file = self.path.open("a")
        if cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.wandb = _init_wandb(cfg, out_dir)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "val_loss", "lr", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                 refresh=False)
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])
            except Exception as e:  # noqa: BLE001 - wandb must never stop training
                self.warn(f"wandb logging failed, disabling it: {e}")
                self.wandb = None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        self.print(f"warning: {text}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def _wandb_mode(cfg: Config) -> str:
    mode = cfg.log.wandb.mode
    if mode != "auto":
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists() \
        and "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    return "online" if has_key else "disabled"


def _init_wandb(cfg: Config, out_dir: Path):
    mode = _wandb_mode(cfg)
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(project=cfg.log.wandb.project, name=cfg.log.wandb.name or out_dir.name,
                          dir=str(out_dir), mode=mode, config=_flat(cfg), resume="allow",
                          id=_run_id(out_dir), settings=wandb.Settings(init_timeout=60))
    except Exception as e:  # noqa: BLE001 - no network, no package, bad key: train anyway
        print(f"warning: wandb ({mode}) could not start, continuing without it: {e}", file=sys.stderr)
        return None


_MAX_RUN_ID = 128


def _run_id(out_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed job continues the same wandb run.
    The file is checked, not trusted: anything but a regular file holding one line of at most
    _MAX_RUN_ID printable characters is a one-line UserError naming it (which _init_wandb turns
    into its warning); at most that many bytes are read (not a symlink to /dev/zero's endless ones)."""
    f = out_dir / "wandb_id"
    if not f.exists() and not f.is_symlink():  # (a dangling symlink would be written through)
        f.write_text(f"{out_dir.name[:_MAX_RUN_ID - 12]}-{int(time.time())}")  # (within the limit below)
    if not f.is_file():
        raise UserError(f"{str(f)!r} is not a regular file; delete it to start a new wandb run")
    with open(f, "rb") as fh:
        raw = fh.read(_MAX_RUN_ID + 2)  # the id and a line end
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    if not text or len(text) > _MAX_RUN_ID or not text.isprintable():
        raise UserError(f"{str(f)!r} does not hold a wandb run id (one line of at most {_MAX_RUN_ID} printable "
                        f"characters); delete it to start a new wandb run")
    return text


def _flat(cfg: Config) -> dict:
    from bigtrain.config import to_dict

    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out
