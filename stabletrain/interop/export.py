"""Export a trained run: `safetensors` (our names, the resolved config, the tokenizer) or `hf` (a directory
`transformers` loads).

The baseline family (standard residual, no depth or signal scaling, MHA/GQA without QK-norm, dense SwiGLU) is
exactly Llama: RMSNorm in fp32 times the weight, rotate-half RoPE, SiLU-gated MLP, no biases. It exports as
`LlamaForCausalLM`, which needs nothing of stabletrain. Every other model (HC, mHC, LNS, BSLO, MoE, MLA) exports
with a modeling file in the directory (`trust_remote_code=True`) that builds the model with stabletrain's own
modules, so those exports need stabletrain installed where they are loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from stabletrain import StableTrainError
from stabletrain.config import ModelConfig
from stabletrain.interop.hf_tokenizer import hf_tokenizer
from stabletrain.interop.run import TrainedRun

FORMATS = ("hf", "safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHARD_BYTES = 5 * 1024**3


def llama_incompatibility(m: ModelConfig) -> str | None:
    """Why the model is not exactly a Llama (None: it is)."""
    checks = [
        (m.residual.kind != "standard", f"residual stream {m.residual.kind}"),
        (m.norm.kind != "none", f"depth scaling {m.norm.kind}"),
        (m.signal.kind != "none", f"signal scaling {m.signal.kind}"),
        (m.attention.kind not in ("mha", "gqa"), f"attention {m.attention.kind}"),
        (m.attention.qk_norm, "QK-norm"),
        (m.ffn.kind != "dense", f"feed-forward {m.ffn.kind}"),
    ]
    return next((why for bad, why in checks if bad), None)


LLAMA_NAMES = [  # ours -> transformers' Llama, per block
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
    ("mlp.w_gate.weight", "mlp.gate_proj.weight"),
    ("mlp.w_up.weight", "mlp.up_proj.weight"),
    ("mlp.w_down.weight", "mlp.down_proj.weight"),
]


def llama_weights(weights: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": weights["embed.weight"], "model.norm.weight": weights["norm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = weights["head.weight"]
    for i in range(m.n_layers):
        for ours, theirs in LLAMA_NAMES:
            out[f"model.layers.{i}.{theirs}"] = weights[f"blocks.{i}.{ours}"]
    return out


def llama_config(run: TrainedRun, dtype: str, tokenizer) -> dict:
    m, w = run.model_cfg, run.weights
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": w["blocks.0.mlp.w_gate.weight"].shape[0],
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": run.data_cfg.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": "float32" if dtype == "fp32" else "bfloat16",
    }


REMOTE_CONFIG = '''"""stabletrain's model as a transformers config (written by `python -m stabletrain.export`)."""

from transformers import PretrainedConfig


class StableTrainConfig(PretrainedConfig):
    model_type = "stabletrain"

    def __init__(self, stabletrain_model=None, **kwargs):
        self.stabletrain_model = stabletrain_model or {}
        kwargs.setdefault("use_cache", False)  # no KV cache: generation reruns the whole sequence
        super().__init__(**kwargs)
'''

REMOTE_MODELING = '''"""stabletrain's model for transformers, from `python -m stabletrain.export` (needs stabletrain).

Batches of equal-length sequences (no padding mask); generation reruns the whole sequence at each step."""

import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from stabletrain.models import build_model, model_config_from_dict

from .configuration_stabletrain import StableTrainConfig


class StableTrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = StableTrainConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(model_config_from_dict(config.stabletrain_model))
        self.post_init()

    def _init_weights(self, module):
        pass  # the weights come from the checkpoint

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
'''


def remote_config(run: TrainedRun, dtype: str, tokenizer) -> dict:
    saved = dict(run.saved["model"], vocab_size=run.model_cfg.vocab_size)
    return {
        "architectures": ["StableTrainForCausalLM"],
        "model_type": "stabletrain",
        "auto_map": {
            "AutoConfig": "configuration_stabletrain.StableTrainConfig",
            "AutoModelForCausalLM": "modeling_stabletrain.StableTrainForCausalLM",
        },
        "stabletrain_model": saved,
        "vocab_size": run.model_cfg.vocab_size,
        "max_position_embeddings": run.data_cfg.seq_len,
        "tie_word_embeddings": False,  # the weights hold both tensors; the module ties them itself
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": False,
        "dtype": "float32" if dtype == "fp32" else "bfloat16",
    }


def save_sharded(tensors: dict[str, torch.Tensor], out: Path, stem: str = "model") -> None:
    """One safetensors file, or shards of at most SHARD_BYTES with an index (the transformers layout)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # no shared storage
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / f"{stem}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export(run: TrainedRun, out: Path, fmt: str = "hf", dtype: str = "fp32") -> str:
    """Write the export; returns a one-line description of what was written."""
    if fmt not in FORMATS:
        raise StableTrainError(f"format={fmt}: unknown export format (one of: {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise StableTrainError(f"dtype={dtype}: unknown (one of: {', '.join(DTYPES)})")
    if out.exists():
        raise StableTrainError(f"out={out} already exists; choose a new directory (an export never overwrites)")
    tokenizer = hf_tokenizer(run.tokenizer_path, run.data_cfg.seq_len)
    weights = {k: v.to(DTYPES[dtype]) for k, v in run.weights.items()}
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save_pretrained(staging)
    if fmt == "safetensors":
        save_sharded(weights, staging)
        (staging / "config.yaml").write_text((run.run_dir / "config.yaml").read_text())
        shutil.copy(run.tokenizer_path, staging / "tokenizer.model")
        kind = "safetensors (stabletrain names)"
    elif (why := llama_incompatibility(run.model_cfg)) is None:
        save_sharded(llama_weights(weights, run.model_cfg), staging)
        (staging / "config.json").write_text(json.dumps(llama_config(run, dtype, tokenizer), indent=2))
        kind = "LlamaForCausalLM"
    else:
        save_sharded({f"model.{k}": v for k, v in weights.items()}, staging)
        (staging / "config.json").write_text(json.dumps(remote_config(run, dtype, tokenizer), indent=2))
        (staging / "configuration_stabletrain.py").write_text(REMOTE_CONFIG)
        (staging / "modeling_stabletrain.py").write_text(REMOTE_MODELING)
        kind = f"StableTrainForCausalLM (trust_remote_code=True; {why} is not a transformers architecture)"
    staging.rename(out)  # a complete export or none
    return f"exported step {run.step} of {run.run_dir} as {kind}, {dtype}, to {out}"
