"""Model configuration for the Llama family, read from HF `config.json` or GGUF metadata."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
# GGUF's architecture names where they differ; a "llama" GGUF with experts is Mixtral.
_GGUF_ARCHS = {"qwen3moe": "qwen3_moe"}


class UnsupportedModelError(ValueError):
    """The model's architecture or a config value is outside what the engine implements."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style rope scaling dict ({"rope_type": "llama3"|"linear"|"yarn", ...}) or None.
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (qwen3_moe, mixtral): 0 experts is a dense model. Each token goes to
    # the top `experts_per_token` experts by softmax of the router's logits, weighted by those
    # probabilities (renormalised over the chosen ones with norm_topk_prob).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    sparse_step: int = 1  # qwen3_moe decoder_sparse_step: every n-th layer is sparse
    dense_layers: tuple[int, ...] = ()  # qwen3_moe mlp_only_layers

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0
            and layer not in self.dense_layers
            and (layer + 1) % self.sparse_step == 0
        )

    @property
    def has_dense_layers(self) -> bool:
        return not all(self.is_moe_layer(i) for i in range(self.num_layers))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        arch = str(d.get("model_type", "llama"))
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        # transformers 5 nests theta and scaling in rope_parameters; older configs keep them flat.
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
        return cls(
            arch=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=_normalise_scaling(scaling),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            num_experts=experts,
            experts_per_token=int(d.get("num_experts_per_tok") or 0) if experts else 0,
            # Mixtral's experts are as wide as its intermediate_size
            expert_intermediate_size=int(
                d.get("moe_intermediate_size") or d["intermediate_size"] if experts else 0
            ),
            # Mixtral always renormalises its top-k; qwen3_moe says so in its config
            norm_topk_prob=bool(d.get("norm_topk_prob", False)) if arch == "qwen3_moe" else True,
            sparse_step=int(d.get("decoder_sparse_step") or 1),
            dense_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))

    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any], has_output_weight: bool) -> ModelConfig:
        """`meta` maps GGUF keys to plain values (see weights.read_gguf_metadata)."""
        gguf_arch = str(meta["general.architecture"])
        arch = _GGUF_ARCHS.get(gguf_arch, gguf_arch)
        if arch == "llama" and meta.get("llama.expert_count"):
            arch = "mixtral"
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"GGUF architecture {gguf_arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{gguf_arch}.{key}", default)

        hidden = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length") or get("rope.dimension_count") or 0)
        vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens.length")
        scaling = None
        if (kind := get("rope.scaling.type")) and kind != "none":
            scaling = {
                "rope_type": kind,
                "factor": get("rope.scaling.factor", 1.0),
                "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            }
        eos = meta.get("tokenizer.ggml.eos_token_id")
        experts = int(get("expert_count") or 0)
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length") or get("expert_feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv") or num_heads),
            head_dim=head_dim or hidden // num_heads,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=_normalise_scaling(scaling),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2",
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            num_experts=experts,
            experts_per_token=int(get("expert_used_count") or 0) if experts else 0,
            expert_intermediate_size=int(
                get("expert_feed_forward_length") or get("feed_forward_length") if experts else 0
            ),
            # llama.cpp renormalises the chosen experts' weights for both families
            norm_topk_prob=bool(get("expert_weights_norm", True)),
        )


def _normalise_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("linear", "llama3", "yarn"):
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")
    return {**scaling, "rope_type": kind}


def rope_tables(config: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [max_positions, head_dim] in the HF half-split layout."""
    import torch  # here, not at the top: the node reads configs without loading torch

    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    attention_factor = 1.0
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(config, scaling)
    positions = torch.arange(max_positions, dtype=torch.float64)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attention_factor).float(), (emb.sin() * attention_factor).float()


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    import torch

    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_context = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated, short ones kept, and the band between blended.
    smooth = ((old_context / wavelen) - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    mid = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(mid, blended, out)


def _yarn_inv_freq(config: ModelConfig, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    import torch

    dim, base = config.head_dim, config.rope_theta
    original = float(s.get("original_max_position_embeddings") or config.max_position_embeddings)
    factor = float(s.get("factor") or config.max_position_embeddings / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(float(s.get("beta_fast") or 32))
    high = correction_dim(float(s.get("beta_slow") or 1))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    # Low-frequency dims are interpolated (divided by factor), high-frequency ones kept.
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * (1 - ramp)
    return inv_freq, float(attention_factor)
