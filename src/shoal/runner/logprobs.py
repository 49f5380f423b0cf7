"""The sampler's token logprobs (engine.sampling.TokenLogprob) in the OpenAI APIs' shapes:
chat's `choices[].logprobs.content[]` and the legacy completions' parallel lists.

A token may hold part of a UTF-8 character; its `bytes` are exact, its `token` text shows
what decodes (a partial character as U+FFFD), as OpenAI's do.
"""

from __future__ import annotations

from collections.abc import Iterable

from shoal.engine.sampling import TokenLogprob
from shoal.engine.tokenizer import Tokenizer
from shoal.schema.openai import ChoiceLogprobs, CompletionLogprobs, TokenLogprobOut, TopLogprob


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    raw = tokenizer.token_bytes(token_id)
    return TopLogprob(token=raw.decode(errors="replace"), logprob=logprob, bytes=list(raw))


def chat_logprobs(tokenizer: Tokenizer, found: Iterable[TokenLogprob]) -> ChoiceLogprobs:
    content = []
    for lp in found:
        chosen = _top(tokenizer, lp.token, lp.logprob)
        top = [_top(tokenizer, t, x) for t, x in lp.top]
        content.append(TokenLogprobOut(**chosen.model_dump(), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    tokenizer: Tokenizer, found: Iterable[TokenLogprob], offset: int = 0
) -> CompletionLogprobs:
    """`offset`: where the first token starts in the choice's whole text (streaming)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for lp in found:
        text = tokenizer.token_bytes(lp.token).decode(errors="replace")
        tokens.append(text)
        logprobs.append(lp.logprob)
        tops.append({_top(tokenizer, t, x).token: x for t, x in lp.top})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets
    )
