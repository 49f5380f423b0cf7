"""A plain decoder-only transformer for the Llama family (llama, mistral, qwen2, qwen3).

The model knows nothing about ranks: it holds a contiguous range of layers, plus the embedding
when it is the first stage and the final norm and LM head when it is the last. Pipeline and
tensor sharding build on that (gpt-fast style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shoal.engine.config import ModelConfig, rope_tables
from shoal.engine.kvcache import KVCache


@dataclass
class Step:
    """Where one forward pass reads and writes: rows [row0, row0+B) of the cache.

    input_pos: [B, T] positions of the new tokens; kv_len: how many cache positions attention
    reads; mask: [B, 1, T, kv_len] (True = attend) or None when every row sees all of kv_len.
    When every row writes the same contiguous positions from `start`, rows is None; otherwise
    rows indexes the batch for a scattered one-token write.
    """

    row0: int
    input_pos: torch.Tensor
    kv_len: int
    mask: torch.Tensor | None
    start: int = 0
    rows: torch.Tensor | None = None

    @classmethod
    def prefill(
        cls, slot: int, start: int, length: int, device: torch.device | str = "cpu"
    ) -> Step:
        pos = torch.arange(start, start + length, device=device)
        kv = torch.arange(start + length, device=device)
        mask = (kv[None, :] <= pos[:, None])[None, None]
        return cls(slot, pos[None], start + length, mask, start=start)

    @classmethod
    def decode(cls, positions: list[int], device: torch.device | str = "cpu") -> Step:
        pos = torch.tensor(positions, device=device)
        kv_len = max(positions) + 1
        if min(positions) == kv_len - 1:  # all rows at one position: a plain slice write
            return cls(0, pos[:, None], kv_len, None, start=kv_len - 1)
        kv = torch.arange(kv_len, device=device)
        mask = (kv[None, :] <= pos[:, None])[:, None, None, :]  # hide each row's future
        rows = torch.arange(len(positions), device=device)
        return cls(0, pos[:, None], kv_len, mask, rows=rows)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # q, k and v in one matmul: fewer kernel launches per decode step.
        self.wqkv = nn.Linear(c.hidden_size, q_size + 2 * kv_size, bias=c.attention_bias)
        self.wo = nn.Linear(q_size, c.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps) if c.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        step: Step,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.wqkv(x).split([(nh + nkv) * hd, nkv * hd], dim=-1)
        qk = qk.view(bsz, seqlen, nh + nkv, hd)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :nh]), self.k_norm(qk[:, :, nh:])], dim=2)
        # q and k heads rotate together: one RoPE pass instead of two.
        q, k = apply_rope(qk.transpose(1, 2), cos, sin).split([nh, nkv], dim=1)
        v = v.view(bsz, seqlen, nkv, hd).transpose(1, 2)

        k_cache, v_cache = (c[step.row0 : step.row0 + bsz] for c in cache)
        if step.rows is not None:  # decode rows at different positions
            k_cache[step.rows, :, step.input_pos[:, 0]] = k[:, :, 0]
            v_cache[step.rows, :, step.input_pos[:, 0]] = v[:, :, 0]
        else:  # every row writes the same contiguous positions
            start = step.start
            k_cache[:, :, start : start + seqlen] = k
            v_cache[:, :, start : start + seqlen] = v
        keys, values = k_cache[:, :, : step.kv_len], v_cache[:, :, : step.kv_len]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=step.mask, enable_gqa=nh != nkv
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, nh * hd))


class FeedForward(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = c.intermediate_size
        self.w13 = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x, cos, sin, cache, step):  # noqa: ANN001, ANN201 - hot path
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, step)
        return h + self.feed_forward(self.ffn_norm(h))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Transformer(nn.Module):
    """Layers [start, end) of the model; embedding if start == 0, norm and head if last."""

    def __init__(self, config: ModelConfig, layer_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        start, end = layer_range or (0, config.num_layers)
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside 0..{config.num_layers}")
        self.config = config
        self.layer_range = (start, end)
        self.is_first, self.is_last = start == 0, end == config.num_layers
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(Block(c) for _ in range(start, end))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False) if self.is_last else None
        self.cache: KVCache | None = None
        self.rope_cos = self.rope_sin = torch.empty(0)

    def setup_cache(self, max_batch: int, max_seq_len: int) -> None:
        c, p = self.config, next(self.parameters())
        self.cache = KVCache(
            len(self.layers), max_batch, c.num_kv_heads, max_seq_len, c.head_dim, p.dtype, p.device
        )
        cos, sin = rope_tables(c, max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(p.device, p.dtype), sin.to(p.device, p.dtype)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, step: Step, all_logits: bool = False) -> torch.Tensor:
        """x: token ids [B, T] on the first stage, else hidden states [B, T, H].

        Returns logits on the last stage ([B, V] for the last position, [B, T, V] with
        all_logits) and hidden states [B, T, H] elsewhere.
        """
        assert self.cache is not None, "call setup_cache() first"
        h = self.embed(x) if self.embed is not None else x
        cos = self.rope_cos[step.input_pos].unsqueeze(1)
        sin = self.rope_sin[step.input_pos].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, self.cache.layer(i), step)
        if not self.is_last:
            return h
        h = self.norm(h if all_logits else h[:, -1])
        return self.lm_head(h)
