"""Issue 9, items 3, 4, 6 and 7: nothing bigtrain reads can lie to it or cost a user their run.

Each item is tested on its whole class, with generated cases: every float key with nan/inf,
every int key beyond 64 bits, every meta.json field with every wrong type, every output path
with every way of being unwritable, every HF config field... Each bad input must end in one
line (UserError; exit code 2 and no traceback from the CLI), and never overwrite or delete a
file bigtrain did not create.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import typing
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.cli import main
from bigtrain.config import Config, load_config, parse_bytes
from bigtrain.data.dataset import META_KEYS, TokenDataset, load_meta
from bigtrain.errors import ConfigError, UserError
from tests.conftest import ROOT, TINY, assert_user_error, run_cli

# --------------------------------------------------------------------------------------------
# Helpers


def leaf_keys(kind: type, cls=Config, prefix: str = "") -> list[str]:
    """Every config key whose declared type is `kind` (float, int, str...)."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += leaf_keys(kind, t, f"{prefix}{f.name}.")
        elif t is kind:
            keys.append(prefix + f.name)
    return keys


def one_line(capsys, argv, *fragments) -> str:
    """main(argv) ends with a one-line user error holding every fragment (in-process: fast)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bigtrain: error"), err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


def tree(path: Path) -> dict:
    """Every file below path with its bytes: what must survive a refused command unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


FLOAT_KEYS, INT_KEYS, SIZE_KEYS = leaf_keys(float), leaf_keys(int), ["recompute.offload_min_size", "hardware.gpu_memory"]
# A path that cannot be created even by root: /proc refuses new entries.
UNWRITABLE = "/proc/bigtrain-hostile/out"


# --------------------------------------------------------------------------------------------
# Item 6: values that crashed or meant nothing


def test_the_key_lists_are_complete():
    assert {"optim.lr", "model.rope_theta", "hardware.mfu", "parallel.timeout_s"} <= set(FLOAT_KEYS)
    assert {"train.seed", "model.dim", "train.steps"} <= set(INT_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite(key, value):
    with pytest.raises(ConfigError, match=f"{key}=.* must be a finite number"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_from_yaml(key, tmp_path):
    section, name = key.rsplit(".", 1)
    f = tmp_path / "c.yaml"
    nested = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section.split(".")))
    f.write_text(nested + "  " * len(section.split(".")) + f"{name}: .nan\n")
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(f)


@pytest.mark.parametrize("key", FLOAT_KEYS + INT_KEYS)
def test_every_numeric_key_refuses_negative(key):
    """No numeric key has a meaning below zero (dp=0 and the like mean 'infer', never -1)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=-1"])
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [2**63, 2**64, 10**30, -(2**63) - 1])
@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_key_fits_in_64_bits(key, value):
    with pytest.raises(ConfigError, match=f"{key}=.* does not fit in 64 bits"):
        load_config(None, [f"{key}={value}"])


def test_seed_range():
    for bad in ("-1", str(2**63), str(2**64), str(2**70)):
        with pytest.raises(ConfigError, match="train.seed"):
            load_config(None, [f"train.seed={bad}"])
    assert load_config(None, [f"train.seed={2**63 - 1}"]).train.seed == 2**63 - 1
    assert load_config(None, ["train.seed=0"]).train.seed == 0


@pytest.mark.parametrize("override", ["recompute.modules=[norm", "recompute.modules=[norm, [", "recompute.modules=[[1]]",
                                      "recompute.modules=[{a: 1}]", "recompute.modules=[!!python/none x]"])
def test_malformed_lists_are_one_line_errors(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert "recompute.modules" in str(e.value) and "\n" not in str(e.value)


BAD_SIZES = ["1.2.3MiB", "-1GiB", "1e400B", "1e3GiB", "", ".", "GiB", "iB", "1iB", "1 GiBs", "nanGiB", "infB",
             "0x10MiB", "1,5GiB", "9" * 400 + "GiB", "99999999999TiB", "1 2 GiB"]


@pytest.mark.parametrize("text", BAD_SIZES)
def test_malformed_sizes_are_one_line_errors(text):
    with pytest.raises(ConfigError) as e:
        parse_bytes(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", SIZE_KEYS)
@pytest.mark.parametrize("text", ["1.2.3MiB", "-1GiB", "1e400B"])
def test_every_size_key_names_itself(key, text):
    with pytest.raises(ConfigError, match=f"{key}="):
        load_config(None, [f"{key}={text}"])
    with pytest.raises(ConfigError, match="recompute.memory_budget="):
        load_config(None, ["recompute.granularity=auto", f"recompute.memory_budget={text}"])


def test_good_sizes_are_exact():
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes(".5KiB") == 512 and parse_bytes("0") == 0
    assert parse_bytes("70GiB") == 70 * 2**30 and parse_bytes("80 GB") == 80 * 10**9 and parse_bytes("3.") == 3
    assert parse_bytes("0.1GB") == 10**8  # exact decimal, no float rounding


def test_config_files_that_are_not_text(tmp_path, capsys):
    cases = {"latin1.yaml": "optim:\n  lr: 3e-4  # caf\xe9\n".encode("latin-1"), "binary.yaml": bytes(range(256)),
             "utf16.yaml": "train:\n  steps: 3\n".encode("utf-16")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line(capsys, ["config", "--config", str(tmp_path / name)], name, "UTF-8")
    (tmp_path / "dir.yaml").mkdir()
    one_line(capsys, ["config", "--config", str(tmp_path / "dir.yaml")], "dir.yaml")
    assert_user_error(run_cli("train", "--config", str(tmp_path / "latin1.yaml")), "latin1.yaml", "not UTF-8")
    assert_user_error(run_cli("train", "--config", "configs/debug.yaml", "optim.lr=nan"), "optim.lr", "finite")


@pytest.mark.parametrize("argv, fragments", [
    (["--temperature", "nan"], ["--temperature", ">= 0"]),
    (["--temperature", "inf"], ["--temperature"]),
    (["--temperature", "-0.5"], ["--temperature"]),
    (["--top-k", "-1"], ["--top-k", ">= 0"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", str(2**64)], ["--seed"]),
])
def test_sample_arguments(argv, fragments, tmp_path, capsys):
    # checked before the run directory is even looked at
    one_line(capsys, ["sample", "--run", str(tmp_path / "none"), *argv], *fragments)


def test_plan_plot_paths(tmp_path, capsys):
    plan = ["plan", "--config", "configs/debug.yaml", "--device", "cpu"]
    one_line(capsys, [*plan, "--plot", str(tmp_path / "missing" / "m.png")], "missing", "does not exist")
    one_line(capsys, [*plan, "--plot", str(tmp_path)], "is a directory")
    one_line(capsys, [*plan, "--plot", str(tmp_path / "m.xyz")], "image format", ".png")
    (tmp_path / "f").write_text("x")
    one_line(capsys, [*plan, "--plot", str(tmp_path / "f" / "m.png")], "does not exist")


# --------------------------------------------------------------------------------------------
# Item 6: output paths checked up front


def _unwritable_outs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Each way an output directory can be unusable -> (path, fragment of the error)."""
    (tmp_path / "a_file").write_text("mine")
    return {"is a file": (str(tmp_path / "a_file"), "is a file"),
            "below a file": (str(tmp_path / "a_file" / "sub" / "out"), "is a file, not a directory"),
            "not writable": (UNWRITABLE, "not writable")}


@pytest.mark.parametrize("how", ["is a file", "below a file", "not writable"])
def test_every_output_path_is_checked_up_front(how, tiny_data, tmp_path, capsys):
    path, fragment = _unwritable_outs(tmp_path)[how]
    (tmp_path / "hf").mkdir()  # import-hf reaches its --out check before reading weights
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
         "vocab_size": 64, "intermediate_size": 48}))
    before = (tmp_path / "a_file").read_text()
    commands = {
        "train.out_dir": ["train", "--config", "configs/debug.yaml", *TINY, f"data.path={tiny_data}",
                          f"train.out_dir={path}"],
        "prepare --out": ["prepare", "--corpus", str(tiny_data.parent / "corpus.txt"), "--out", path],
        "export-hf --out": ["export-hf", "--run", str(tmp_path / "norun"), "--out", path],
        "import-hf --out": ["import-hf", "--model", str(tmp_path / "hf"), "--out", path],
    }
    for name, argv in commands.items():
        line = one_line(capsys, argv, fragment)
        assert path in line, (name, line)
    assert (tmp_path / "a_file").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bigtrain")] == []  # the probe is gone


def test_unwritable_train_out_dir_from_the_shell(tiny_data):
    r = run_cli("train", "--config", "configs/debug.yaml", *TINY, f"data.path={tiny_data}",
                f"train.out_dir={UNWRITABLE}")
    assert_user_error(r, "train.out_dir", "not writable")


# --------------------------------------------------------------------------------------------
# Item 4: token files and meta.json that lie


def copy_data(tiny_data: Path, dest: Path, **meta_changes) -> Path:
    shutil.copytree(tiny_data, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta.update(meta_changes)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


WRONG_TYPES = ["400", 400.0, 400.5, True, None, [400], {"n": 400}]


@pytest.mark.parametrize("key", META_KEYS)
def test_every_meta_field_has_its_type_checked(key, tiny_data, tmp_path):
    for i, wrong in enumerate(WRONG_TYPES):
        d = copy_data(tiny_data, tmp_path / f"d{i}", **{key: wrong})
        with pytest.raises(UserError) as e:
            TokenDataset(d, "train")
        assert key in str(e.value) and "\n" not in str(e.value), (wrong, str(e.value))


@pytest.mark.parametrize("dtype", ["float16", "int16", "float32", "int32", "int64", "float64", "uint7", "bool"])
def test_token_dtype_must_be_an_unsigned_int(dtype, tiny_data, tmp_path):
    d = copy_data(tiny_data, tmp_path / "d", dtype=dtype)
    with pytest.raises(UserError, match="dtype.*uint8, uint16, uint32, uint64"):
        load_meta(d)


def test_relabelled_dtypes_with_another_item_size_are_refused(tiny_data, tmp_path):
    for dtype in ("uint8", "uint32", "uint64"):
        d = copy_data(tiny_data, tmp_path / dtype, dtype=dtype)
        with pytest.raises(UserError, match="train.bin|does not fit in dtype uint8"):
            TokenDataset(d, "train")


@pytest.mark.parametrize("lie", ["truncated by one byte", "one token short", "one token more", "counts swapped"])
def test_file_sizes_must_match_meta(lie, tiny_data, tmp_path):
    d = copy_data(tiny_data, tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    train = d / "train.bin"
    if lie == "truncated by one byte":
        train.write_bytes(train.read_bytes()[:-1])
        match = "not a whole number"
    elif lie == "one token short":
        train.write_bytes(train.read_bytes()[:-2])
        match = "meta.json says"
    elif lie == "one token more":
        train.write_bytes(train.read_bytes() + b"\0\0")
        match = "meta.json says"
    else:
        meta["train_tokens"], meta["val_tokens"] = meta["val_tokens"], meta["train_tokens"]
        (d / "meta.json").write_text(json.dumps(meta))
        match = "meta.json says"
    with pytest.raises(UserError, match=match):
        TokenDataset(d, "train")


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_token_ids_must_be_below_vocab_size(split, where, tiny_data, tmp_path, monkeypatch):
    """Wherever the bad id is (small scan chunks: the chunk boundaries are crossed too)."""
    from bigtrain.data import dataset

    monkeypatch.setattr(dataset, "SCAN_CHUNK", 1000)
    d = copy_data(tiny_data, tmp_path / "d")
    f = d / f"{split}.bin"
    ids = np.fromfile(f, dtype=np.uint16)
    ids[{"first": 0, "middle": len(ids) // 2, "last": -1}[where]] = 400  # vocab_size is 400
    ids.tofile(f)
    with pytest.raises(UserError, match=f"{split}.bin holds token id 400 but meta.json says vocab_size=400"):
        TokenDataset(d, split)
    assert len(TokenDataset(tiny_data, split)) > 0  # the honest one opens


def test_lying_meta_is_one_line_from_the_cli(tiny_data, tmp_path):
    """The issue's two cases: a vocab_size below the real ids (was an IndexError traceback) and a
    float16 dtype of the same item size (trained silently on garbage)."""
    ids = np.fromfile(tiny_data / "train.bin", dtype=np.uint16)
    small = copy_data(tiny_data, tmp_path / "small", vocab_size=int(ids.max()))
    f16 = copy_data(tiny_data, tmp_path / "f16", dtype="float16")
    for d, fragment in ((small, "holds token id"), (f16, "float16")):
        r = run_cli("train", "--config", "configs/debug.yaml", *TINY, f"data.path={d}",
                    f"train.out_dir={tmp_path / 'run'}", "train.steps=1")
        assert_user_error(r, fragment)


# --------------------------------------------------------------------------------------------
# Item 4: Hugging Face files that lie

HF_GOOD = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "vocab_size": 101, "intermediate_size": 48, "max_position_embeddings": 32,
           "rms_norm_eps": 1e-6, "rope_theta": 1000.0, "tie_word_embeddings": False, "attention_bias": False,
           "mlp_bias": False, "hidden_act": "silu", "initializer_range": 0.02, "attention_dropout": 0.0,
           "head_dim": 8}
HF_INTS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
           "intermediate_size", "max_position_embeddings", "head_dim"]
HF_FLOATS = ["rms_norm_eps", "rope_theta", "initializer_range", "attention_dropout"]
HF_BOOLS = ["tie_word_embeddings", "attention_bias", "mlp_bias"]
HF_CASES = ([(k, v) for k in HF_INTS for v in ("32", 32.5, True, -4, 0, [32])]
            + [(k, v) for k in HF_FLOATS for v in ("1e-6", True, float("nan"), float("inf"), [1.0])]
            + [(k, v) for k in HF_BOOLS for v in ("false", 0, 1, "true", None.__class__.__name__)]
            + [("hidden_act", 1), ("rope_parameters", "default"), ("rope_scaling", [1])])


@pytest.mark.parametrize("key, value", HF_CASES, ids=[f"{k}={v!r}" for k, v in HF_CASES])
def test_every_hf_config_field_has_its_type_checked(key, value):
    from bigtrain.hf import model_config_from_hf

    model_config_from_hf(HF_GOOD, "m")  # the good one imports
    with pytest.raises(UserError) as e:
        model_config_from_hf({**HF_GOOD, key: value}, "m")
    assert key in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("value", [[1, 2], "llama", 3, None])
def test_hf_config_that_is_not_an_object(value):
    from bigtrain.hf import model_config_from_hf

    with pytest.raises(UserError, match="not an object|model"):
        model_config_from_hf(value, "m")


def _hf_dir(tmp_path: Path, name: str = "hf") -> Path:
    """A tiny Llama directory in transformers' format, sharded over two safetensors files."""
    from safetensors.torch import save_file

    from bigtrain.hf import model_config_from_hf, to_hf_state
    from bigtrain.model import build_model, init_weights

    d = tmp_path / name
    d.mkdir()
    cfg = model_config_from_hf(HF_GOOD, "m")
    state = to_hf_state({n: p.detach() for n, p in init_weights(build_model(cfg), seed=0).named_parameters()}, cfg)
    keys = sorted(state)
    parts = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for fname, ks in parts.items():
        save_file({k: state[k].contiguous() for k in ks}, str(d / fname))
    (d / "config.json").write_text(json.dumps(HF_GOOD))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _set_index(d: Path, change) -> None:
    f = d / "model.safetensors.index.json"
    index = json.loads(f.read_text())
    change(index["weight_map"])
    f.write_text(json.dumps(index))


def test_sharded_hf_directory_imports(tmp_path):
    from bigtrain import hf

    out = hf.import_hf(_hf_dir(tmp_path), tmp_path / "run")
    assert (out / "config.yaml").is_file() and (out / "checkpoints").is_dir()


def test_hf_index_entries_stay_inside_the_directory(tmp_path):
    from bigtrain import hf

    secret = tmp_path / "outside.safetensors"
    shutil.copyfile(_hf_dir(tmp_path, "src") / "a.safetensors", secret)
    escapes = ["../outside.safetensors", str(secret), "sub/../../outside.safetensors", "link.safetensors"]
    for i, target in enumerate(escapes):
        d = _hf_dir(tmp_path, f"hf{i}")
        (d / "link.safetensors").symlink_to(secret)
        _set_index(d, lambda m: m.update({k: target for k, v in m.items() if v == "a.safetensors"}))
        with pytest.raises(UserError, match="outside the model directory"):
            hf.import_hf(d, tmp_path / f"run{i}")
        assert not (tmp_path / f"run{i}").exists()


@pytest.mark.parametrize("lie", ["not a dict", "file is a number", "wrong file", "nowhere", "absent weight",
                                 "duplicate", "int weights"])
def test_hf_index_must_describe_the_files(lie, tmp_path):
    from safetensors.torch import load_file, save_file

    from bigtrain import hf

    d = _hf_dir(tmp_path)
    first_a = sorted(load_file(str(d / "a.safetensors")))[0]
    if lie == "not a dict":
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    elif lie == "file is a number":
        _set_index(d, lambda m: m.update({first_a: 3}))
    elif lie == "wrong file":
        _set_index(d, lambda m: m.update({first_a: "b.safetensors"}))
    elif lie == "nowhere":
        _set_index(d, lambda m: m.pop(first_a))
    elif lie == "absent weight":
        _set_index(d, lambda m: m.update({"model.extra.weight": "a.safetensors"}))
    elif lie == "duplicate":
        b = load_file(str(d / "b.safetensors"))
        save_file({**b, first_a: load_file(str(d / "a.safetensors"))[first_a]}, str(d / "b.safetensors"))
    else:
        a = load_file(str(d / "a.safetensors"))
        save_file({k: v.to(torch.int32) for k, v in a.items()}, str(d / "a.safetensors"))
    with pytest.raises(UserError) as e:
        hf.import_hf(d, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Item 3: import-hf and export-hf never overwrite or delete what is not theirs


@pytest.mark.parametrize("existing", [["config.yaml"], ["tokenizer.model"], ["config.yaml", "tokenizer.model"],
                                      ["notes.txt"], ["sub/deep.txt"], ["file"]])
def test_import_hf_never_writes_into_a_non_empty_out(existing, tmp_path, capsys):
    d = _hf_dir(tmp_path)
    shutil.copyfile(d / "a.safetensors", d / "tokenizer.model")  # the model has a "tokenizer" to copy
    out = tmp_path / "out"
    if existing == ["file"]:
        out.write_text("my file")
        before = out.read_bytes()
    else:
        for name in existing:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(f"the user's {name}")
        before = tree(out)
    one_line(capsys, ["import-hf", "--model", str(d), "--out", str(out)], str(out))
    assert (out.read_bytes() if existing == ["file"] else tree(out)) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_import_hf_into_an_empty_directory(tmp_path):
    from bigtrain import hf

    (tmp_path / "out").mkdir()
    hf.import_hf(_hf_dir(tmp_path), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints", "config.yaml"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _run_to_export(tmp_path: Path) -> Path:
    from bigtrain import hf

    return hf.import_hf(_hf_dir(tmp_path, "src"), tmp_path / "run")


def test_export_hf_keeps_a_users_tmp_sibling(tmp_path):
    """The old code deleted `.NAME.tmp` next to --out; a user's directory of that name survives."""
    from bigtrain import hf

    run = _run_to_export(tmp_path)
    for name in (".hf.tmp", ".hf.tmpx", ".hf.12345.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious.txt").write_text("mine")
    hf.export_hf(run, tmp_path / "hf_out")
    hf.export_hf(run, tmp_path / "hf")
    for name in (".hf.tmp", ".hf.tmpx", ".hf.12345.tmp"):
        assert (tmp_path / name / "precious.txt").read_text() == "mine"
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~hf._umask()  # a directory's usual mode, not 0700
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [".hf.12345.tmp", ".hf.tmp", ".hf.tmpx"]  # nothing of ours left behind


def test_failed_export_removes_only_its_own_temp_dir(tmp_path, monkeypatch):
    from bigtrain import hf

    run = _run_to_export(tmp_path)
    (tmp_path / ".hf.tmp").mkdir()
    (tmp_path / ".hf.tmp" / "precious.txt").write_text("mine")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf.ckpt, "write_json", boom)
    with pytest.raises(OSError):
        hf.export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".hf.tmp"]
    assert (tmp_path / ".hf.tmp" / "precious.txt").read_text() == "mine"


def test_imported_tokenizer_that_does_not_fit_the_model_is_refused_by_sample(tiny_data, tmp_path, capsys):
    """A Hugging Face directory whose tokenizer.model is not its model's (400 pieces, the model
    has 101 embedding rows): import-hf copies it into the run, and `sample` refuses it in one
    line (the prompt's ids would index past the embedding: an IndexError traceback before)."""
    d = _hf_dir(tmp_path)
    shutil.copyfile(tiny_data / "tokenizer.model", d / "tokenizer.model")
    run = tmp_path / "run"
    assert main(["import-hf", "--model", str(d), "--out", str(run)]) == 0
    assert (run / "tokenizer.model").is_file()
    one_line(capsys, ["sample", "--run", str(run), "--prompt", "the quick brown fox jumps", "--max-new-tokens", "2"],
             "tokenizer.model", "400 pieces", "vocabulary has 101")


def _wandb_id(path: Path, how: str) -> None:
    """Make run directory `path`'s wandb_id file lie in one way."""
    f = path / "wandb_id"
    if how == "binary":
        f.write_bytes(bytes(range(256)))
    elif how == "empty":
        f.write_text("  \n")
    elif how == "two lines":
        f.write_text("run-1\nrun-2\n")
    elif how == "too long":
        f.write_text("x" * 100_000)
    elif how == "a directory":
        f.mkdir()
    elif how == "endless (/dev/zero)":
        f.symlink_to("/dev/zero")
    elif how == "a FIFO":
        os.mkfifo(f)
    elif how == "dangling symlink":
        f.symlink_to(path / "elsewhere")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["binary", "empty", "two lines", "too long", "a directory", "endless (/dev/zero)",
                                 "a FIFO", "dangling symlink"])
def test_wandb_id_that_lies_is_refused_in_one_line(how, tmp_path):
    """The run directory's wandb_id (the wandb run a resume continues) is checked before wandb
    gets it: anything but one short line in a regular file is a one-line error naming it, read
    without hanging (a FIFO) or reading forever (/dev/zero), and nothing is written through a
    symlink. (_init_wandb turns the error into its warning: wandb is optional, training goes on.)"""
    from bigtrain.metrics import _run_id

    _wandb_id(tmp_path, how)
    with pytest.raises(UserError) as e:
        _run_id(tmp_path)
    assert "wandb_id" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "elsewhere").exists()


def test_wandb_id_is_made_once_and_read_back(tmp_path):
    from bigtrain.metrics import _run_id

    (tmp_path / "my run").mkdir()
    first = _run_id(tmp_path / "my run")
    assert first.startswith("my run-") and _run_id(tmp_path / "my run") == first
    (tmp_path / "my run" / "wandb_id").write_text("abc-123\n")
    assert _run_id(tmp_path / "my run") == "abc-123"
    long = tmp_path / ("r" * 200)  # a long run directory name still gives an id the check accepts
    long.mkdir()
    made = _run_id(long)
    assert made.startswith("r" * 100) and len(made) <= 128 and _run_id(long) == made


# --------------------------------------------------------------------------------------------
# Item 6: one line, once, exit 2 under launch/train.sh (torchrun, 2 CPU processes)


def _launch(*overrides: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    e = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
         **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run(["bash", "launch/train.sh", "configs/debug.yaml", *overrides], capture_output=True,
                          text=True, env=e, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["config (before the process group)", "data (after it)", "layout", "out_dir"])
def test_user_errors_under_torchrun_are_one_line_once(case, tiny_data, tmp_path):
    out = f"train.out_dir={tmp_path / 'run'}"
    overrides, fragment = {
        "config (before the process group)": ([out, "model.n_heads=3"], "model.n_heads(3)"),
        "data (after it)": ([*TINY, out, f"data.path={tmp_path / 'nodata'}"], "nodata"),
        "layout": ([*TINY, out, f"data.path={tiny_data}", "parallel.tp=3"], "tp"),
        "out_dir": ([*TINY, f"data.path={tiny_data}", f"train.out_dir={UNWRITABLE}"], "not writable"),
    }[case]
    r = _launch(*overrides)
    line = assert_user_error(r, fragment)  # exit 2, the only stderr line, no traceback
    assert line.startswith("bigtrain: error"), line
    assert "ChildFailedError" not in r.stderr + r.stdout and "exitcode" not in r.stderr


@pytest.mark.slow
def test_a_real_bug_under_torchrun_keeps_its_report(tmp_path):
    """Not a user error (a rank crashes): torchrun's report stays, exit code 1."""
    script = tmp_path / "crash.py"
    script.write_text("import os, sys\nif os.environ['RANK'] == '1':\n    raise RuntimeError('a bug')\n")
    r = subprocess.run([sys.executable, "-c", "import sys; from bigtrain.cli import torchrun_main; "
                        "sys.exit(torchrun_main(sys.argv[1:]))", "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "RuntimeError: a bug" in r.stderr and "crash.py FAILED" in r.stderr, r.stderr


def test_lowest_rank_error_is_the_one_shown(tmp_path, monkeypatch, capsys):
    from bigtrain import cli
    from bigtrain.errors import ERROR_DIR_ENV

    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path))
    for rank in (12, 3, 7):
        monkeypatch.setenv("RANK", str(rank))
        cli.report_error(f"problem on {rank}")
    assert capsys.readouterr().err == ""  # left for the launcher, not printed
    assert cli._first_error(tmp_path) == "bigtrain: error (rank 3): problem on 3"
    monkeypatch.setenv("RANK", "0")
    cli.report_error("only because rank 3 left", consequence=True)
    assert cli._first_error(tmp_path) == "bigtrain: error (rank 3): problem on 3"  # the cause, not rank 0's echo
    for f in tmp_path.glob("rank*.err"):
        f.unlink()
    assert cli._first_error(tmp_path) == "bigtrain: error: only because rank 3 left"  # better than nothing
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path / "gone"))
    cli.report_error("still said")
    assert capsys.readouterr().err.strip() == "bigtrain: error (rank 7): still said"


# --------------------------------------------------------------------------------------------
# Item 7: a stalled rank ends the job in parallel.timeout_s, naming it


def _stall(rank, world):
    """Rank 1 stops answering; rank 0's collective times out and names it."""
    from bigtrain import distributed

    store = dist_store()
    if rank == 1:
        store.wait(["bigtrain-test/diagnosed"], timedelta(seconds=60))  # hangs until rank 0 has its answer
        return None
    t = torch.ones(4)
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(t, async_op=True).wait(timeout=timedelta(seconds=2))
        return "no timeout"
    except Exception as e:  # noqa: BLE001
        err = distributed.timeout_error(e, 2.0)
        store.set("bigtrain-test/diagnosed", "1")
        return (str(err) if err is not None else repr(e)), time.monotonic() - start


def dist_store():
    return torch.distributed.distributed_c10d._get_default_store()


@pytest.mark.slow
def test_timeout_names_the_rank_that_stopped_answering():
    from tests.multiproc import run_ranks

    message, took = run_ranks(_stall, 2, timeout=60)[0]
    assert "rank 0: a collective timed out after 2 s" in message, message
    assert "rank(s) 1 stopped answering" in message and "parallel.timeout_s" in message
    assert took < 20, took


def test_timeout_key_defaults_and_validation():
    cfg = load_config(None, ["parallel.timeout_s=7.5"])
    assert cfg.parallel.timeout_s == 7.5 and Config().parallel.timeout_s == 600
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match="parallel.timeout_s"):
            load_config(None, [f"parallel.timeout_s={bad}"])


def test_only_timeouts_are_translated():
    from bigtrain.cli import _after_peer_failure
    from bigtrain.distributed import is_collective_timeout, is_peer_gone, timeout_error

    gone = RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:45963.")
    assert is_peer_gone(gone) and not is_peer_gone(RuntimeError("shape mismatch"))
    assert _after_peer_failure(gone) is None  # not under the launcher: the traceback stays

    assert is_collective_timeout(RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"))
    assert not is_collective_timeout(RuntimeError("CUDA out of memory"))
    assert not is_collective_timeout(ValueError("timed out"))
    assert timeout_error(RuntimeError("timed out"), 3) is None  # one process: not a collective


@pytest.mark.slow
@pytest.mark.parametrize("stall", ["hangs until killed", "wakes up to find rank 0 gone"])
def test_stalled_rank_under_torchrun_ends_the_job_in_one_line(stall, tiny_data, tmp_path):
    """2 gloo ranks under the launcher; rank 1 sleeps mid-run. The job ends after about
    parallel.timeout_s (not 30 minutes), with one line naming rank 1, exit 2 -- also when rank 1
    wakes before torchrun kills it and its collective fails on the vanished rank 0 (that failure
    is filed as a consequence, not printed as a traceback)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "BIGTRAIN_TEST_STALL_RANK": "1",
           **({"BIGTRAIN_TEST_STALL_S": "120", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"} if stall == "hangs until killed"
              else {"BIGTRAIN_TEST_STALL_S": "10", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30"})}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", "import sys; from bigtrain.cli import torchrun_main; "
                        "sys.exit(torchrun_main(sys.argv[1:]))", "--standalone", "--nproc_per_node", "2",
                        "tests/stall_rank.py", "train", "--config", "configs/debug.yaml", *TINY, "train.device=cpu",
                        f"data.path={tiny_data}", f"train.out_dir={tmp_path / 'run'}", "train.steps=4",
                        "parallel.timeout_s=3"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    took = time.monotonic() - start
    line = assert_user_error(r, "a collective timed out after 3 s", "rank(s) 1 stopped answering")
    assert line.startswith("bigtrain: error: rank 0:"), line
    assert took < 60, took


@pytest.mark.parametrize("data", [b"\xff\xfe{}", bytes(range(256)), b"{\"vocab_size\": NaN", b"[]", b"null"])
def test_json_files_that_are_not_json_objects(data, tiny_data, tmp_path):
    """meta.json, an HF config.json and a weight index: bytes that are not UTF-8 JSON objects."""
    from bigtrain import hf

    d = copy_data(tiny_data, tmp_path / "d")
    (d / "meta.json").write_bytes(data)
    with pytest.raises(UserError, match="meta.json"):
        load_meta(d)
    m = _hf_dir(tmp_path)
    (m / "model.safetensors.index.json").write_bytes(data)
    with pytest.raises(UserError, match="index"):
        hf.import_hf(m, tmp_path / "run")
    (m / "config.json").write_bytes(data)
    with pytest.raises(UserError, match="config.json|model"):
        hf.import_hf(m, tmp_path / "run")
    assert not (tmp_path / "run").exists()
