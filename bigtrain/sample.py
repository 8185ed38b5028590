"""Generate text from a run directory's latest (or a chosen) checkpoint, on one device."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import torch

from bigtrain import checkpoint as ckpt
from bigtrain.config import from_dict
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.model import build_model, init_weights


def load_for_inference(run: str | Path, step: int | None, device: torch.device):
    """(model, config) from a run directory's checkpoint, as a plain single-device model."""
    path = ckpt.find_checkpoint(run, step)
    manifest = ckpt.read_manifest(path)
    cfg = from_dict(manifest["config"])
    model = init_weights(build_model(cfg.model), seed=0, device=device)  # values overwritten below
    ckpt.load_model_state(model, ckpt.full_model_state(path, manifest), str(path))
    return model.eval(), cfg


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
             generator: torch.Generator, device: torch.device) -> list[int]:
    """Autoregressive sampling; recomputes the whole (cropped) context each step, which is plenty
    for the small models one samples from a laptop."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, s)
    max_len = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:])[0, -1].float()  # (v,)
        if temperature <= 0:
            nxt = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator).to(device)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def check_sampling(max_new_tokens, temperature, top_k, seed) -> None:
    """Refuse, in one line, sampling settings that would crash or silently mean nothing."""
    def integer(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not integer(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {max_new_tokens!r} must be an integer >= 0")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature {temperature!r} must be a finite number >= 0 (0 picks the likeliest "
                        f"token; 1 samples the model's distribution)")
    if not integer(top_k) or top_k < 0:
        raise UserError(f"--top-k {top_k!r} must be an integer >= 0 (0 keeps every token)")
    if not integer(seed) or not 0 <= seed < 2**63:
        raise UserError(f"--seed {seed!r} must be an integer in [0, 2**63)")


def sample(run: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
           seed: int = 0, step: int | None = None) -> str:
    check_sampling(max_new_tokens, temperature, top_k, seed)  # before loading anything
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_for_inference(run, step, device)
    tok = Tokenizer(Path(cfg.data.path) / "tokenizer.model")
    if tok.vocab_size > cfg.model.vocab_size:  # its ids would index past the embedding: a traceback
        raise UserError(f"tokenizer {str(tok.path)!r} has {tok.vocab_size} pieces but the model's vocabulary has "
                        f"{cfg.model.vocab_size} (model.vocab_size): it is not this model's tokenizer")
    ids = tok.encode(prompt)
    if not ids:
        ids = [tok.bos_id]
    out = generate(model, ids, max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed), device)
    return prompt + tok.decode(out)
