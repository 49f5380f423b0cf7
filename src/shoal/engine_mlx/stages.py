"""Pipeline stages for mlx-lm models whose own classes cannot `pipeline` (llama, qwen3, mistral:
a plain stack of layers between the embedding and the final norm).

This rank keeps only its layers. Its first layer takes the previous stage's activations instead
of the embedding's, its last one sends its activations on, and every rank then gathers the
last stage's output: the protocol of mlx-lm's own PipelineMixin (mlx rank size-1 holds the
first layers, mlx rank 0 the last), so both kinds of model run the same way in lockstep.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


class _Received(nn.Module):
    """A stage's first layer: its input is what the stage before sent."""

    def __init__(self, layer: nn.Module, group: Any, src: int) -> None:
        super().__init__()
        self.layer = layer
        self.use_sliding = getattr(layer, "use_sliding", False)  # llama's per-layer mask choice
        self._group, self._src = group, src

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        x = mx.distributed.recv_like(x, self._src, group=self._group)
        return self.layer(x, *args, **kwargs)


class _Sent(nn.Module):
    """A stage's last layer: send its output on (unless it is the last stage), then every rank
    takes the last stage's output from one all_gather."""

    def __init__(self, layer: nn.Module, group: Any, dst: int | None) -> None:
        super().__init__()
        self.layer = layer
        self.use_sliding = getattr(layer, "use_sliding", False)
        self._group, self._dst = group, dst

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        h = self.layer(x, *args, **kwargs)
        if self._dst is not None:
            h = mx.distributed.send(h, self._dst, group=self._group)
            cache = kwargs.get("cache")
            if cache is not None:  # a prefill chunk evaluates only the cache: send with it
                cache.keys = mx.depends(cache.keys, h)
        return mx.distributed.all_gather(h, group=self._group)[: h.shape[0]]


def stage(model: Any, group: Any, start: int, end: int) -> None:
    """Keep layers [start, end) of `model` (shoal's layer numbers) as this mlx rank's stage."""
    inner = model.model
    rank, size = group.rank(), group.size()
    layers = list(inner.layers[start:end])
    if rank < size - 1:  # an earlier stage (a higher mlx rank) feeds this one
        layers[0] = _Received(layers[0], group, rank + 1)
    layers[-1] = _Sent(layers[-1], group, rank - 1 if rank > 0 else None)
    inner.layers = layers
    if hasattr(inner, "fa_idx"):  # llama indexes its cache by layer to build the masks
        sliding = [bool(getattr(layer, "use_sliding", False)) for layer in layers]
        inner.fa_idx = next((i for i, s in enumerate(sliding) if not s), 0)
        inner.swa_idx = next((i for i, s in enumerate(sliding) if s), None)
