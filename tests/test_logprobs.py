"""Logprobs: the sampler's numbers as tables, the token bytes of real tokenizers, the wire
codec of a pipeline's reply, and the OpenAI shapes through the real openai client.

(The pipeline and tensor-parallel ranks' logprobs against their logits are in
test_parallel_engine; the MLX executor's in test_engine_mlx.)
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import tokenizers
import torch

from shoal.engine.generator import SamplerBank
from shoal.engine.sampling import SamplingParams, TokenLogprob, logprobs_of
from shoal.engine.tokenizer import Tokenizer
from shoal.engine.wire import pack_logprobs, unpack_logprobs
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL

from conftest import LiveServer
from engine_helpers import bundled_gguf

LN = math.log


@pytest.mark.parametrize(
    ("logits", "token", "k", "logprob", "top"),
    [
        # uniform over 4: every logprob is ln(1/4) (which of the tied ids: any)
        ([0.0, 0.0, 0.0, 0.0], 2, 2, LN(0.25), [(None, LN(0.25)), (None, LN(0.25))]),
        # the chosen token need not be among the top k (sampled, or k = 0)
        ([LN(0.5), LN(0.3), LN(0.2)], 2, 1, LN(0.2), [(0, LN(0.5))]),
        ([LN(0.5), LN(0.3), LN(0.2)], 0, 0, LN(0.5), []),
        # shifted logits: the same distribution
        ([10 + LN(0.1), 10 + LN(0.6), 10 + LN(0.3)], 1, 3,
         LN(0.6), [(1, LN(0.6)), (2, LN(0.3)), (0, LN(0.1))]),
    ],
)  # fmt: skip
def test_logprobs_are_the_model_distribution(logits, token, k, logprob, top) -> None:
    (found,) = logprobs_of(torch.tensor([logits]), [token], [k])
    assert found.token == token and found.logprob == pytest.approx(logprob, abs=1e-6)
    assert len(found.top) == len(top)
    for (t, _), (want, _) in zip(found.top, top, strict=True):
        assert want is None or t == want
    assert [x for _, x in found.top] == pytest.approx([x for _, x in top], abs=1e-6)


def test_only_the_rows_that_ask_get_logprobs() -> None:
    bank = SamplerBank()
    bank.admit(1, SamplingParams(temperature=0))
    bank.admit(2, SamplingParams(temperature=0, logprobs=2))
    bank.admit(3, SamplingParams(temperature=0, logprobs=0))
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert bank.sample([1, 2, 3], logits) == [1, 0, 2]
    assert set(bank.logprobs) == {2, 3}
    assert [t for t, _ in bank.logprobs[2].top] == [0, 2] and bank.logprobs[3].top == ()
    bank.retain([1])
    bank.sample([1], logits[:1])
    assert bank.logprobs == {}  # each sample() says only its own step's


def test_logprobs_outside_zero_to_twenty_are_refused() -> None:
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="top_logprobs"):
            SamplingParams(logprobs=bad)


def test_a_pipeline_reply_carries_logprobs_exactly() -> None:
    found = [
        TokenLogprob(7, -0.25, ((7, -0.25), (49151, -1.5))),
        TokenLogprob(3, -12.125, ()),
        TokenLogprob(0, -0.0, tuple((i, -float(i)) for i in range(20))),
    ]
    assert unpack_logprobs(pack_logprobs(found), [7, 3, 0]) == found


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer.load(bundled_gguf())


@pytest.mark.parametrize("text", ["Paris", " naïve café", "日本語", "🙂 <|im_end|>", "a\n\tb", "—"])
def test_token_bytes_make_up_the_text(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    assert b"".join(smollm.token_bytes(i) for i in ids) == text.encode()


def test_sentencepiece_pieces_and_byte_fallback() -> None:
    vocab = {"<unk>": 0, "\u2581the": 1, "<0xE2>": 2, "<0x80>": 3, "cat": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = tokenizers.decoders.Sequence(
        [tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()]
    )
    t = Tokenizer(backend)
    assert [t.token_bytes(i) for i in (1, 2, 3, 4)] == [b" the", b"\xe2", b"\x80", b"cat"]


# -- through the API ----------------------------------------------------------------------------

ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def test_chat_logprobs_spell_the_answer(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = result.choices[0]
    content = choice.logprobs.content
    assert len(content) == result.usage.completion_tokens - (choice.finish_reason == "stop")
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        lps = [t.logprob for t in token.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy: the likeliest
        assert token.logprob == pytest.approx(lps[0], abs=1e-5)


def test_streamed_logprobs_equal_the_whole_answers(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=10, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        token
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for choice in chunk.choices
        if choice.logprobs is not None
        for token in choice.logprobs.content
    ]
    assert [(t.token, t.top_logprobs) for t in streamed] == [(t.token, []) for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-4)


def test_without_logprobs_there_are_none(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    assert result.choices[0].logprobs is None


def test_text_completion_logprobs_are_parallel_lists(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    choice = result.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob, abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5)


def test_logprob_requests_the_api_cannot_serve_are_400s(server: LiveServer) -> None:
    for extra in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        body = {"model": MODEL, "messages": ASK, "max_tokens": 2, **extra}
        r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
