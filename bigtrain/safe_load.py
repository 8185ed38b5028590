"""Loading pickled tensor files without executing anything they contain.

`torch.load(weights_only=True)` reconstructs only tensors, containers and primitive types (plus
the classes named in `allowed`); a file that asks for anything else -- `os.system`, a class with a
hostile `__reduce__` -- is refused before any of it runs. Every `.pt` file bigtrain reads goes
through `load_tensors`: its own rank files, DeepSpeed's checkpoint files (see
`deepspeed_checkpoint_engine`) and a Hugging Face `pytorch_model.bin`.

`check_globals` scans a file's pickle for the classes it names without unpickling anything, so a
collective load (every rank reads its own part of a DeepSpeed checkpoint) can be refused on every
rank alike before any rank starts reading -- instead of one rank raising while its peers wait in
a collective.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

from bigtrain.errors import UserError


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_tensors(path: str | Path, allowed: tuple = (), map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True and at most the classes in `allowed`; a refused or
    unreadable file is a one-line UserError naming it. mmap=True maps the tensors' bytes
    instead of reading them: only what is then touched is read."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - unsafe pickle, truncated zip, not a torch file...
        raise UserError(f"refusing {str(path)!r}: it is corrupt or holds more than tensors and plain data "
                        f"({_first_line(e)})") from None


def check_globals(path: str | Path, allowed: tuple = ()) -> None:
    """Refuse a file whose pickle names any class or function beyond what weights_only allows
    and `allowed`, without unpickling it (reads the pickle, not the tensor data)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    try:
        unsafe = get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - not a zip-format torch file, truncated...
        raise UserError(f"refusing {str(path)!r}: it is corrupt or not a torch checkpoint file "
                        f"({_first_line(e)})") from None
    bad = sorted(set(unsafe) - names)
    if bad:
        raise UserError(f"refusing {str(path)!r}: it names {', '.join(bad[:3])}, which a checkpoint file "
                        f"has no reason to hold (loading it could run code)")


# --------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_allowed() -> tuple:
    """The three DeepSpeed classes its ZeRO optimizer files hold besides tensors and plain data
    (measured on stages 1-3 with deepspeed 0.19): each is rebuilt from plain fields and runs no
    code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, ZeroStageEnum, fragment_address)


def check_deepspeed_dir(directory: Path) -> None:
    """check_globals for every file of a DeepSpeed checkpoint directory (any file there is read
    by some rank's load_checkpoint)."""
    allowed = deepspeed_allowed()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            check_globals(f, allowed)


def deepspeed_checkpoint_engine(config_params):
    """DeepSpeed's torch checkpoint engine with a safe `load`. DeepSpeed's own loads with
    weights_only=False, so a checkpoint file could run code on resume; every file its
    load_checkpoint reads (model states, ZeRO optimizer partitions) goes through this `load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_tensors(path, deepspeed_allowed(), map_location=map_location)

    return SafeTorchCheckpointEngine(config_params)
