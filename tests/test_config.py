import subprocess
import sys

import pytest

from bigtrain.config import Config, field_docs, load_config, parse_bytes, reference
from bigtrain.errors import ConfigError


def test_defaults_and_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  dim: 128\n  n_heads: 4\noptim:\n  lr: 3e-4\ntrain:\n  steps: 7\n")
    cfg = load_config(f)
    assert cfg.model.dim == 128 and cfg.model.n_heads == 4
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads "3e-4" as a string; we convert
    assert cfg.train.steps == 7
    assert cfg.model.n_layers == Config().model.n_layers


def test_overrides_convert_types(tmp_path):
    cfg = load_config(None, ["train.steps=12", "optim.lr=1e-3", "model.tie_embeddings=true",
                             "recompute.modules=norm,mlp_act", "log.wandb.mode=offline", "train.resume=auto"])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.model.tie_embeddings is True
    assert cfg.recompute.modules == ["norm", "mlp_act"]
    assert cfg.log.wandb.mode == "offline"


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes' (did you mean train.steps?)"),
    ("trian.steps=3", "unknown config key 'trian'"),
    ("train.steps=abc", "train.steps='abc' must be an integer"),
    ("model.tie_embeddings=maybe", "must be a boolean"),
    ("parallel.engine=fsdp", "choose one of ddp, deepspeed"),
    ("train", "is not of the form key.sub=value"),
    ("train=3", "is a section"),
    ("model.n_kv_heads=3", "model.n_heads(8) is not divisible by model.n_kv_heads(3)"),
    ("train.seq_len=4096", "train.seq_len(4096) exceeds model.max_seq_len(2048)"),
    ("train.global_batch_size=12", "not a multiple of train.micro_batch_size(8)"),
    ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
    ("train.steps=0", "train.steps=0 must be > 0"),
    ("parallel.zero_stage=4", "choose 1, 2 or 3"),
    ("hardware.mfu=2", "hardware.mfu=2.0 must be in (0, 1]"),
])
def test_errors_name_the_problem(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"valid keys here: .*train.steps"):
        load_config(f)


def test_yaml_never_executes_code(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_every_field_has_a_docstring():
    rows = reference()
    assert len(rows) > 40
    undocumented = [k for k, _, doc in rows if not doc]
    assert undocumented == []
    assert "Hidden size" in field_docs(type(Config().model))["dim"]


def test_presets_load():
    for name in ["debug", "llama-125m", "llama-1b", "llama-7b", "llama-13b"]:
        load_config(f"configs/{name}.yaml")


def test_parse_bytes():
    assert parse_bytes("70GiB") == 70 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    with pytest.raises(ConfigError):
        parse_bytes("lots")


def test_cli_bad_key_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "bigtrain.cli", "train", "--config", "configs/debug.yaml",
                        "train.stpes=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "train.stpes" in r.stderr and "train.steps" in r.stderr


def test_sequence_parallel_needs_a_divisible_sequence():
    with pytest.raises(ConfigError, match=r"train.seq_len\(127\) is not divisible by parallel.tp\(2\)"):
        load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=127"])
