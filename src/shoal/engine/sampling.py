"""Token sampling: greedy, temperature, top-k, top-p, min-p, with per-request seeds; presence,
frequency and repetition penalties over the tokens a request has generated; the log
probabilities of the chosen tokens and their top alternatives for the requests that ask."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has appeared
    frequency_penalty: float = 0.0  # OpenAI's: minus this per appearance
    repetition_penalty: float = 1.0  # CTRL/HF's: divide (positive) or multiply a seen logit
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log probability under the model, and the `top` most likely tokens
    at that step, best first, as (token id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """For each row of logits [B, V], the chosen token's logprob and the top ks[row]: the
    model's distribution itself, before penalties and temperature (as vLLM's default)."""
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    chosen = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    k = max(ks, default=0)
    values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    return [
        TokenLogprob(t, lp, tuple(zip(ids[i, :n].tolist(), values[i, :n].tolist(), strict=True)))
        for i, (t, lp, n) in enumerate(zip(tokens, chosen, ks, strict=True))
    ]


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A private RNG per request, so a seed reproduces its output whatever else runs."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    rngs: list[torch.Generator | None],
    seen: list[Counter[int]] | None = None,
) -> list[int]:
    """One token per row of logits [B, V]; greedy rows share one argmax. `seen`: each row's
    generated tokens so far, for the rows whose params ask for penalties."""
    rows = [i for i, p in enumerate(params) if p.penalized and seen is not None and seen[i]]
    if rows:
        assert seen is not None
        logits = logits.clone()  # the caller's logits stay as the model gave them
        for i in rows:
            logits[i] = penalize(logits[i], params[i], seen[i])
    greedy = logits.argmax(dim=-1).tolist()
    return [
        greedy[i] if p.greedy else sample_one(logits[i], p, rngs[i]) for i, p in enumerate(params)
    ]


def penalize(logits: torch.Tensor, p: SamplingParams, seen: Counter[int]) -> torch.Tensor:
    """One row of logits [V] with the penalties of `p` for the tokens in `seen` applied."""
    ids = torch.tensor(list(seen), device=logits.device)
    counts = torch.tensor(list(seen.values()), device=logits.device, dtype=torch.float32)
    picked = logits[ids].float()
    if p.repetition_penalty != 1:
        picked = torch.where(
            picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
        )
    picked = picked - p.frequency_penalty * counts - p.presence_penalty
    out = logits.clone()
    out[ids] = picked.to(out.dtype)
    return out


def sample_one(logits: torch.Tensor, p: SamplingParams, rng: torch.Generator | None) -> int:
    """Sample from one row of logits [V] (order as in HF: temperature, top-k, min-p, top-p)."""
    logits = logits.float().cpu() / p.temperature  # the per-request RNG lives on the CPU
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = cumulative - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=rng).item())
