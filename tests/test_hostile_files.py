"""Files in a run directory that try to execute code are refused, whatever their kind.

A hostile file here is a real torch file whose pickle calls `os.system` to create a marker file:
loading it with plain `torch.load` (or DeepSpeed's loader, which uses weights_only=False) would
create the marker. Each test checks the marker stays absent and the load ends in a one-line
UserError that names the file.
"""

import os
import shutil

import pytest
import torch

from bigtrain import checkpoint as ckpt
from bigtrain.errors import UserError
from tests.multiproc import run_ranks
from tests.test_distributed_train import base, train_zero3_partitioned
from tests.test_distributed_train import train as train_ranks


class _RunsCode:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_hostile(path, marker) -> None:
    """Replace `path` by a torch file that looks like a checkpoint but runs `touch marker`."""
    torch.save({"module": {"w": torch.zeros(2)}, "optimizer_state_dict": _RunsCode(f"touch {marker}")}, path)


def _resume_or_error(rank, world, overrides, zero3):
    fn = train_zero3_partitioned if zero3 else train_ranks
    try:
        fn(rank, world, overrides)
        return "resumed"
    except UserError as e:
        return str(e)


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_data, tmp_path_factory):
    """ZeRO-2 and ZeRO-3 runs on dp=2 with a checkpoint at step 2."""
    runs = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        extra = ["parallel.dp=2", "parallel.engine=deepspeed", f"parallel.zero_stage={stage}",
                 "train.steps=2", "train.save_every=2"]
        fn = train_zero3_partitioned if stage == 3 else train_ranks
        run_ranks(fn, 2, base(tiny_data, out, *extra), timeout=240)
        runs[stage] = (out, extra)
    return runs


def test_safe_engine_refuses_code_and_loads_deepspeed_files(deepspeed_runs, tmp_path):
    """The checkpoint engine bigtrain gives DeepSpeed loads DeepSpeed's own files (with the three
    DeepSpeed classes they hold) and refuses a file that would run code."""
    from bigtrain.safe_load import deepspeed_checkpoint_engine

    engine = deepspeed_checkpoint_engine(None)
    for stage, (out, _) in deepspeed_runs.items():
        files = sorted((ckpt.latest_checkpoint(out) / "deepspeed").rglob("*.pt"))
        assert len(files) == (3 if stage == 2 else 4)
        for f in files:
            state = engine.load(str(f), map_location="cpu")
            assert isinstance(state, dict) and state
    marker = tmp_path / "ran"
    write_hostile(tmp_path / "evil.pt", marker)
    with pytest.raises(UserError, match="evil.pt"):
        engine.load(str(tmp_path / "evil.pt"), map_location="cpu")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_hostile_deepspeed_file_is_refused_on_resume(stage, deepspeed_runs, tiny_data, tmp_path):
    """Every file of a DeepSpeed checkpoint (model states, each rank's ZeRO partition) replaced
    in turn by a hostile pickle: the resume refuses it on every rank, nothing runs."""
    out, extra = deepspeed_runs[stage]
    step = ckpt.latest_checkpoint(out)
    names = sorted(p.name for p in (step / "deepspeed").glob("*.pt"))
    for name in names:
        copy = tmp_path / name / "step_00000002"
        shutil.copytree(step, copy)
        marker = tmp_path / f"ran_{name}"
        write_hostile(copy / "deepspeed" / name, marker)
        extra_resume = [e for e in extra if not e.startswith("train.steps")] + ["train.steps=3",
                                                                                f"train.resume={copy}"]
        results = run_ranks(_resume_or_error, 2, base(tiny_data, tmp_path / name / "run", *extra_resume),
                            stage == 3, timeout=240)
        assert not marker.exists(), f"{name}: the hostile pickle ran"
        for r in results:
            assert "refusing" in r and name in r and "system" in r, (name, r[-300:])


def test_hostile_rank_file_is_refused(tiny_data, tmp_path):
    """bigtrain's own rank file with a hostile pickle: refused, nothing runs."""
    from bigtrain.config import load_config
    from bigtrain.trainer import Trainer
    from tests.conftest import TINY

    out = tmp_path / "run"
    args = [*TINY, f"data.path={tiny_data}", f"train.out_dir={out}", "train.steps=2", "train.save_every=2"]
    Trainer(load_config("configs/debug.yaml", args)).train()
    step = ckpt.latest_checkpoint(out)
    marker = tmp_path / "ran"
    write_hostile(step / "rank00000.pt", marker)
    with pytest.raises(UserError, match="rank00000.pt"):
        Trainer(load_config("configs/debug.yaml", [*args, "train.steps=3", "train.resume=auto"]))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Every kind of file, through the command that reads it


def _pickle_bytes(marker) -> bytes:
    import io

    buf = io.BytesIO()
    write_hostile(buf, marker)
    return buf.getvalue()


YAML_PAYLOAD = "model: !!python/object/apply:os.system ['touch {marker}']\n"


def _replace(kind: str, run, data, marker) -> None:
    """Put a payload that would create `marker` into one kind of file of the run/data dirs."""
    step = ckpt.latest_checkpoint(run)
    pickled = _pickle_bytes(marker)
    if kind == "config.yaml":
        (run / "config.yaml").write_text(YAML_PAYLOAD.format(marker=marker))
    elif kind == "manifest.json":
        (step / "manifest.json").write_bytes(pickled)
    elif kind == "rank file":
        (step / "rank00000.pt").write_bytes(pickled)
    elif kind == "metrics.jsonl":
        (run / "metrics.jsonl").write_bytes(pickled)
    elif kind == "tokenizer.model":
        (data / "tokenizer.model").write_bytes(pickled)
    elif kind == "meta.json":
        (data / "meta.json").write_bytes(pickled)
    elif kind == "train.bin":
        (data / "train.bin").write_bytes(pickled)
    else:
        raise AssertionError(kind)


READERS = {  # kind -> the commands that read it (training never opens the tokenizer; sampling never meta.json)
    "config.yaml": ["train-config"],
    "manifest.json": ["resume", "sample", "export-hf"],
    "rank file": ["resume", "sample", "export-hf"],
    "metrics.jsonl": ["resume"],
    "tokenizer.model": ["sample", "export-hf"],
    "meta.json": ["resume"],
    "train.bin": ["resume"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(READERS))
def test_hostile_payload_in_any_file_runs_nothing(kind, tiny_data, tmp_path):
    """A code-running pickle (or YAML tag) in each kind of file a run or data directory holds:
    every command that reads it refuses it in one line (exit 2) or ignores it, and nothing runs."""
    from tests.conftest import TINY, assert_user_error, run_cli

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = tmp_path / "run"
    args = [*TINY, f"data.path={data}", f"train.out_dir={run}", "train.steps=2", "train.save_every=2"]
    run_cli("train", "--config", "configs/debug.yaml", *args, check=True)
    marker = tmp_path / "ran"
    _replace(kind, run, data, marker)
    for command in READERS[kind]:
        if command == "train-config":
            r = run_cli("train", "--config", str(run / "config.yaml"), f"train.out_dir={tmp_path / 'other'}")
        elif command == "resume":
            r = run_cli("train", "--config", "configs/debug.yaml", *args, "train.steps=3", "train.resume=auto")
        elif command == "sample":
            r = run_cli("sample", "--run", str(run), "--max-new-tokens", "3")
        else:
            r = run_cli("export-hf", "--run", str(run), "--out", str(tmp_path / f"hf-{command}"))
        assert not marker.exists(), (kind, command)
        if kind == "metrics.jsonl" and r.returncode == 0:
            continue  # an unreadable log is not needed to resume: its records are dropped, training goes on
        assert_user_error(r)


def test_hostile_pytorch_model_bin_is_refused_by_import_hf(tmp_path, capsys):
    """A Hugging Face directory whose pytorch_model.bin runs code: import-hf refuses it in one
    line and writes nothing."""
    pytest.importorskip("transformers")
    from bigtrain.cli import main
    from tests.test_hf import random_hf

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    random_hf(gqa=True, tied=False).config.save_pretrained(hf_dir)
    marker = tmp_path / "ran"
    write_hostile(hf_dir / "pytorch_model.bin", marker)
    assert main(["import-hf", "--model", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytorch_model.bin" in err[0], err
    assert not marker.exists() and not (tmp_path / "run").exists()
