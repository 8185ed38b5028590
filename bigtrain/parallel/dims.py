"""Which rank does what: the tensor-parallel (tp) x data-parallel (dp) layout and its groups.

Layout: tensor-parallel ranks are adjacent (ranks [i*tp, (i+1)*tp) form TP group i), because TP
all-reduces every layer and must stay inside a node's fast links; data-parallel groups are
strided (ranks {j, j+tp, j+2tp, ...}). So rank = dp_rank * tp + tp_rank.

The layout is an object passed to whoever needs a group, never a module global. The checks
are pure functions so a dry run (`bigtrain plan`) can validate a layout without processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from bigtrain.errors import ConfigError, UserError


def check_layout(world_size: int, tp: int, dp: int = 0, sequence_parallel: bool = False) -> tuple[int, int]:
    """Validate tp x dp (and sequence parallelism) against world_size and return (tp, dp); dp=0
    infers world_size / tp. The one check of a layout: job.resolve runs it for a run's config,
    ParallelDims.build for a layout built by hand."""
    if world_size < 1:
        raise UserError(f"world_size({world_size}) must be >= 1")
    if tp < 1:
        raise UserError(f"tp({tp}) must be >= 1")
    if dp < 0:
        raise UserError(f"dp({dp}) must be >= 0 (0 infers world_size / tp)")
    if dp == 0:
        if world_size % tp:
            raise UserError(f"world_size({world_size}) is not divisible by tp({tp})")
        dp = world_size // tp
    if tp * dp != world_size:
        raise UserError(f"tp({tp}) * dp({dp}) = {tp * dp} != world_size({world_size})")
    check_sequence_parallel(tp, sequence_parallel)
    return tp, dp


def check_model(cfg, tp: int) -> None:
    """Raise UserError unless every dimension tensor parallelism splits is divisible by tp
    (cfg: a bigtrain.config.ModelConfig; not imported, since config.py uses this module).

    Query and kv heads are split whole (a rank owns n_heads/tp query heads and the
    n_kv_heads/tp kv heads they attend to), the SwiGLU hidden size is split evenly. The vocab
    is padded instead (see padded_vocab), and dim is never split.
    """
    for name, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads), ("ffn_hidden", cfg.hidden)):
        if value % tp:
            raise UserError(f"{name}({value}) is not divisible by tp({tp})")


def check_sequence_parallel(tp: int, sequence_parallel: bool) -> None:
    """Sequence parallelism splits the sequence over the TP ranks: it needs more than one."""
    if sequence_parallel and tp == 1:
        raise ConfigError("sequence_parallel needs tp > 1 (it splits the sequence over the tensor-parallel ranks)")


def check_sequence(seq_len: int, tp: int, names: tuple[str, str] = ("seq_len", "tp")) -> None:
    """Sequence parallelism splits the sequence over the TP ranks: seq_len must divide.
    `names`: what to call the two numbers in the message (e.g. the config keys)."""
    if seq_len % tp:
        raise ConfigError(f"{names[0]}({seq_len}) is not divisible by {names[1]}({tp}), "
                        f"which sequence parallelism splits it over")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """vocab_size rounded up to a multiple of tp, so each rank owns an equal vocab slice."""
    return -(-vocab_size // tp) * tp


def vocab_padding_note(vocab_size: int, tp: int) -> str | None:
    """A line for the log when the vocab is padded, else None."""
    padded = padded_vocab(vocab_size, tp)
    if padded == vocab_size:
        return None
    return f"vocab_size({vocab_size}) padded to {padded} for tp({tp})"


@dataclass
class ParallelDims:
    """This rank's place in the tp x dp layout, with its groups (None where the size is 1)."""

    world_size: int = 1
    rank: int = 0
    tp: int = 1
    dp: int = 1
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    sequence_parallel: bool = False

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @classmethod
    def single(cls) -> "ParallelDims":
        """One process, no torch.distributed."""
        return cls()

    @classmethod
    def build(cls, world_size: int, rank: int, tp: int, dp: int = 0, sequence_parallel: bool = False,
              timeout=None) -> "ParallelDims":
        """Validate a layout given by hand (check_layout) and create its process groups (create)."""
        tp, dp = check_layout(world_size, tp, dp, sequence_parallel)
        return cls.create(world_size, rank, tp, dp, sequence_parallel, timeout)

    @classmethod
    def create(cls, world_size: int, rank: int, tp: int, dp: int, sequence_parallel: bool = False,
               timeout=None) -> "ParallelDims":
        """The process groups of a valid layout (a Job's: job.resolve checked it).

        Collective: dist.new_group must be called by every rank for every group in the same
        order, so each rank creates all TP groups and all DP groups and keeps its own.
        timeout: a datetime.timedelta for the groups' collectives (parallel.timeout_s); None
        keeps torch's default.
        """
        dims = cls(world_size, rank, tp, dp, sequence_parallel=sequence_parallel)
        if tp > 1:
            dims.tp_group = _mine([list(range(i * tp, (i + 1) * tp)) for i in range(dp)], rank, world_size, timeout)
        if dp > 1:
            dims.dp_group = _mine([list(range(j, world_size, tp)) for j in range(tp)], rank, world_size, timeout)
        return dims

    def new_side_group(self, timeout=None) -> dist.ProcessGroup | None:
        """A gloo group of every rank beside the training groups, for agreements that run on
        another thread (background saves): they never interleave with training's collectives
        and need no GPU stream. None without torch.distributed. Collective."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.new_group(backend="gloo", timeout=timeout)

    def new_self_group(self) -> dist.ProcessGroup:
        """A group of this rank alone (DeepSpeed asks for a group even where a size is 1).
        Collective: every rank creates every rank's group, in order."""
        groups = [dist.new_group([r]) for r in range(self.world_size)]
        return groups[self.rank]


def _mine(all_ranks: list[list[int]], rank: int, world_size: int, timeout=None) -> dist.ProcessGroup:
    """Create every group in all_ranks (all ranks must) and return the one holding `rank`."""
    if len(all_ranks) == 1 and len(all_ranks[0]) == world_size:
        return dist.group.WORLD  # the whole world: no need for another communicator
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine
