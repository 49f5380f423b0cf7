"""Weights that stay quantized in memory, and the linear layers that multiply by them.

A GGUF Q4_0, Q4_1 or Q4_K tensor is 4-bit groups of 32 with a scale and a minimum each; that is
exactly torch's int4 weight-only layout (w = (q - 8) * scale + zero), so those load without
loss. Q8_0, Q5_K, Q6_K (and `--quantize int8` of a dense weight) become int8 with one scale per
output row: 8 bits keep them within a fraction of their own rounding error, and torch's int8
weight-only kernel is the fastest CPU matmul we measured (bench/quant_kernels.py).

Both CPU kernels want bfloat16 activations (with float32 ones they run 10-20x slower), so the
layers cast the input to bfloat16 for the matmul and the output back: norms, attention and the
residual stream stay in the model's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.engine.footprint import GROUP, INT4_TYPES

_INT8_CHUNK = 4096  # rows converted at a time: bounds the float32 copies a conversion makes


class QuantizationError(ValueError):
    """A weight cannot be kept in the quantized layout asked for."""


@dataclasses.dataclass
class QuantWeight:
    """A weight matrix [out, in] kept quantized.

    bits 4: q holds 0..15 per weight (uint8, [out, in]), scale and zero [out, in / group],
    w = (q - 8) * scale + zero. bits 8: q is int8 [out, in], scale [out], w = q * scale.
    It slices and concatenates by rows like a tensor, so sharding treats both alike.
    """

    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group: int = GROUP

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        """Resident bytes once packed: 4 bits a weight plus bf16 scale and zero per group, or
        8 bits a weight plus a bf16 scale per row."""
        n, k = self.q.shape
        return n * k // 2 + n * (k // self.group) * 4 if self.bits == 4 else n * k + n * 2

    def _map_rows(self, f: Any) -> QuantWeight:
        zero = None if self.zero is None else f(self.zero)
        return dataclasses.replace(self, q=f(self.q), scale=f(self.scale), zero=zero)

    def rows(self, index: torch.Tensor) -> QuantWeight:
        return self._map_rows(lambda t: t[index])

    def narrow(self, dim: int, start: int, length: int) -> QuantWeight:
        if dim == 0:
            return self._map_rows(lambda t: t.narrow(0, start, length))
        if self.bits == 8:
            return dataclasses.replace(self, q=self.q.narrow(1, start, length))
        if start % self.group or length % self.group:
            raise QuantizationError(
                f"a 4-bit weight splits only on its {self.group}-column groups, not at "
                f"columns {start}..{start + length}"
            )
        g0, gn = start // self.group, length // self.group
        return dataclasses.replace(
            self,
            q=self.q.narrow(1, start, length),
            scale=self.scale.narrow(1, g0, gn),
            zero=None if self.zero is None else self.zero.narrow(1, g0, gn),
        )

    def split(self, sizes: list[int]) -> list[QuantWeight]:
        starts = np.cumsum([0, *sizes[:-1]])
        return [self.narrow(0, int(s), n) for s, n in zip(starts, sizes, strict=True)]

    def chunk(self, n: int) -> list[QuantWeight]:
        return self.split([self.shape[0] // n] * n)

    def clone(self) -> QuantWeight:
        return self._map_rows(lambda t: t.clone())

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix the quantized one stands for (tests and the CUDA fallback)."""
        if self.bits == 8:
            return self.q.float() * self.scale.float()[:, None]
        assert self.zero is not None
        scale = self.scale.float().repeat_interleave(self.group, 1)
        zero = self.zero.float().repeat_interleave(self.group, 1)
        return (self.q.float() - 8) * scale + zero

    @classmethod
    def int8(
        cls, w: torch.Tensor | Callable[[int, int], torch.Tensor], rows: int = 0
    ) -> QuantWeight:
        """Symmetric int8 with one scale per row, from a float matrix, or from a function
        (start, stop) -> those rows as float: a big matrix (a 150k-token embedding) is then
        converted a slice at a time instead of being held whole in float32."""
        if isinstance(w, torch.Tensor):
            matrix, rows = w, w.shape[0]
            w = lambda a, b: matrix[a:b]  # noqa: E731
        qs, scales = [], []
        for start in range(0, rows, _INT8_CHUNK):
            part = w(start, min(rows, start + _INT8_CHUNK)).float()
            scale = (part.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            qs.append(torch.round(part / scale[:, None]).clamp(-127, 127).to(torch.int8))
            scales.append(scale)
        return cls(8, torch.cat(qs), torch.cat(scales))


def cat_rows(parts: list[Any]) -> Any:
    """torch.cat along rows for tensors and QuantWeights alike (q|k|v, gate|up)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    weights = [p if isinstance(p, QuantWeight) else QuantWeight.int8(p) for p in parts]
    if len({w.bits for w in weights}) > 1:  # e.g. Q4_K q/k with a Q6_K v: meet at int8
        weights = [w if w.bits == 8 else QuantWeight.int8(w.dequantize()) for w in weights]
    first = weights[0]
    zero = None if first.zero is None else torch.cat([w.zero for w in weights])
    return dataclasses.replace(
        first,
        q=torch.cat([w.q for w in weights]),
        scale=torch.cat([w.scale for w in weights]),
        zero=zero,
    )


# --- GGUF blocks -> QuantWeight ------------------------------------------------------------


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32).reshape(-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16k] packed bytes -> [..., 32k]: low nibbles first, then high (GGUF's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _int4_from_blocks(qtype: str, blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """(q [n, 32], scale [n], zero [n]) for every 32-weight group of the blocks."""
    if qtype == "Q4_0":  # d, 16 bytes: w = d * (q - 8)
        d = _f16(blocks, 0)
        return _nibbles(blocks[:, 2:]), d, np.zeros_like(d)
    if qtype == "Q4_1":  # d, m, 16 bytes: w = d * q + m
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        return _nibbles(blocks[:, 4:]), d, m + 8 * d
    # Q4_K: super-blocks of 256 = 8 groups; d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes
    # of 4-bit weights; w = d * sc * q - dmin * mn.
    from gguf.quants import Q4_K

    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
    scale = (d[:, None] * sc.astype(np.float32)).reshape(-1)
    low = (dmin[:, None] * mn.astype(np.float32)).reshape(-1)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n * 8, 32)
    return q, scale, 8 * scale - low


def from_gguf(qtype: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantWeight:
    """A GGUF tensor of `qtype` (raw: its bytes, [rows, bytes per row]) as a QuantWeight."""
    import gguf

    rows, cols = shape
    if qtype in INT4_TYPES:
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
        blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
        q, scale, zero = _int4_from_blocks(qtype, blocks)
        groups = cols // GROUP
        return QuantWeight(
            4,
            torch.from_numpy(q.reshape(rows, cols)),
            torch.from_numpy(scale.reshape(rows, groups)),
            torch.from_numpy(zero.reshape(rows, groups)),
        )
    kind = gguf.GGMLQuantizationType[qtype]
    raw = raw.reshape(rows, -1)

    def dequantized(start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw[start:stop], kind)))

    return QuantWeight.int8(dequantized, rows)


# --- layers --------------------------------------------------------------------------------


def keeps_quantized(device: torch.device | str, quantize: str) -> bool:
    """Whether quantised weights load as they are stored (the CPU kernels) or dequantised
    (--quantize none, and GPUs: the CPU kernels' layouts do not carry over)."""
    return torch.device(device).type == "cpu" and quantize != "none"


class DenseLinear(nn.Module):
    """y = x W^T + b with W in its own dtype (bf16 safetensors stay bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype:
            return F.linear(x, w, self.bias)
        y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Linear(nn.Module):
    """Weight-only int8 (one scale per output row) with torch's int8 kernel."""

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("q", w.q.contiguous())
        self.register_buffer("scale", w.scale.to(torch.bfloat16))
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.q, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], self.q.shape[0])
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """Weight-only int4 in groups of 32 with torch's CPU int4 kernel."""

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        assert w.zero is not None
        self.out, self.group = w.shape[0], w.group
        self.register_buffer(
            "packed", torch._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
        )
        scales_zeros = torch.stack([w.scale.t(), w.zero.t()], dim=-1)  # [in / group, out, 2]
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16).contiguous())
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out)
        return y if self.bias is None else y + self.bias


def int4_packable(w: QuantWeight) -> bool:
    # The CPU int4 pack wants the output rows in 16s.
    return w.bits == 4 and w.shape[0] % 16 == 0


def make_linear(
    weight: torch.Tensor | QuantWeight,
    bias: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str = "auto",
) -> nn.Module:
    """The layer for one weight: quantized kernels on the CPU, dense elsewhere.

    dtype is the model's compute dtype (the bias and, for dense float32 sources, the weight).
    On GPUs the weights are dequantized to `dtype`: the CPU kernels' layouts do not carry over.
    """
    if bias is not None:
        bias = bias.to(device=device, dtype=dtype)
    if isinstance(weight, torch.Tensor):
        if quantize == "int8" and device.type == "cpu":
            return Int8Linear(QuantWeight.int8(weight), bias)
        # A 16-bit source stays 16-bit (half the bytes, the same speed as float32 on the CPU).
        keep = weight.dtype in (torch.bfloat16, torch.float16) and quantize == "auto"
        return DenseLinear(weight.to(device=device, dtype=weight.dtype if keep else dtype), bias)
    if not keeps_quantized(device, quantize):
        return DenseLinear(weight.dequantize().to(device=device, dtype=dtype), bias)
    if weight.bits == 4 and not int4_packable(weight):
        weight = QuantWeight.int8(weight.dequantize())
    return Int4Linear(weight, bias) if weight.bits == 4 else Int8Linear(weight, bias)


class CastEmbedding(nn.Module):
    """A 16-bit embedding table kept 16-bit; rows come out in the compute dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)


class QuantEmbedding(nn.Module):
    """Token embedding rows kept int8 (one scale per token); the tied LM head reads the same
    bytes through `head()`."""

    def __init__(self, w: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = Int8Linear(w if w.bits == 8 else QuantWeight.int8(w.dequantize()))
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        return t.q[ids].to(self.dtype) * t.scale[ids].to(self.dtype).unsqueeze(-1)

    def head(self) -> Int8Linear:
        return self.table


def module_bytes(module: nn.Module) -> int:
    """Resident bytes of a module's parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
