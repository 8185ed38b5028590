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


def _hostile_deepspeed_copy(deepspeed_runs, stage, tmp_path, marker):
    """A copy of the ZeRO-`stage` run whose every DeepSpeed file (deepspeed/*.pt) is hostile."""
    out, _ = deepspeed_runs[stage]
    run = tmp_path / "run"
    shutil.copytree(out, run)
    files = sorted((ckpt.latest_checkpoint(run) / "deepspeed").glob("*.pt"))
    assert len(files) == (3 if stage == 2 else 4)
    for f in files:
        write_hostile(f, marker)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_hostile_deepspeed_weights_are_refused_by_sample_and_export(stage, deepspeed_runs, tmp_path):
    """`bigtrain sample` and `export-hf` on a DeepSpeed run whose deepspeed/*.pt files are all
    hostile. ZeRO-1/2: the weights are DeepSpeed's mp_rank_00_model_states.pt (the manifest's
    tensor_files), read weights-only: refused in one line naming it, exit 2, nothing written.
    ZeRO-3: the weights are in bigtrain's rank files, so neither command opens a DeepSpeed file
    (both succeed). Nothing runs either way."""
    from tests.conftest import assert_user_error, run_cli

    marker = tmp_path / "ran"
    run = _hostile_deepspeed_copy(deepspeed_runs, stage, tmp_path, marker)
    sample = run_cli("sample", "--run", str(run), "--max-new-tokens", "3")
    export = run_cli("export-hf", "--run", str(run), "--out", str(tmp_path / "hf"))
    assert not marker.exists(), "the hostile pickle ran"
    if stage == 2:
        for r in (sample, export):
            assert_user_error(r, "mp_rank_00_model_states.pt", "refusing")
        assert not (tmp_path / "hf").exists()
    else:
        assert sample.returncode == 0 and export.returncode == 0, (sample.stderr[-2000:], export.stderr[-2000:])
        assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt", "ZeRO-3"])
def test_hostile_deepspeed_file_is_refused_when_resumed_under_ddp(name, deepspeed_runs, tiny_data, tmp_path):
    """A DeepSpeed ZeRO-2 checkpoint resumed under parallel.engine=ddp (one process) is read by
    bigtrain itself (checkpoint.reshard_deepspeed / ZeroFragments: the model states, then each dp
    rank's optimizer partition). Each of its files made hostile in turn: `bigtrain train` refuses
    it in one line naming it (exit 2) before any step, nothing runs. A ZeRO-3 checkpoint with
    every DeepSpeed file hostile is refused for its stage before any of them is opened."""
    from tests.conftest import assert_user_error, run_cli

    stage = 3 if name == "ZeRO-3" else 2
    out, _ = deepspeed_runs[stage]
    copy = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(ckpt.latest_checkpoint(out), copy)
    marker = tmp_path / "ran"
    if stage == 3:
        for f in (copy / "deepspeed").glob("*.pt"):
            write_hostile(f, marker)
    else:
        assert (copy / "deepspeed" / name).is_file()
        write_hostile(copy / "deepspeed" / name, marker)
    resumed = tmp_path / "resumed"
    r = run_cli("train", "--config", "configs/debug.yaml",
                *base(tiny_data, resumed, "train.steps=3", f"train.resume={copy}"))
    assert not marker.exists(), "the hostile pickle ran"
    if stage == 3:
        assert_user_error(r, "written by DeepSpeed ZeRO-3")
    else:
        assert_user_error(r, name, "refusing")
    assert not ckpt.list_checkpoints(resumed)  # refused before any step


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
    elif kind == "val.bin":
        # the pickle cut or zero-padded to the file's own size: its size agrees with meta.json, so
        # only the check of what the tokens are (ids below vocab_size) stands between it and training
        size = (data / "val.bin").stat().st_size
        (data / "val.bin").write_bytes(pickled[:size].ljust(size, b"\0"))
    elif kind == "wandb_id":
        (run / "wandb_id").write_bytes(pickled)
    elif kind == IMPORTED_TOKENIZER:  # `run` is the import-hf run directory here
        assert (run / "tokenizer.model").is_file()
        (run / "tokenizer.model").write_bytes(pickled)
    else:
        raise AssertionError(kind)


IMPORTED_TOKENIZER = "tokenizer.model of an import-hf run"


def _imported_run(run, tmp_path):
    """An import-hf run directory made from `run`'s export: it holds its own tokenizer.model
    (the model's, copied from the export) and its data.path is itself."""
    from bigtrain import hf

    hf.export_hf(run, tmp_path / "hf-src")
    return hf.import_hf(tmp_path / "hf-src", tmp_path / "imported")


READERS = {  # kind -> the commands that read it (training never opens the tokenizer; sampling never meta.json)
    "config.yaml": ["train-config"],
    "manifest.json": ["resume", "sample", "export-hf"],
    "rank file": ["resume", "sample", "export-hf"],
    "metrics.jsonl": ["resume"],
    "tokenizer.model": ["sample", "export-hf"],
    "meta.json": ["resume"],
    "train.bin": ["resume"],
    "val.bin": ["resume"],
    "wandb_id": ["resume-wandb"],  # read only when wandb is on
    # sample and export-hf load it (data.path is the run itself), train hashes it against the data's
    # tokenizer (job._with_vocab), prepare --tokenizer RUN_DIR encodes with it
    IMPORTED_TOKENIZER: ["sample", "export-hf", "train-imported", "prepare-tokenizer"],
}
NAMED = {"val.bin": "val.bin", "wandb_id": "wandb_id", IMPORTED_TOKENIZER: "imported/tokenizer.model"}
"""The file's name that the one line must hold (the kinds added after the first ones)."""


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
    target = _imported_run(run, tmp_path) if kind == IMPORTED_TOKENIZER else run
    marker = tmp_path / "ran"
    _replace(kind, target, data, marker)
    for command in READERS[kind]:
        if command == "train-config":
            r = run_cli("train", "--config", str(run / "config.yaml"), f"train.out_dir={tmp_path / 'other'}")
        elif command == "resume":
            r = run_cli("train", "--config", "configs/debug.yaml", *args, "train.steps=3", "train.resume=auto")
        elif command == "resume-wandb":
            r = run_cli("train", "--config", "configs/debug.yaml", *args, "train.steps=3", "train.resume=auto",
                        "log.wandb.mode=offline")
        elif command == "train-imported":  # continue pretraining the imported model on the data
            r = run_cli("train", "--config", str(target / "config.yaml"), f"data.path={data}", "train.steps=1",
                        "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4",
                        "log.wandb.mode=disabled", "log.progress=false")
        elif command == "prepare-tokenizer":
            (tmp_path / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 50)
            r = run_cli("prepare", "--corpus", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "prepared"),
                        "--tokenizer", str(target))
        elif command == "sample":
            r = run_cli("sample", "--run", str(target), "--max-new-tokens", "3")
        else:
            r = run_cli("export-hf", "--run", str(target), "--out", str(tmp_path / f"hf-{command}"))
        assert not marker.exists(), (kind, command)
        if kind == "metrics.jsonl" and r.returncode == 0:
            continue  # an unreadable log is not needed to resume: its records are dropped, training goes on
        if kind == "wandb_id":  # wandb is optional: a bad id file costs the run its wandb log, not the run
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
            warnings = [line for line in r.stderr.splitlines() if NAMED[kind] in line]
            assert len(warnings) == 1 and warnings[0].startswith("warning: wandb"), r.stderr[-2000:]
            assert ckpt.latest_checkpoint(run).name == "step_00000003"  # the run went on and saved
            continue
        assert_user_error(r, *([NAMED[kind]] if kind in NAMED else []))


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
