"""A save that fails (full disk, EIO, read-only) cleans up after itself on every rank, keeps the
previous checkpoints and ends the run with one line; train.resume=auto then continues bitwise.
And a manifest that disagrees with its directory is refused in one line."""

import errno
import json
import os
import shutil
import subprocess

import pytest
import torch

from bigtrain import checkpoint as ckpt
from bigtrain.config import load_config
from bigtrain.errors import UserError
from bigtrain.trainer import Trainer
from tests.conftest import TINY, assert_user_error, run_cli
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow

# 8 steps with a checkpoint every 3 and dropout on (RNG state matters): the failure hits the
# step-6 save, so resume restarts from step 3.
RUN = ["train.steps=8", "train.save_every=3", "model.dropout=0.1"]


def args(data, out, *extra):
    return [*TINY, f"data.path={data}", f"train.out_dir={out}", *RUN, *extra]


def train(rank, world, overrides, fail=None):
    """One rank of a run; `fail(path)` -> an OSError to raise instead of writing that file."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if fail is not None:
        real = ckpt.write_file

        def write_file(path, obj):
            error = fail(rank, path)
            if error is not None:
                raise error
            real(path, obj)

        ckpt.write_file = write_file  # forked rank (or restored by the caller): patch freely
    try:
        return [r["loss"] for r in Trainer(load_config("configs/debug.yaml", overrides)).train()]
    except UserError as e:
        return f"UserError: {e}"
    finally:
        if fail is not None:
            ckpt.write_file = real


def logged(out) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})
    return {r["step"]: r["loss"] for r in records}


def leftovers(out) -> list[str]:
    return sorted(p.name for p in ckpt.checkpoint_root(out).iterdir() if not ckpt.STEP_RE.match(p.name))


def enospc_at_step(step, ranks=(0,)):
    def fail(rank, path):
        if rank in ranks and path.parent.name == f".tmp_step_{step:08d}":
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return None
    return fail


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """Losses of uninterrupted runs: single process and dp=2."""
    single = train(0, 1, args(tiny_data, tmp_path_factory.mktemp("ref1") / "run"))
    dp2 = run_ranks(train, 2, args(tiny_data, tmp_path_factory.mktemp("ref2") / "run", "parallel.dp=2"),
                    timeout=240)[0]
    assert len(single) == len(dp2) == 8
    return {"single": dict(enumerate(single, 1)), "dp2": dict(enumerate(dp2, 1))}


def test_enospc_cleans_up_and_resume_is_exact(tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    message = train(0, 1, args(tiny_data, out), fail=enospc_at_step(6))
    assert message.startswith("UserError: could not save the checkpoint of step 6: rank 0: No space left on device")
    assert "step_00000003" in message and "\n" not in message
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"] and leftovers(out) == []
    train(0, 1, args(tiny_data, out, "train.resume=auto"))
    assert logged(out) == reference["single"]  # bitwise


def test_manifest_write_failure_cleans_up(tiny_data, tmp_path, monkeypatch):
    """The last phase (rank 0's manifest and rename) failing leaves no partial directory either."""
    out = tmp_path / "run"
    real = ckpt.write_json

    def write_json(path, obj):
        if path.name == "manifest.json" and obj.get("step") == 6:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path, obj)

    monkeypatch.setattr(ckpt, "write_json", write_json)
    message = train(0, 1, args(tiny_data, out))
    assert "step 6: rank 0: Input/output error" in message, message
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"] and leftovers(out) == []


def test_only_rank1_fails_every_rank_stops_and_resume_is_exact(tiny_data, tmp_path, reference):
    """dp=2, rank 1 cannot write: rank 0 does not hang, both ranks end with the same line naming
    rank 1, nothing partial is left, and the dp=2 resume continues bitwise."""
    out = tmp_path / "run"
    extra = ["parallel.dp=2"]
    results = run_ranks(train, 2, args(tiny_data, out, *extra), enospc_at_step(6, ranks=(1,)), timeout=240)
    assert results[0] == results[1], results
    assert "step 6: rank 1: No space left on device" in results[0] and "step_00000003" in results[0]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"] and leftovers(out) == []
    run_ranks(train, 2, args(tiny_data, out, *extra, "train.resume=auto"), timeout=240)
    assert logged(out) == reference["dp2"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for the step-3 checkpoint (~1.7 MB with metrics) but not a second one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_real_full_disk(tiny_data, small_disk, reference):
    """A real full disk through the CLI: exit 2 with one line, the disk no fuller than before
    the failed save; after space is freed (a bigger tmpfs) train.resume=auto continues bitwise."""
    out = small_disk / "run"
    cli = ["train", "--config", "configs/debug.yaml", *args(tiny_data, out, "checkpoint.keep_last=1")]
    line = assert_user_error(run_cli(*cli), "could not save the checkpoint of step 6", "No space left on device",
                             "step_00000003", "train.resume=auto")
    assert "rank00000.pt" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"] and leftovers(out) == []
    assert shutil.disk_usage(small_disk).free > 0
    subprocess.run(["mount", "-o", "remount,size=8M", str(small_disk)], check=True)
    run_cli(*cli, "train.resume=auto", check=True)
    assert logged(out) == reference["single"]


# --------------------------------------------------------------------------------------------
# Manifests that disagree with their directory


@pytest.fixture(scope="module")
def saved(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    train(0, 1, [*TINY, f"data.path={tiny_data}", f"train.out_dir={out}", "train.steps=2"])
    return ckpt.latest_checkpoint(out)


def _broken(saved, tmp_path, name, change):
    copy = tmp_path / "checkpoints" / name
    shutil.copytree(saved, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _set(**fields):
    return lambda m, d: m.update(fields)


BROKEN = {
    "missing rank file": ("step_00000002", _set(world_size=2, dp=2), "no file for rank(s) [1]"),
    "step is a string": ("step_00000002", _set(step="2"), "field 'step' is '2', expected an integer"),
    "step is a bool": ("step_00000002", _set(step=True), "field 'step' is True"),
    "step mismatch": ("step_00000005", lambda m, d: None, "step 2 does not match the directory step_00000005"),
    "tp*dp": ("step_00000002", _set(tp=2), "tp(2) * dp(1) != world_size(1)"),
    "config not an object": ("step_00000002", _set(config=[1]), "field 'config' is [1], expected an object"),
    "not an object": ("step_00000002", lambda m, d: m.clear() or m.update(x=1), "field 'step' is None"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_inconsistent_manifest_is_refused(case, saved, tmp_path):
    name, change, fragment = BROKEN[case]
    copy = _broken(saved, tmp_path, name, change)
    with pytest.raises(UserError, match="manifest") as e:
        ckpt.read_manifest(copy)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_manifest_without_data_position_is_not_resumed(tiny_data, saved, tmp_path):
    copy = _broken(saved, tmp_path, "step_00000002", lambda m, d: m.pop("data"))
    ckpt.read_manifest(copy)  # export-hf and sample need only the weights
    r = run_cli("train", "--config", "configs/debug.yaml", *TINY, f"data.path={tiny_data}",
                f"train.out_dir={tmp_path / 'run'}", "train.steps=3", f"train.resume={copy}")
    assert_user_error(r, "field 'data'", "cannot be resumed")


def test_inconsistent_manifest_on_resume_is_one_line(tiny_data, saved, tmp_path):
    copy = _broken(saved, tmp_path, "step_00000002", _set(world_size=4, dp=4))
    r = run_cli("train", "--config", "configs/debug.yaml", *TINY, f"data.path={tiny_data}",
                f"train.out_dir={tmp_path / 'run'}", "train.steps=3", f"train.resume={copy}")
    assert_user_error(r, "no file for rank(s) [1, 2, 3]")


def test_torch_save_failure_keeps_the_os_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as an opaque RuntimeError; write_file raises the OSError."""
    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    monkeypatch.setattr(ckpt, "_RecordingWriter", lambda f: _Recording(Full(f)))
    with pytest.raises(OSError) as e:
        ckpt.write_file(tmp_path / "x.pt", {"a": torch.zeros(10)})
    assert e.value.errno == errno.ENOSPC


class _Recording(ckpt._RecordingWriter):
    pass
