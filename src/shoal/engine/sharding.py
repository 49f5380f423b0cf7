"""Splitting one model across ranks, applied to the plain model from outside (gpt-fast style).

Pipeline: rank r holds a contiguous range of layers; that is `Transformer(config, layer_range)`
and `load_model(path, layer_range)` already, `even_layer_ranges` cuts a model evenly.

Tensor parallel: every rank holds every layer, with its share of the heads and of the feed
forward width. wqkv and w13 are split by rows (column-parallel: each rank computes its own
heads and its own slice of the SwiGLU), wo and w2 by columns (row-parallel: each rank's output
is a partial sum), and `Block.reduce` all-reduces those partial sums before the residual adds.
The embedding, the norms and the LM head are replicated; only rank 0 keeps the head, since
only rank 0 samples. A mixture-of-experts layer is split by experts instead: each rank holds
whole experts, a contiguous share, and a replicated router; every rank routes every token the
same way and adds only its own experts' outputs, and the same all-reduce sums them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import torch

from shoal.engine.config import ModelConfig
from shoal.engine.model import MoE, Transformer
from shoal.engine.quant import QuantWeight, cat_rows, keeps_quantized
from shoal.engine.weights import (
    WeightSource,
    assign_weights,
    default_dtype,
    open_source,
    shard_state_dict,
)

Weight = torch.Tensor | QuantWeight


class ShardingError(ValueError):
    """The model cannot be split the way the plan asks."""


def even_layer_ranges(num_layers: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per rank, sizes differing by at most one."""
    if not 1 <= world_size <= num_layers:
        raise ShardingError(f"cannot cut {num_layers} layers into {world_size} pipeline stages")
    base, extra = divmod(num_layers, world_size)
    ranges, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def tensor_parallel_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config one rank's slices follow: heads, KV heads and FFN width divided by world."""
    if world_size < 1:
        raise ShardingError(f"world size must be at least 1, not {world_size}")
    splits = {
        "attention heads": config.num_heads,
        "KV heads": config.num_kv_heads,
    }
    if config.has_dense_layers:
        splits["feed-forward (intermediate) size"] = config.intermediate_size
    if config.num_experts:  # each rank holds whole experts, a share of them
        splits["experts"] = config.num_experts
    bad = [f"{name} {n}" for name, n in splits.items() if n % world_size]
    if bad:
        raise ShardingError(
            f"tensor parallelism over {world_size} ranks needs the {', '.join(splits)} to "
            f"divide by {world_size}; this {config.arch} model has {', '.join(bad)} (try "
            "another rank count, or a pipeline)"
        )
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // world_size,
        num_kv_heads=config.num_kv_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
    )


def _part(t: Weight, rank: int, world: int, dim: int) -> Weight:
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size)


def tensor_slice(name: str, tensor: Weight, config: ModelConfig, rank: int, world: int) -> Weight:
    """Rank `rank`'s share of one engine parameter (the full model's config); a quantized
    matrix is sliced in its quantized form."""
    kind = re.sub(r"^layers\.\d+\.", "", name)
    if kind in ("attention.wqkv.weight", "attention.wqkv.bias"):
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return cat_rows([_part(p, rank, world, 0) for p in tensor.split([q, kv, kv])])
    if kind == "feed_forward.w13.weight":  # gate | up, each split on its own
        return cat_rows([_part(p, rank, world, 0) for p in tensor.chunk(2)])
    if kind in ("attention.wo.weight", "feed_forward.w2.weight"):
        return _part(tensor, rank, world, 1).clone()  # a copy frees the full tensor
    return tensor  # embedding, norms, q/k norms (per head_dim), LM head: replicated


def load_tensor_shard(
    path: str | Path,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    source: WeightSource | None = None,
    quantize: str = "auto",
) -> Transformer:
    """Rank `rank`'s slices of every layer; the LM head only on rank 0 (the sampler).

    Reading one full tensor at a time, slicing it and dropping the rest keeps the peak near
    one full tensor above the shard. The result still needs `attach_reduce` before it runs.
    """
    source = source or open_source(path)
    full = source.config
    local = tensor_parallel_config(full, world_size)
    dtype = dtype or default_dtype(device)
    keep_head = rank == 0
    with torch.device("meta"):
        model = Transformer(local)
    if not keep_head:
        model.norm = model.lm_head = None
        model.is_last = False  # forward returns the hidden states, which nobody reads
    experts = None
    if full.num_experts:  # whole experts, a contiguous share of them per rank
        share = full.num_experts // world_size
        experts = range(rank * share, (rank + 1) * share)
        for block in model.layers:
            if isinstance(block.feed_forward, MoE):
                block.feed_forward.keep(rank, world_size)
    quantized = keeps_quantized(device, quantize)
    weights = shard_state_dict(source, (0, full.num_layers), True, keep_head, quantized, experts)
    parts = ((n, tensor_slice(n, t, full, rank, world_size)) for n, t in weights)
    return assign_weights(model, parts, device, dtype, quantize)


def attach_reduce(model: Transformer, reduce: Callable[[torch.Tensor], object]) -> None:
    """Make every block all-reduce its attention and feed-forward outputs in place."""
    for block in model.layers:
        block.reduce = reduce
