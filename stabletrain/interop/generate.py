"""Text from a trained model: greedy (temperature 0) or sampled with temperature and nucleus (top-p) filtering.

Models with MHA/GQA attention (every residual stream and feed-forward: attention is their only cross-position
operation) decode with a KV cache: the prompt runs once, then one token per step. MLA models, and exports loaded
through transformers, rerun the whole sequence at each step (correct, slower). A prompt is read as the start of a
document, so it follows the end-of-document token, as documents did in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stabletrain import StableTrainError
from stabletrain.config.fields import at_least, between, check_ranges
from stabletrain.data.tokenizer import Tokenizer
from stabletrain.interop.run import load_run, model_from_export
from stabletrain.models.layers import CausalSelfAttention


@dataclass
class Sampling:
    max_new_tokens: int = at_least(1, 64)
    temperature: float = at_least(0, 0.0)  # 0: greedy
    top_p: float = between(0, 1, 1.0, lo_open=True)  # nucleus: the smallest set of tokens with this much mass
    seed: int = between(0, 2**32 - 1, 0)


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer ([B, H_kv, T, D])."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def _attention_layers(model: nn.Module) -> list[CausalSelfAttention] | None:
    """The model's attention layers when all of them can hold a KV cache (None: MLA, or not our model)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(b.attn, CausalSelfAttention) for b in blocks):
        return None
    return [b.attn for b in blocks]


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """The next token [B] from last-position logits [B, V]."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module, ids: torch.Tensor, s: Sampling, eos_id: int | None = None, use_cache: bool = True
) -> torch.Tensor:
    """Continue ids [B, T]; returns the new tokens [B, <= max_new_tokens] (stops when every row produced EOS)."""
    check_ranges(s, "")  # a value out of range is a one-line ConfigError, not a crash inside the loop
    gen = torch.Generator(device=ids.device).manual_seed(s.seed)
    layers = _attention_layers(model) if use_cache else None
    out, seq = [], ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    try:
        for layer in layers or []:
            layer.kv_cache = KVCache()
        logits = (model.decode(ids, 0) if layers else _logits(model, ids))[:, -1]
        for _ in range(s.max_new_tokens):
            nxt = pick(logits, s, gen)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
            if bool(done.all()):
                break
            offset, seq = seq.shape[1], torch.cat([seq, nxt[:, None]], dim=1)
            logits = (model.decode(nxt[:, None], offset) if layers else _logits(model, seq))[:, -1]
    finally:
        for layer in layers or []:
            layer.kv_cache = None
    return torch.stack(out, dim=1)


def _logits(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    out = model(seq)
    return out if torch.is_tensor(out) else out.logits  # ours, or a transformers model


def load_for_generation(path: Path, accept_legacy: bool = False):
    """(model, encode, decode, eos_id) from a run directory, a safetensors export or a Hugging Face export."""
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        model, spm_path = _our_model(path, accept_legacy)
        tok = Tokenizer(spm_path)
        return model, lambda t: tok.encode([t])[0], tok.decode, tok.eos_id
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        encode = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
        return model, encode, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token_id
    raise StableTrainError(
        f"{path} is neither a run directory nor an export (no checkpoints/, config.yaml or config.json)"
    )


def _our_model(path: Path, accept_legacy: bool):
    if (path / "checkpoints").is_dir():
        run = load_run(path, accept_legacy=accept_legacy)
        return run.model(), run.tokenizer_path
    return model_from_export(path), path / "tokenizer.model"
