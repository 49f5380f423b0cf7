"""A plain decoder-only transformer for the Llama family (llama, mistral, qwen2, qwen3) and its
mixture-of-experts kin (qwen3_moe, mixtral).

The model knows nothing about ranks: it holds a contiguous range of layers, plus the embedding
when it is the first stage and the final norm and LM head when it is the last. Pipeline and
tensor sharding build on that (gpt-fast style).

Decoding one token costs ~30 small ops per layer on top of the matmuls, so the per-layer math
is one flat function over the weights rather than nested module calls, and everything that
depends only on the step (RoPE rows, cache views) is computed once per forward.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Attention weights; Block.forward does the math. The linears are placeholders the loader
    replaces with the layer each weight calls for (engine.quant)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # q, k and v in one matmul: fewer kernel launches per decode step.
        self.wqkv = nn.Linear(c.hidden_size, q_size + 2 * kv_size, bias=c.attention_bias)
        self.wo = nn.Linear(q_size, c.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps) if c.qk_norm else None


class FeedForward(nn.Module):
    """SwiGLU: gate and up projections fused into w13."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(hidden, 2 * intermediate, bias=False)  # gate | up
        self.w2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class MoE(nn.Module):
    """Routed SwiGLU experts (qwen3_moe, mixtral): each token runs its top-k experts, their
    outputs weighted by the router's softmax (renormalised over the chosen with norm_topk_prob).

    A rank may hold a contiguous share of the experts (tensor parallel, `keep`): it adds only
    its experts' part, and Block.reduce sums the ranks' parts as it does for dense layers.
    """

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.router = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(c.hidden_size, c.expert_intermediate_size) for _ in range(c.num_experts)
        )
        self.top_k, self.normalize = c.experts_per_token, c.norm_topk_prob
        self.first = 0  # the index of experts[0] among all the model's experts

    def keep(self, rank: int, world: int) -> None:
        """Hold only rank `rank`'s contiguous share of the experts."""
        share = len(self.experts) // world
        self.first = rank * share
        self.experts = self.experts[self.first : self.first + share]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.router(flat).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        # One matmul per expert over the tokens routed to it (a decode step: k experts per row).
        for expert in chosen.unique().tolist():
            local = expert - self.first
            if not 0 <= local < len(self.experts):
                continue  # another rank's expert
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[local](flat[rows]) * weights[rows, slot, None])
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.attention_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.feed_forward: nn.Module = (
            MoE(c) if c.is_moe_layer(layer) else FeedForward(c.hidden_size, c.intermediate_size)
        )
        # Tensor parallel (engine/sharding.py) sets this to an in-place all-reduce over the
        # ranks; it sums the partial outputs of wo and w2 before each residual add.
        self.reduce: Callable[[torch.Tensor], object] | None = None

    def forward(self, x, cos, sin, kv, step):  # noqa: ANN001, ANN201 - hot path
        """x: [B, T, H]; cos/sin: [B, T, heads, hd]; kv: this layer's cache view
        [2, B, kv_heads, kv_len, hd]."""
        bsz, seqlen, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        a, ff = self.attention, self.feed_forward

        qkv = a.wqkv(rms_norm(x, self.attention_norm))
        qkv = qkv.view(bsz, seqlen, nh + 2 * nkv, hd)
        if a.q_norm is not None:
            q, k, v = qkv.split([nh, nkv, nkv], dim=2)
            qkv = torch.cat([rms_norm(q, a.q_norm), rms_norm(k, a.k_norm), v], dim=2)
        # RoPE on all heads in one pass: v's rows of the tables are cos 1, sin 0.
        qkv = qkv * cos + qkv.roll(hd // 2, -1) * sin
        q, new_kv = qkv[:, :, :nh].transpose(1, 2), qkv[:, :, nh:].unflatten(2, (2, nkv))
        if step.rows is None:  # every row writes the same contiguous positions
            kv.narrow(3, step.start, seqlen).copy_(new_kv.permute(2, 0, 3, 1, 4))
        else:  # one token per row, each at its own position
            kv[:, step.rows, :, step.input_pos[:, 0]] = new_kv[:, 0]
        keys, values = kv
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=step.mask, enable_gqa=nh != nkv
        )
        attended = a.wo(out.transpose(1, 2).reshape(bsz, seqlen, nh * hd))
        if self.reduce is not None:
            self.reduce(attended)
        h = x + attended

        mixed = ff(rms_norm(h, self.ffn_norm))
        if self.reduce is not None:
            self.reduce(mixed)
        return h + mixed


def rms_norm(x: torch.Tensor, n: nn.RMSNorm) -> torch.Tensor:
    return F.rms_norm(x, n.normalized_shape, n.weight, n.eps)


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
        # _weight: no random init; on the meta device, init would import torch._dynamo (~80 MB)
        table = torch.empty(c.vocab_size, c.hidden_size)
        self.embed = (
            nn.Embedding(c.vocab_size, c.hidden_size, _weight=table) if self.is_first else None
        )
        self.layers = nn.ModuleList(Block(c, layer) for layer in range(start, end))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False) if self.is_last else None
        self.cache: KVCache | None = None
        self.rope_cos = self.rope_sin = torch.empty(0)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, norms, KV cache); weights may be stored quantized."""
        return self.layers[0].attention_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].attention_norm.weight.device

    def setup_cache(self, max_batch: int, max_seq_len: int) -> None:
        c, dtype, device = self.config, self.dtype, self.device
        self.cache = KVCache(
            len(self.layers), max_batch, c.num_kv_heads, max_seq_len, c.head_dim, dtype, device
        )
        cos, sin = rope_tables(c, max_seq_len)
        # rotate_half(x) * sin == roll(x, hd/2) * sin with the first half of sin negated.
        sin = torch.cat([-sin[:, : c.head_dim // 2], sin[:, c.head_dim // 2 :]], dim=-1)
        self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, step: Step, all_logits: bool = False) -> torch.Tensor:
        """x: token ids [B, T] on the first stage, else hidden states [B, T, H].

        Returns logits on the last stage ([B, V] for the last position, [B, T, V] with
        all_logits) and hidden states [B, T, H] elsewhere.
        """
        assert self.cache is not None, "call setup_cache() first"
        c = self.config
        h = self.embed(x) if self.embed is not None else x
        bsz, seqlen = step.input_pos.shape
        # RoPE rows for q and k heads, then identity rows (cos 1, sin 0) for the v heads.
        shape = (bsz, seqlen, c.num_heads + c.num_kv_heads, c.head_dim)
        pad = (0, 0, 0, c.num_kv_heads)
        cos = F.pad(self.rope_cos[step.input_pos].unsqueeze(2).expand(shape), pad, value=1.0)
        sin = F.pad(self.rope_sin[step.input_pos].unsqueeze(2).expand(shape), pad, value=0.0)
        # Every layer's view of this step's cache rows and positions, sliced once.
        rows = slice(step.row0, step.row0 + bsz)
        views = self.cache.data[:, :, rows, :, : step.kv_len].unbind(0)
        for layer, kv in zip(self.layers, views, strict=True):
            h = layer(h, cos, sin, kv, step)
        if not self.is_last:
            return h
        h = rms_norm(h if all_logits else h[:, -1], self.norm)
        return self.lm_head(h)
