"""What a forward keeps for backward: measured (the accountant) and predicted (the formula).

**The accountant** counts, during one forward, every storage autograd saves for backward and
every checkpoint input a Stash keeps, once per storage, parameters and buffers excluded, split
into device-resident and host-resident (offloaded) bytes, per span of blocks (usually one
block) and outside the blocks (embedding, final norm, logits, loss):

    with ActivationAccountant(model) as acc:
        loss = loss_fn(model(x), y)
    acc.report.blocks["layer 0"].device

It sees what goes through bigtrain's saved-tensor hooks and stashes; it does not see the
transient memory of a replay in backward (one span at a time), nor allocator fragmentation.

The formula it is checked against is bigtrain.planner.formula.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from bigtrain.recompute.saved import storage_key


@dataclass
class BlockBytes:
    device: int = 0
    host: int = 0


@dataclass
class ActivationReport:
    """Bytes kept for backward per span of blocks (label -> BlockBytes), and outside the blocks."""
    blocks: dict[str, BlockBytes] = field(default_factory=dict)
    outside: BlockBytes = field(default_factory=BlockBytes)

    @property
    def total(self) -> BlockBytes:
        return BlockBytes(sum(b.device for b in self.blocks.values()) + self.outside.device,
                          sum(b.host for b in self.blocks.values()) + self.outside.host)


class ActivationAccountant:
    """Context manager that measures one forward's kept bytes (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = getattr(model, "module", model)  # under DDP / DeepSpeed, the wrapped module
        self.runner = self.model.block_runner
        if self.runner is None:
            raise ValueError("ActivationAccountant needs a model with bigtrain.recompute.apply_recompute applied")
        self.report = ActivationReport()
        self._seen: set = set()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ActivationAccountant":
        self.report, self._seen = ActivationReport(), set()
        # held while measuring, so that no activation can take a key of theirs (see saved.py)
        self._static_storages = [t.untyped_storage() for t in (*self.model.parameters(), *self.model.buffers())]
        self._static = {s._cdata for s in self._static_storages}
        self.runner.saved.accountant = self
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack_outside, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.runner.saved.accountant = None
        self._static_storages = []

    def add(self, label: str | None, key, nbytes: int, host: bool) -> None:
        """Count a storage once (called by Group.store for everything a span keeps)."""
        if key in self._seen:
            return
        self._seen.add(key)
        where = self.report.outside if label is None else self.report.blocks.setdefault(label, BlockBytes())
        if host:
            where.host += nbytes
        else:
            where.device += nbytes

    def _pack_outside(self, t: torch.Tensor) -> torch.Tensor:
        if storage_key(t) in self._static or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t  # a parameter (or a view of one, e.g. a gathered ZeRO-3 weight): not an activation
        self.add(None, storage_key(t), t.untyped_storage().nbytes(), host=False)
        return t.detach()  # no reference cycle through an op that saves its own output


def format_report(report: ActivationReport, predicted: list[tuple[str, int, int]] | None = None) -> str:
    """A per-span table in MiB: measured device/host and, when given, the formula's."""
    mib = 2.0 ** 20
    pred = {label: (d, h) for label, d, h in predicted or []}
    head = "| span | device MiB | host MiB |" + (" formula device MiB | formula host MiB |" if pred else "")
    lines = [head, "|---" * (5 if pred else 3) + "|"]
    for label, b in report.blocks.items():
        row = f"| {label} | {b.device / mib:.3f} | {b.host / mib:.3f} |"
        if pred:
            d, h = pred.get(label, (0, 0))
            row += f" {d / mib:.3f} | {h / mib:.3f} |"
        lines.append(row)
    o = report.outside
    lines.append(f"| outside blocks | {o.device / mib:.3f} | {o.host / mib:.3f} |" + (" | |" if pred else ""))
    return "\n".join(lines)
