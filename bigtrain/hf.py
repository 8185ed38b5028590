"""Hugging Face transformers interoperability: bigtrain checkpoints <-> LlamaForCausalLM directories.

    bigtrain export-hf --run DIR [--step N] --out OUT   a directory LlamaForCausalLM.from_pretrained reads
    bigtrain import-hf --model DIR --out RUN_DIR        a run directory train/sample/export-hf accept

Every difference between the two formats is written down here, once:

| bigtrain (full, unsharded)            | transformers LlamaForCausalLM                   | layout                    |
|---------------------------------------|-------------------------------------------------|---------------------------|
| tok_embeddings.weight       (v, h)    | model.embed_tokens.weight                       | same                      |
| layers.N.attention_norm.weight (h,)   | model.layers.N.input_layernorm.weight           | same                      |
| layers.N.attention.wq.weight (nh*d, h)| model.layers.N.self_attn.q_proj.weight          | rotary rows permuted (1)  |
| layers.N.attention.wk.weight(nkv*d, h)| model.layers.N.self_attn.k_proj.weight          | rotary rows permuted (1)  |
| layers.N.attention.wv.weight(nkv*d, h)| model.layers.N.self_attn.v_proj.weight          | same                      |
| layers.N.attention.wo.weight (h, nh*d)| model.layers.N.self_attn.o_proj.weight          | same                      |
| layers.N.ffn_norm.weight    (h,)      | model.layers.N.post_attention_layernorm.weight  | same                      |
| layers.N.feed_forward.w1.weight (f, h)| model.layers.N.mlp.gate_proj.weight             | same                      |
| layers.N.feed_forward.w3.weight (f, h)| model.layers.N.mlp.up_proj.weight               | same                      |
| layers.N.feed_forward.w2.weight (h, f)| model.layers.N.mlp.down_proj.weight             | same                      |
| norm.weight                 (h,)      | model.norm.weight                               | same                      |
| output.weight               (v, h)    | lm_head.weight                                  | absent when tied (2)      |

(1) Rotary convention. bigtrain rotates interleaved pairs (x[2i], x[2i+1]) of each head (Meta's
    original Llama code); transformers rotates halves (x[i], x[i + d/2]) (`rotate_half`). Within
    each head, HF row j*d/2 + i is bigtrain row 2i + j (j in {0, 1}): `rope_to_hf` is the
    permutation of transformers' convert_llama_weights_to_hf.py, `rope_from_hf` its inverse. q
    and k get the same permutation, so q.k and the attention output are unchanged.
(2) Tied embeddings: model.tie_embeddings <-> tie_word_embeddings. bigtrain then holds one
    parameter (tok_embeddings.weight); the HF file carries no lm_head.weight.
Fused vs separate projections: both sides keep q/k/v and gate/up as separate matrices, so
    nothing is split or concatenated (a fused qkv_proj / gate_up_proj is not a Llama checkpoint
    and is rejected as an unexpected weight).
Vocabulary padding for tp: checkpoints are gathered with checkpoint.full_model_state, which cuts
    the zero rows tensor parallelism pads the vocab with; the HF file has exactly vocab_size rows.
    On the way in, the trainer's resharding pads again for whatever tp it runs at.
Norms: both compute RMSNorm in fp32 and multiply the weight after casting back (same math);
    model.norm_eps <-> rms_norm_eps, model.rope_theta <-> rope_theta (and rope_parameters).

An imported run holds a *weights-only* checkpoint (manifest "weights_only": true; no optimizer,
RNG or data position): `bigtrain train ... train.resume=<it>` (or train.resume=auto in that run
directory) starts from those weights with a fresh optimizer at step 0, at any tp.

transformers itself is needed only to use the exported directory; export and import need the
safetensors package (`pip install 'bigtrain[hf]'` installs both).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from bigtrain import checkpoint as ckpt
from bigtrain.config import Config, ModelConfig, dump_yaml, from_dict, to_dict
from bigtrain.errors import UserError, check_writable_dir
from bigtrain.safe_load import load_tensors

INSTALL = "pip install 'bigtrain[hf]'"

# --------------------------------------------------------------------------------------------
# The mapping

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
          "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
          "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
          "feed_forward.w2.weight": "mlp.down_proj.weight"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TOP = {v: k for k, v in _TOP.items()}
_HF_LAYER = {v: k for k, v in _LAYER.items()}


def hf_name(name: str) -> str:
    """bigtrain parameter name -> transformers state-dict key."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise KeyError(f"no transformers name for bigtrain parameter {name!r}")


def bigtrain_name(key: str) -> str | None:
    """transformers state-dict key -> bigtrain parameter name (None when it has none)."""
    if key in _HF_TOP:
        return _HF_TOP[key]
    m = _HF_LAYER_RE.match(key)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def rope_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (n_heads*d, h): interleaved rotary pairs -> rotate_half halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of rope_to_hf: rotate_half halves -> interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(name: str, cfg: ModelConfig) -> int | None:
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if name.endswith("attention.wk.weight"):
        return cfg.kv_heads
    return None


def to_hf_state(state: dict, cfg: ModelConfig) -> dict:
    """A full bigtrain model state -> transformers LlamaForCausalLM state (contiguous tensors)."""
    out = {}
    for name, t in state.items():
        heads = _rope_heads(name, cfg)
        out[hf_name(name)] = (rope_to_hf(t, heads) if heads else t).contiguous()
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state(hf: dict, cfg: ModelConfig, source: str) -> dict:
    """A transformers Llama state -> full bigtrain model state, checked name by name and shape by shape."""
    from bigtrain.model import build_model

    expected = {n: tuple(p.shape) for n, p in build_model(cfg).named_parameters()}  # meta: no memory
    hf = {(k if k.startswith(("model.", "lm_head.")) else f"model.{k}"): v for k, v in hf.items()}  # LlamaModel saves
    state, unexpected = {}, []
    for key, t in hf.items():
        name = bigtrain_name(key)
        if name is None:
            if not key.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved
                unexpected.append(key)
            continue
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # the same matrix as the embedding
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(t.shape) != expected[name]:
            raise UserError(f"{source}: weight {key} has shape {tuple(t.shape)} but its config.json implies "
                            f"{expected[name]} (a mismatched config.json and weights?)")
        t = t.to(torch.float32)
        heads = _rope_heads(name, cfg)
        state[name] = (rope_from_hf(t, heads) if heads else t).contiguous()
    if unexpected:
        raise UserError(f"{source}: weights {unexpected[:3]} have no place in a Llama model "
                        f"({len(unexpected)} unexpected; is it another architecture?)")
    missing = sorted(set(expected) - set(state), key=_natural)
    if missing:
        lm = " (untied lm_head.weight: is tie_word_embeddings right?)" if missing == ["output.weight"] else ""
        raise UserError(f"{source}: weights for {[hf_name(n) for n in missing[:3]]} are missing "
                        f"({len(missing)} of {len(expected)}; an incomplete download?){lm}")
    return state


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, dtype: str) -> dict:
    """config.json of LlamaForCausalLM for `cfg`. rope_theta is written both the transformers 4.x
    way (top level) and the 5.x way (rope_parameters), so either reads the right theta."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": dtype, "dtype": dtype,
    }


_NO = object()


def _field(hf: dict, key: str, kind: str, source: str, default=_NO):
    """hf[key] checked against `kind`: "int" (a positive integer), "float" (a finite number), "bool",
    "str" or "dict"; a missing (or null) key gives `default`, or an error when there is none."""
    value = hf.get(key)
    if value is None:
        if default is _NO:
            raise UserError(f"{source}: config.json lacks {key}; it is not a complete Llama config")
        return default
    ok = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0,
          "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict)}[kind](value)
    if not ok:
        want = {"int": "a positive integer", "float": "a finite number", "bool": "true or false",
                "str": "a string", "dict": "an object"}[kind]
        raise UserError(f"{source}: config.json has {key}={value!r}; it must be {want}")
    return value


def model_config_from_hf(hf: dict, source: str) -> ModelConfig:
    """bigtrain's model section from a transformers Llama config.json, refusing what bigtrain's
    model cannot express (biases, other activations, scaled rotary embeddings) and fields of the
    wrong type (a "32" or 32.5 for a size, a string for a flag)."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: config.json holds a {type(hf).__name__}, not an object of fields")
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise UserError(f"{source} holds a {model_type!r} model (architectures {hf.get('architectures')}); "
                        f"import-hf reads Llama models (model_type 'llama')")
    dim, heads = _field(hf, "hidden_size", "int", source), _field(hf, "num_attention_heads", "int", source)
    layers, vocab = _field(hf, "num_hidden_layers", "int", source), _field(hf, "vocab_size", "int", source)
    ffn = _field(hf, "intermediate_size", "int", source)
    rope = _field(hf, "rope_parameters", "dict", source, None) or _field(hf, "rope_scaling", "dict", source, None) or {}
    rope_type = _field(rope, "rope_type", "str", source, None) or _field(rope, "type", "str", source, "default")
    unsupported = {
        "hidden_act": (_field(hf, "hidden_act", "str", source, "silu"), "silu"),
        "attention_bias": (_field(hf, "attention_bias", "bool", source, False), False),
        "mlp_bias": (_field(hf, "mlp_bias", "bool", source, False), False),
        "rope_type": (rope_type, "default"),
        "head_dim": (_field(hf, "head_dim", "int", source, dim // heads), dim // heads),
    }
    bad = [f"{k}={v!r} (bigtrain supports {want!r})" for k, (v, want) in unsupported.items() if v != want]
    if bad:
        raise UserError(f"{source}: this Llama variant cannot be imported: {'; '.join(bad)}")
    theta = _field(rope, "rope_theta", "float", source, None)
    cfg = ModelConfig(
        dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=_field(hf, "num_key_value_heads", "int", source, heads),
        ffn_hidden=ffn, vocab_size=vocab, max_seq_len=_field(hf, "max_position_embeddings", "int", source, 2048),
        rope_theta=float(theta if theta is not None else _field(hf, "rope_theta", "float", source, 10000.0)),
        norm_eps=float(_field(hf, "rms_norm_eps", "float", source, 1e-6)),
        dropout=float(_field(hf, "attention_dropout", "float", source, 0.0)),
        tie_embeddings=_field(hf, "tie_word_embeddings", "bool", source, False),
        init_std=float(_field(hf, "initializer_range", "float", source, 0.02)))
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


# --------------------------------------------------------------------------------------------
# Export


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(f"Hugging Face export/import needs the safetensors package: {INSTALL}") from None
    return safetensors.torch


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(run: str | Path, out: str | Path, step: int | None = None, dtype: str = "float32") -> Path:
    """Write `out`: config.json, generation_config.json, model.safetensors and (when the run's
    tokenizer is found) tokenizer.model + tokenizer_config.json. Any tp/dp layout: the shards are
    gathered. The directory appears complete or not at all."""
    st = _safetensors()
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype!r} is not allowed; choose one of {', '.join(_DTYPES)}")
    out = Path(out)
    check_writable_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {str(out)!r} already exists and is not empty; choose another directory or remove it")
    path = ckpt.find_checkpoint(run, step)
    manifest = ckpt.read_manifest(path)
    cfg = from_dict(manifest["config"])
    state = to_hf_state(ckpt.full_model_state(path, manifest), cfg.model)
    state = {k: v.to(_DTYPES[dtype]) for k, v in state.items()}
    tok = _find_tokenizer(Path(run), cfg)
    bos, eos = _special_ids(tok)

    def write(tmp: Path) -> None:
        st.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        ckpt.write_json(tmp / "config.json", hf_config(cfg.model, bos, eos, dtype))
        ckpt.write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
        if tok is not None:
            shutil.copyfile(tok, tmp / "tokenizer.model")
            ckpt.write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, cfg.model.max_seq_len))

    return _write_new_dir(out, write)


def _write_new_dir(out: Path, write) -> Path:
    """Call write(tmp) on a fresh directory of our own next to `out` (a unique name: nothing that
    was there is touched), then rename it to `out` (absent or empty, checked by the caller): `out`
    appears complete or not at all. On failure only that directory is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; give it a directory's usual mode
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        tmp.rename(out)  # fails (rather than replaces) if `out` appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _find_tokenizer(run: Path, cfg: Config) -> Path | None:
    """The run's sentencepiece model: data.path/tokenizer.model, else one in the run directory
    (where import-hf puts it)."""
    for p in (Path(cfg.data.path) / "tokenizer.model", run / "tokenizer.model"):
        if p.is_file():
            return p
    return None


def _special_ids(tok: Path | None) -> tuple[int, int]:
    if tok is None:
        return 1, 2  # what `bigtrain prepare` assigns
    from bigtrain.data.tokenizer import Tokenizer

    t = Tokenizer(tok)
    return t.bos_id, t.eos_id


def tokenizer_config(tok: Path, max_len: int) -> dict:
    """tokenizer_config.json for the sentencepiece model `tok` (as written by `bigtrain prepare`:
    no dummy prefix, byte fallback). BPE models load as LlamaTokenizer, which in transformers 5
    is a BPE tokenizer; a unigram model needs the generic sentencepiece conversion, which
    transformers 5 does for tokenizer_class TokenizersBackend."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.read_bytes())
    spec = proto.trainer_spec
    bpe = spec.model_type == pb.TrainerSpec.BPE
    return {
        "tokenizer_class": "LlamaTokenizer" if bpe else "TokenizersBackend",
        "bos_token": spec.bos_piece or "<s>", "eos_token": spec.eos_piece or "</s>",
        "unk_token": spec.unk_piece or "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix), "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_len, "sp_model_kwargs": {},
    }


# --------------------------------------------------------------------------------------------
# Import


def _index_files(index: Path, model_dir: Path) -> tuple[list[str], dict]:
    """The weight files a `*.index.json` names, each checked to be a plain file name inside
    `model_dir` (no absolute path, no `..`, no symlink out), and its weight_map."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, TypeError) as e:
        raise UserError(f"{str(index)!r} is not a valid weight index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise UserError(f"{str(index)!r}: weight_map must map weight names to file names (strings)")
    root = model_dir.resolve()
    for name in sorted(set(weight_map.values())):
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts or not (model_dir / rel).resolve().is_relative_to(root):
            raise UserError(f"{str(index)!r} names weight file {name!r}, which is outside the model directory; "
                            f"an index may only name files inside it")
    return sorted(set(weight_map.values())), weight_map


def read_hf_state(model_dir: Path) -> dict:
    """All tensors of a transformers checkpoint directory: model.safetensors, sharded safetensors
    with an index, or pytorch_model.bin (loaded with weights_only=True). An index is checked:
    its files lie inside the directory and hold exactly the weights it says, none twice."""
    weight_map = None
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if index.is_file():
            files, weight_map = _index_files(index, model_dir)
            break
        if (model_dir / single).is_file():
            files = [single]
            break
    else:
        raise UserError(f"--model {str(model_dir)!r} has no weights (model.safetensors, "
                        f"model.safetensors.index.json or pytorch_model.bin)")
    state, origin = {}, {}
    for name in files:
        f = model_dir / name
        if not f.is_file():
            raise UserError(f"--model {str(model_dir)!r}: weight file {name} named by the index is missing")
        try:
            if name.endswith(".safetensors"):
                part = _safetensors().load_file(str(f))
            else:
                part = load_tensors(f)  # weights_only=True; refused or corrupt: a one-line UserError naming it
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated file, header error, unsafe pickle...
            reason = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"weight file {str(f)!r} is corrupt or unreadable: {type(e).__name__}: {reason}") from None
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in part.items()):
            raise UserError(f"weight file {str(f)!r} is not a state dict (names -> tensors)")
        for key, t in part.items():
            if key in origin:
                raise UserError(f"--model {str(model_dir)!r}: weight {key} is in both {origin[key]} and {name}")
            if weight_map is not None and weight_map.get(key) != name:
                raise UserError(f"--model {str(model_dir)!r}: {name} holds {key}, which its index places "
                                f"{'in ' + weight_map[key] if key in weight_map else 'nowhere'}")
            if not t.is_floating_point():
                raise UserError(f"--model {str(model_dir)!r}: weight {key} in {name} holds {t.dtype} values, "
                                f"not floating-point weights")
            origin[key] = name
        state.update(part)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(origin))
        if absent:
            raise UserError(f"--model {str(model_dir)!r}: the index places {absent[:3]} in "
                            f"{weight_map[absent[0]]}, which does not hold them ({len(absent)} absent)")
    return state


def import_hf(model_dir: str | Path, out: str | Path, data: str | None = None) -> Path:
    """Write a run directory `out` from a local transformers Llama directory: config.yaml (model
    section from config.json; data.path = `data`, or `out` itself), tokenizer.model when the
    model has one, and a weights-only checkpoint checkpoints/step_00000000 (tp=1)."""
    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise UserError(f"--model {str(model_dir)!r} is not a directory")
    conf = model_dir / "config.json"
    if not conf.is_file():
        raise UserError(f"--model {str(model_dir)!r} has no config.json; pass a directory written by "
                        f"transformers' save_pretrained")
    try:
        hf = json.loads(conf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{str(conf)!r} is not valid JSON: {e}") from None
    source = f"--model {str(model_dir)!r}"
    model_cfg = model_config_from_hf(hf, source)
    if ckpt.list_checkpoints(out):
        raise UserError(f"--out {str(out)!r} already holds checkpoints; choose another run directory")
    check_writable_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {str(out)!r} already exists and is not empty; import-hf writes a new run directory "
                        f"and never overwrites files: choose another --out or remove it")
    state = from_hf_state(read_hf_state(model_dir), model_cfg, source)

    cfg = Config()
    cfg.model = model_cfg
    cfg.data.path = str(data) if data else str(out)
    cfg.train.out_dir = str(out)
    cfg.train.resume = "auto"  # in this directory: start from the imported weights, later resume the run
    cfg.train.seq_len = min(cfg.train.seq_len, model_cfg.max_seq_len)
    cfg.validate()
    shards = {n: {"shard_dim": None, "full_shape": list(t.shape)} for n, t in state.items()}
    one = SimpleNamespace(rank=0, world_size=1, tp=1, dp=1)
    manifest = {"config": to_dict(cfg), "weights_only": True, "imported_from": str(model_dir.resolve())}

    def write(tmp: Path) -> None:
        if (model_dir / "tokenizer.model").is_file():
            shutil.copyfile(model_dir / "tokenizer.model", tmp / "tokenizer.model")
        ckpt.save_checkpoint(tmp, 0, {"model": state, "shards": shards, "step": 0}, manifest, one, keep_last=0)
        (tmp / "config.yaml").write_text(dump_yaml(cfg))

    return _write_new_dir(out, write)
