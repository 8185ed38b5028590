"""Hugging Face interoperability: export to LlamaForCausalLM, import from it, round trips, errors.

Every model here is tiny and random (built from a config, never downloaded); the hub is offline.
Tolerance: both sides compute the same fp32 math in a different order (rotary tables, SDPA with
repeated vs broadcast kv heads), so logits agree to ~1e-6, not bitwise; weights round-trip bitwise.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bigtrain import checkpoint as ckpt  # noqa: E402
from bigtrain import hf  # noqa: E402
from bigtrain.cli import main  # noqa: E402
from bigtrain.config import Config, ModelConfig, load_config, to_dict  # noqa: E402
from bigtrain.data.tokenizer import Tokenizer  # noqa: E402
from bigtrain.model import apply_rope, build_model, init_weights, rope_tables  # noqa: E402
from bigtrain.parallel.loss import cross_entropy  # noqa: E402
from bigtrain.sample import load_for_inference, sample  # noqa: E402
from tests.multiproc import run_ranks  # noqa: E402

RTOL = ATOL = 1e-5
THETA, EPS = 1000.0, 1e-6  # not the defaults: a mapping that drops them shows in the logits / config
CASES = {"mha_untied": (False, False), "mha_tied": (False, True), "gqa_untied": (True, False), "gqa_tied": (True, True)}


def model_cfg(gqa: bool, tied: bool, vocab: int = 101) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2 if gqa else 0, ffn_hidden=48, vocab_size=vocab,
                       max_seq_len=32, rope_theta=THETA, norm_eps=EPS, tie_embeddings=tied, init_std=0.1)


def random_bigtrain(cfg: ModelConfig, seed: int = 0):
    model = init_weights(build_model(cfg), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not ones: a swapped or dropped norm must show
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_run(run: Path, cfg: ModelConfig, model, data: Path, step: int = 5) -> Path:
    """A one-process bigtrain run directory holding `model` at `step`."""
    full = Config()
    full.model, full.data.path, full.train.out_dir, full.train.seq_len = cfg, str(data), str(run), 16
    state = {"model": {n: p.detach().clone() for n, p in model.named_parameters()},
             "shards": ckpt.shard_meta(model), "step": step}
    one = SimpleNamespace(rank=0, world_size=1, tp=1, dp=1)
    return ckpt.save_checkpoint(run, step, state, {"config": to_dict(full)}, one, keep_last=0)


def random_hf(gqa: bool, tied: bool, vocab: int = 101, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=32,
                         rms_norm_eps=EPS, rope_theta=THETA, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(vocab: int, seed: int = 1, shape=(2, 17)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None)
    return rp["rope_theta"] if rp else config.rope_theta


def assert_one_line_error(capsys, argv, *fragments):
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bigtrain: error: "), err
    for f in fragments:
        assert f in err[0], err[0]


# --------------------------------------------------------------------------------------------
# The rotary permutation


def test_rope_permutation_maps_interleaved_to_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n, d, s = 3, 8, 5
    w = torch.randn(n * d, 16)
    assert torch.equal(hf.rope_from_hf(hf.rope_to_hf(w, n), n), w)
    assert torch.equal(hf.rope_to_hf(hf.rope_from_hf(w, n), n), w)
    assert not torch.equal(hf.rope_to_hf(w, n), w)
    # A head vector in bigtrain's layout, rotated by bigtrain, equals (after the permutation) the
    # permuted vector rotated by transformers — in both directions.
    x = torch.randn(1, s, n, d)  # (b, s, n, d), bigtrain layout
    to_hf = lambda t: hf.rope_to_hf(t.reshape(-1, n * d).T, n).T.reshape(1, s, n, d)  # noqa: E731
    from_hf = lambda t: hf.rope_from_hf(t.reshape(-1, n * d).T, n).T.reshape(1, s, n, d)  # noqa: E731
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), 1.0 / THETA ** (torch.arange(0, d, 2) / d))  # (s, d/2)
    angles = torch.cat([freqs, freqs], dim=-1)[None]  # (1, s, d): transformers' table
    rot_hf, _ = apply_rotary_pos_emb(to_hf(x).transpose(1, 2), to_hf(x).transpose(1, 2), angles.cos(), angles.sin())
    torch.testing.assert_close(rot_hf.transpose(1, 2), to_hf(apply_rope(x, rope_tables(d, s, THETA))))
    torch.testing.assert_close(from_hf(rot_hf.transpose(1, 2)), apply_rope(x, rope_tables(d, s, THETA)))


# --------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_same_logits(case, tiny_data, tmp_path):
    gqa, tied = CASES[case]
    cfg = model_cfg(gqa, tied)
    model = random_bigtrain(cfg)
    write_run(tmp_path / "run", cfg, model, tiny_data)
    assert main(["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0

    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["rope_theta"], conf["rms_norm_eps"], conf["num_key_value_heads"], conf["tie_word_embeddings"],
            conf["vocab_size"], conf["intermediate_size"]) == (THETA, EPS, 2 if gqa else 4, tied, 101, 48)
    assert ("lm_head.weight" in load_file(tmp_path / "hf" / "model.safetensors")) == (not tied)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf_theta(theirs.config) == THETA and theirs.config.rms_norm_eps == EPS
    assert next(theirs.parameters()).dtype == torch.float32
    x = tokens(101)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_exported_tokenizer_matches_sentencepiece(model_type, tiny_data, tmp_path):
    data = tiny_data
    if model_type == "unigram":
        from bigtrain.data.prepare import prepare

        data = tmp_path / "unigram"
        prepare([str(tiny_data.parent / "corpus.txt")], str(data), vocab_size=310, model_type="unigram")
    cfg = model_cfg(gqa=True, tied=True, vocab=Tokenizer(data / "tokenizer.model").vocab_size)
    write_run(tmp_path / "run", cfg, random_bigtrain(cfg), data)
    hf.export_hf(tmp_path / "run", tmp_path / "hf")
    ours = Tokenizer(data / "tokenizer.model")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    if model_type == "bpe":
        assert type(theirs).__name__ == "LlamaTokenizer"
    texts = ["To be, or not to be", " leading and  double spaces\tand tabs\n\nnew", "Über café 日本語 🙂", "zzqx 16"]
    for text in texts:
        assert theirs.encode(text) == [ours.bos_id] + ours.encode(text), text
        assert theirs.decode(theirs.encode(text), skip_special_tokens=True) == text
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id) == (1, 2)


# --------------------------------------------------------------------------------------------
# Import


@pytest.mark.parametrize("case", list(CASES))
def test_import_gives_same_logits_and_loss(case, tmp_path):
    gqa, tied = CASES[case]
    theirs = random_hf(gqa, tied)
    theirs.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    ours, cfg = load_for_inference(tmp_path / "run", None, torch.device("cpu"))
    assert (cfg.model.rope_theta, cfg.model.norm_eps, cfg.model.kv_heads, cfg.model.tie_embeddings) == \
        (THETA, EPS, 2 if gqa else 4, tied)
    x = tokens(101)
    with torch.no_grad():
        out = theirs(x, labels=x)
        logits = ours(x)
    torch.testing.assert_close(logits, out.logits, rtol=RTOL, atol=ATOL)
    loss = cross_entropy(logits[:, :-1], x[:, 1:], vocab_size=cfg.model.vocab_size)
    torch.testing.assert_close(loss, out.loss, rtol=RTOL, atol=ATOL)


def test_import_reads_pytorch_bin(tmp_path):
    theirs = random_hf(gqa=True, tied=False)
    (tmp_path / "hf").mkdir()
    theirs.config.save_pretrained(tmp_path / "hf")
    torch.save(theirs.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    ours, _ = load_for_inference(tmp_path / "run", None, torch.device("cpu"))
    x = tokens(101)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=RTOL, atol=ATOL)


def _train_tp2(rank, world, run, data, out, x):
    """On each of 2 ranks: resume the imported (tp=1, weights-only) checkpoint at tp=2, compute the
    gathered logits and the vocab-parallel loss, then train one step and save."""
    import torch.distributed as dist

    from bigtrain.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cfg = load_config(run / "config.yaml", [
        "parallel.tp=2", f"data.path={data}", f"train.out_dir={out}", f"train.resume={ckpt.latest_checkpoint(run)}",
        "train.steps=1", "train.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=2",
        "log.progress=false", "log.wandb.mode=disabled", "data.eval_batches=1"])
    trainer = Trainer(cfg)
    assert trainer.step == 0
    with torch.no_grad():
        trainer.module.eval()
        local = trainer.module(x)  # (b, s, v_padded / 2)
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local.contiguous(), group=trainer.dims.tp_group)
        logits = torch.cat(pieces, dim=-1)[..., :cfg.model.vocab_size]
        loss = float(trainer.loss_on(x))
    records = trainer.train()
    return logits, loss, records[-1]["loss"]


@pytest.mark.slow
def test_import_at_tp2_same_logits_and_loss_then_trains_and_exports(tiny_data, tmp_path):
    """vocab 401 is padded to 402 at tp=2; tied embeddings share the vocab-parallel weight."""
    theirs = random_hf(gqa=True, tied=True, vocab=401)
    theirs.save_pretrained(tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    x = tokens(401)
    with torch.no_grad():
        ref = theirs(x, labels=x)
    results = run_ranks(_train_tp2, 2, tmp_path / "run", tiny_data, tmp_path / "tp2", x, timeout=120)
    for logits, loss, trained in results:
        torch.testing.assert_close(logits, ref.logits, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.tensor(loss), ref.loss, rtol=RTOL, atol=ATOL)
        assert trained == results[0][2] and trained == trained  # a finite, shared loss
    # the trained tp=2 run exports (shards gathered) and transformers agrees with bigtrain on it
    assert ckpt.read_manifest(ckpt.latest_checkpoint(tmp_path / "tp2"))["tp"] == 2
    hf.export_hf(tmp_path / "tp2", tmp_path / "hf2")
    ours, _ = load_for_inference(tmp_path / "tp2", None, torch.device("cpu"))
    again = LlamaForCausalLM.from_pretrained(tmp_path / "hf2", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ours(x), rtol=RTOL, atol=ATOL)
        assert not torch.allclose(again(x).logits, ref.logits)  # it did train


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bitwise(tied, tiny_data, tmp_path):
    # bigtrain -> transformers -> bigtrain (vocab of tiny_data's tokenizer, so the result samples)
    cfg = model_cfg(gqa=True, tied=tied, vocab=400)
    model = random_bigtrain(cfg)
    write_run(tmp_path / "run", cfg, model, tiny_data)
    hf.export_hf(tmp_path / "run", tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "back")
    path = ckpt.latest_checkpoint(tmp_path / "back")
    back = ckpt.full_model_state(path, ckpt.read_manifest(path))
    original = dict(model.named_parameters())
    assert back.keys() == original.keys()
    for name, t in back.items():
        assert torch.equal(t, original[name]), name
    m = load_for_inference(tmp_path / "back", None, torch.device("cpu"))[1].model
    for attr in ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "hidden", "vocab_size", "max_seq_len",
                 "rope_theta", "norm_eps", "tie_embeddings", "init_std"):
        assert getattr(m, attr) == getattr(cfg, attr), attr
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (tiny_data / "tokenizer.model").read_bytes()
    assert sample(str(tmp_path / "back"), "To be", max_new_tokens=3).startswith("To be")

    # transformers -> bigtrain -> transformers
    theirs = random_hf(gqa=True, tied=tied)
    theirs.save_pretrained(tmp_path / "hf_in")
    hf.import_hf(tmp_path / "hf_in", tmp_path / "run2")
    hf.export_hf(tmp_path / "run2", tmp_path / "hf_out")
    a, b = load_file(tmp_path / "hf_in" / "model.safetensors"), load_file(tmp_path / "hf_out" / "model.safetensors")
    if tied:
        a.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------
# Errors


def test_clear_one_line_errors(tiny_data, tmp_path, capsys):
    imp = lambda model, out="run": ["import-hf", "--model", str(model), "--out", str(tmp_path / out)]  # noqa: E731
    assert_one_line_error(capsys, imp(tmp_path / "nope"), "nope", "is not a directory")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(capsys, imp(tmp_path / "empty"), "no config.json", "save_pretrained")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                               "architectures": ["GPT2LMHeadModel"]}))
    assert_one_line_error(capsys, imp(tmp_path / "gpt2"), "'gpt2' model", "Llama")

    theirs = random_hf(gqa=True, tied=False)
    theirs.config.save_pretrained(tmp_path / "noweights")
    assert_one_line_error(capsys, imp(tmp_path / "noweights"), "has no weights", "model.safetensors")
    # a config.json that does not describe the weights next to it
    theirs.save_pretrained(tmp_path / "mismatch")
    conf = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps({**conf, "intermediate_size": 64}))
    assert_one_line_error(capsys, imp(tmp_path / "mismatch"), "mlp.down_proj.weight", "(32, 48)", "implies (32, 64)")
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": 3}))
    assert_one_line_error(capsys, imp(tmp_path / "mismatch"), "model.layers.2.", "missing")
    llama3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None}
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps({**conf, **llama3}))
    assert_one_line_error(capsys, imp(tmp_path / "mismatch"), "rope_type='llama3'")
    # a truncated weight file
    theirs.save_pretrained(tmp_path / "trunc")
    f = tmp_path / "trunc" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:500])
    assert_one_line_error(capsys, imp(tmp_path / "trunc"), "corrupt or unreadable")
    # never over an existing run
    theirs.save_pretrained(tmp_path / "good")
    assert main(imp(tmp_path / "good")) == 0
    assert_one_line_error(capsys, imp(tmp_path / "good"), "already holds checkpoints")
    # an imported run without a tokenizer cannot sample, and says why
    assert_one_line_error(capsys, ["sample", "--run", str(tmp_path / "run")], "tokenizer", "does not exist")

    exp = lambda run, *extra: ["export-hf", "--run", str(run), "--out", str(tmp_path / "out"), *extra]  # noqa: E731
    assert_one_line_error(capsys, exp(tmp_path / "norun"), "norun", "is not a directory")
    assert_one_line_error(capsys, exp(tmp_path / "empty"), "holds no complete checkpoint")
    assert_one_line_error(capsys, exp(tmp_path / "run", "--step", "7"), "no checkpoint for step 7", "[0]")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert_one_line_error(capsys, exp(tmp_path / "run"), "already exists and is not empty")


def test_resume_of_import_with_other_model_is_refused(tiny_data, tmp_path, capsys):
    random_hf(gqa=True, tied=False, vocab=401).save_pretrained(tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run", data=str(tiny_data))
    assert_one_line_error(capsys, ["train", "--config", str(tmp_path / "run" / "config.yaml"), "model.dim=64",
                                   "log.progress=false", "log.wandb.mode=disabled"],
                          "different model", "model.dim: 32 in checkpoint vs 64")


def test_missing_safetensors_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    cfg = model_cfg(gqa=False, tied=False)
    write_run(tmp_path / "run", cfg, random_bigtrain(cfg), tmp_path)
    assert_one_line_error(capsys, ["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o")],
                          "safetensors", "pip install 'bigtrain[hf]'")
    assert transformers.__version__  # the extra installs both
