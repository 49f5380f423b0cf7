"""Weights from HF safetensors dirs and GGUF files, materialising only what a shard needs.

Both sources speak HF tensor names (`model.layers.3.self_attn.q_proj.weight`); `load_model`
maps them onto the engine's fused layout for the layers [start, end) it was asked for.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from shoal.engine.config import ModelConfig
from shoal.engine.model import Transformer

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class WeightSource(Protocol):
    config: ModelConfig

    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsSource:
    """An HF model dir: config.json plus one or many (indexed) .safetensors files."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.config = ModelConfig.from_hf_dir(self.path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {self.path}")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    weight_map.update(dict.fromkeys(h.keys(), f.name))
        self._weight_map = weight_map
        self._handles: dict[str, Any] = {}
        self._open = safe_open

    def names(self) -> set[str]:
        return set(self._weight_map)

    def get(self, name: str) -> torch.Tensor:
        file = self._weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.path / file, "pt")
        return self._handles[file].get_tensor(name)


class GGUFSource:
    """A GGUF file; quantised tensors are dequantised to float32 with the `gguf` package."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self._gguf = gguf
        self.reader = gguf.GGUFReader(self.path)
        self.metadata = read_gguf_metadata(self.reader)
        self._tensors = {_gguf_to_hf_name(t.name): t for t in self.reader.tensors}
        self.config = ModelConfig.from_gguf_fields(
            self.metadata, has_output_weight="lm_head.weight" in self._tensors
        )

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        array = self._gguf.quants.dequantize(t.data, t.tensor_type)
        if not array.flags.writeable:  # unquantised tensors are views into the read-only mmap
            array = array.copy()
        tensor = torch.from_numpy(array.reshape([int(d) for d in reversed(t.shape)]))
        # llama.cpp interleaves Q/K rows for its RoPE kernel on llama-style models; undo it so
        # the weights match HF's half-split rotary layout.
        c = self.config
        if c.arch in ("llama", "mistral"):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                tensor = _unpermute_rows(tensor, c.num_heads)
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                tensor = _unpermute_rows(tensor, c.num_kv_heads)
        return tensor


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/value fields as plain Python values; big arrays (the vocab) only by length."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.data) > 1:  # an array field: converting 50k token strings costs seconds
            out[key + ".length"] = len(field.data)
            continue
        try:
            out[key] = field.contents()
        except Exception:  # an unreadable field is metadata we do not use
            continue
    return out


def _gguf_to_hf_name(name: str) -> str:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES.get(part, part)}.{kind}"
    base, _, kind = name.rpartition(".")
    return f"{_GGUF_GLOBAL_NAMES.get(base, base)}.{kind}"


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def open_source(path: str | Path) -> WeightSource:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return GGUFSource(p)
    if p.is_dir() and (p / "config.json").exists():
        return SafetensorsSource(p)
    raise FileNotFoundError(
        f"{p} is neither a .gguf file nor an HF model dir with config.json and .safetensors"
    )


def shard_state_dict(
    source: WeightSource, layer_range: tuple[int, int], first: bool, last: bool
) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (engine param name, tensor) for the given layers and stage ends only."""
    c = source.config
    names = source.names()
    if first:
        yield "embed.weight", source.get("model.embed_tokens.weight")
    for local, layer in enumerate(range(*layer_range)):
        hf, ours = f"model.layers.{layer}.", f"layers.{local}."
        qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        yield ours + "attention.wqkv.weight", torch.cat([source.get(n + ".weight") for n in qkv])
        if c.attention_bias:
            yield ours + "attention.wqkv.bias", torch.cat([source.get(n + ".bias") for n in qkv])
        yield ours + "attention.wo.weight", source.get(hf + "self_attn.o_proj.weight")
        if c.qk_norm:
            yield ours + "attention.q_norm.weight", source.get(hf + "self_attn.q_norm.weight")
            yield ours + "attention.k_norm.weight", source.get(hf + "self_attn.k_norm.weight")
        gate_up = [source.get(hf + f"mlp.{p}_proj.weight") for p in ("gate", "up")]
        yield ours + "feed_forward.w13.weight", torch.cat(gate_up)
        yield ours + "feed_forward.w2.weight", source.get(hf + "mlp.down_proj.weight")
        yield ours + "attention_norm.weight", source.get(hf + "input_layernorm.weight")
        yield ours + "ffn_norm.weight", source.get(hf + "post_attention_layernorm.weight")
    if last:
        yield "norm.weight", source.get("model.norm.weight")
        head = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
        yield "lm_head.weight", source.get(head)


def release_freed_memory() -> None:
    """Hand memory freed after loading back to the OS.

    Dequantising fills the heap with short-lived arrays; glibc keeps those pages mapped after
    they are freed, which would leave hundreds of MB of dead weight in the node's RSS.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def default_dtype(device: torch.device | str) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    path: str | Path,
    layer_range: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    source: WeightSource | None = None,
) -> Transformer:
    """Build the model (or the shard holding layers [start, end)) with its weights loaded."""
    source = source or open_source(path)
    config = source.config
    layer_range = layer_range or (0, config.num_layers)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(config, layer_range)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in shard_state_dict(source, layer_range, model.is_first, model.is_last):
        # Tied embeddings on one stage share one tensor rather than holding two copies.
        if name == "lm_head.weight" and "embed.weight" in state and config.tie_word_embeddings:
            state[name] = state["embed.weight"]
            continue
        state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
