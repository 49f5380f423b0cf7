"""Weights from HF safetensors dirs and GGUF files, materialising only what a shard needs.

Both sources speak HF tensor names (`model.layers.3.self_attn.q_proj.weight`); `load_model`
maps them onto the engine's fused layout for the layers [start, end) it was asked for.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from shoal.engine.config import ModelConfig
from shoal.engine.gguf_file import GGUFFile, gguf_to_hf_name
from shoal.engine.model import Transformer
from shoal.engine.quant import (
    CastEmbedding,
    DenseLinear,
    QuantEmbedding,
    QuantWeight,
    cat_rows,
    from_gguf,
    keeps_quantized,
    make_linear,
)

# Mixtral's HF names for what qwen3_moe (and the engine) call the router and experts' parts.
_MIXTRAL_NAMES = {
    "block_sparse_moe.gate.": "mlp.gate.",
    "block_sparse_moe.experts.": "mlp.experts.",
    ".w1.weight": ".gate_proj.weight",
    ".w3.weight": ".up_proj.weight",
    ".w2.weight": ".down_proj.weight",
}


def _hf_moe_name(name: str) -> str:
    if "block_sparse_moe." not in name:
        return name
    for old, new in _MIXTRAL_NAMES.items():
        name = name.replace(old, new)
    return name


class WeightSource(Protocol):
    config: ModelConfig

    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float (dequantized)."""

    def get_weight(self, name: str) -> torch.Tensor | QuantWeight:
        """The tensor as stored: a quantized matrix stays quantized."""


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
        self._stored = {_hf_moe_name(n): n for n in weight_map}  # one naming for experts
        self._handles: dict[str, Any] = {}
        self._open = safe_open

    def names(self) -> set[str]:
        return set(self._stored)

    def get(self, name: str) -> torch.Tensor:
        stored = self._stored[name]
        file = self._weight_map[stored]
        if file not in self._handles:
            self._handles[file] = self._open(self.path / file, "pt")
        return self._handles[file].get_tensor(stored)

    get_weight = get


class GGUFSource:
    """A GGUF file: `get` dequantises to float32 with the `gguf` package, `get_weight` keeps a
    quantised matrix quantised (engine.quant)."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self._gguf = gguf
        self.reader = GGUFFile(self.path)
        self.metadata = self.reader.metadata
        # (tensor, expert): a 3-D stack of experts is served as one matrix per expert, under
        # the per-expert HF name (model.layers.3.mlp.experts.5.up_proj.weight)
        self._tensors: dict[str, tuple[Any, int | None]] = {}
        for t in self.reader.tensors:
            name = gguf_to_hf_name(t.name)
            if len(t.shape) == 3 and ".mlp.experts." in name:
                head, part, _ = name.rsplit(".", 2)  # model.layers.3.mlp.experts, up_proj
                for e in range(int(t.shape[2])):
                    self._tensors[f"{head}.{e}.{part}.weight"] = (t, e)
            else:
                self._tensors[name] = (t, None)
        config = ModelConfig.from_gguf_fields(
            self.metadata, has_output_weight="lm_head.weight" in self._tensors
        )
        if config.num_experts:  # GGUF has no mlp_only_layers: a layer without a router is dense
            dense = (
                i
                for i in range(config.num_layers)
                if f"model.layers.{i}.mlp.gate.weight" not in self._tensors
            )
            config = dataclasses.replace(config, dense_layers=tuple(dense))
        self.config = config

    def names(self) -> set[str]:
        return set(self._tensors)

    def _data(self, name: str) -> tuple[Any, Any, list[int]]:
        """(tensor, its bytes or values, its HF shape) of one name (one expert of a stack)."""
        t, expert = self._tensors[name]
        shape = [int(d) for d in reversed(t.shape)]
        if expert is None:
            return t, t.data, shape
        return t, t.data[expert], shape[1:]

    def get(self, name: str) -> torch.Tensor:
        t, data, shape = self._data(name)
        array = self._gguf.quants.dequantize(data, t.tensor_type)
        if not array.flags.writeable:  # unquantised tensors are views into the read-only mmap
            array = array.copy()
        return self._hf_rows(name, torch.from_numpy(array.reshape(shape)))

    def get_weight(self, name: str) -> torch.Tensor | QuantWeight:
        t, data, shape = self._data(name)
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16") or len(shape) != 2:
            return self.get(name)
        return self._hf_rows(name, from_gguf(kind, data, (shape[0], shape[1])))

    def _hf_rows(self, name: str, w: Any) -> Any:
        # llama.cpp interleaves Q/K rows for its RoPE kernel on llama-style models; undo it so
        # the weights match HF's half-split rotary layout.
        c = self.config
        if c.arch in ("llama", "mistral", "mixtral"):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                return _unpermute_rows(w, c.num_heads)
            if name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                return _unpermute_rows(w, c.num_kv_heads)
        return w


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


def _unpermute_rows(w: Any, num_heads: int) -> Any:
    rows = w.shape[0]
    order = torch.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).transpose(1, 2)
    return w.rows(order.reshape(-1)) if isinstance(w, QuantWeight) else w[order.reshape(-1)]


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
    source: WeightSource,
    layer_range: tuple[int, int],
    first: bool,
    last: bool,
    quantized: bool = True,
    experts: range | None = None,
) -> Iterable[tuple[str, torch.Tensor | QuantWeight]]:
    """Yield (engine param name, weight) for the given layers and stage ends only.

    With `quantized`, matrices come as the source stores them (a GGUF's quantised ones as
    QuantWeight), else dequantised. A layer's bias comes before its weight, so the loader can
    build each layer as it arrives. `experts`: the experts a tensor-parallel rank holds
    (default: all), by their index in the whole model.
    """
    c = source.config
    names = source.names()
    get = source.get_weight if quantized else source.get
    if first:
        yield "embed.weight", get("model.embed_tokens.weight")
    for local, layer in enumerate(range(*layer_range)):
        hf, ours = f"model.layers.{layer}.", f"layers.{local}."
        qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        if c.attention_bias:
            yield ours + "attention.wqkv.bias", torch.cat([source.get(n + ".bias") for n in qkv])
        yield ours + "attention.wqkv.weight", cat_rows([get(n + ".weight") for n in qkv])
        yield ours + "attention.wo.weight", get(hf + "self_attn.o_proj.weight")
        if c.qk_norm:
            yield ours + "attention.q_norm.weight", source.get(hf + "self_attn.q_norm.weight")
            yield ours + "attention.k_norm.weight", source.get(hf + "self_attn.k_norm.weight")
        if c.is_moe_layer(layer):
            yield ours + "feed_forward.router.weight", get(hf + "mlp.gate.weight")
            for i, e in enumerate(experts or range(c.num_experts)):  # i: its index on this rank
                mlp, ff = f"{hf}mlp.experts.{e}.", f"{ours}feed_forward.experts.{i}."
                gate_up = [get(f"{mlp}{p}_proj.weight") for p in ("gate", "up")]
                yield ff + "w13.weight", cat_rows(gate_up)
                yield ff + "w2.weight", get(mlp + "down_proj.weight")
        else:
            gate_up = [get(hf + f"mlp.{p}_proj.weight") for p in ("gate", "up")]
            yield ours + "feed_forward.w13.weight", cat_rows(gate_up)
            yield ours + "feed_forward.w2.weight", get(hf + "mlp.down_proj.weight")
        yield ours + "attention_norm.weight", source.get(hf + "input_layernorm.weight")
        yield ours + "ffn_norm.weight", source.get(hf + "post_attention_layernorm.weight")
    if last:
        yield "norm.weight", source.get("model.norm.weight")
        if first and c.tie_word_embeddings:
            return  # the loader ties the head to the embedding: one copy of the matrix
        head = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
        yield "lm_head.weight", get(head)


def assign_weights(
    model: Transformer,
    weights: Iterable[tuple[str, torch.Tensor | QuantWeight]],
    device: torch.device | str,
    dtype: torch.dtype,
    quantize: str = "auto",
) -> Transformer:
    """Fill a model built on the meta device, one weight at a time: each linear becomes the
    layer its weight calls for (engine.quant.make_linear) as soon as it arrives, so at most
    one unpacked weight is held beside the packed model."""
    device = torch.device(device)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    biases: dict[str, torch.Tensor] = {}
    for name, weight in weights:
        path, _, kind = name.rpartition(".")
        if path in linears and kind == "bias":
            biases[path] = weight  # type: ignore[assignment]
        elif path in linears:
            _set(model, path, make_linear(weight, biases.pop(path, None), device, dtype, quantize))
        elif path == "embed":
            model.embed = make_embedding(weight, device, dtype, quantize)
        else:
            assert isinstance(weight, torch.Tensor), name
            param = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
            _set(model, name, param)
    if model.is_last and isinstance(model.lm_head, nn.Linear):  # tied: the embedding's bytes
        embed = model.embed
        model.lm_head = (
            embed.head() if isinstance(embed, QuantEmbedding) else DenseLinear(embed.weight)
        )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"the weights do not fill the model: {', '.join(left[:5])} missing")
    return model.eval()


def make_embedding(
    weight: torch.Tensor | QuantWeight, device: torch.device, dtype: torch.dtype, quantize: str
) -> nn.Module:
    """A quantised embedding (or any one with --quantize int8) stays 8-bit on the CPU."""
    if keeps_quantized(device, quantize):
        if isinstance(weight, QuantWeight):
            return QuantEmbedding(weight, dtype)
        if quantize == "int8":
            return QuantEmbedding(QuantWeight.int8(weight), dtype)
    if isinstance(weight, QuantWeight):
        weight = weight.dequantize()
    if weight.dtype in (torch.float16, torch.bfloat16) and quantize == "auto":
        return CastEmbedding(weight.to(device), dtype)  # 16-bit stays 16-bit, as the linears
    return nn.Embedding.from_pretrained(weight.to(device=device, dtype=dtype), freeze=True)


def _set(model: nn.Module, path: str, value: nn.Module | nn.Parameter) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


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


def bound_heap_growth() -> None:
    """Serve big allocations from their own mappings, returned to the OS when freed.

    glibc raises its mmap threshold after each large free, so loading (a float32 copy of one
    matrix after another) would grow the heap by every transient; a fixed 128 KiB threshold
    keeps the load's peak near the packed model (measured: 527 vs 665 MB for the bundled
    model)."""
    M_MMAP_THRESHOLD = -3
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: its allocator decides
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
    quantize: str = "auto",
) -> Transformer:
    """Build the model (or the shard holding layers [start, end)) with its weights loaded.

    quantize: "auto" keeps a GGUF's quantisation (and 16-bit safetensors 16-bit), "int8"
    also quantises dense matrices at load, "none" dequantises everything to `dtype`.
    """
    source = source or open_source(path)
    config = source.config
    layer_range = layer_range or (0, config.num_layers)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(config, layer_range)
    quantized = keeps_quantized(device, quantize)
    weights = shard_state_dict(source, layer_range, model.is_first, model.is_last, quantized)
    return assign_weights(model, weights, device, dtype, quantize)
