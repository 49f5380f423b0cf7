"""The limits as pure parts: token buckets, the request caps, the body limit's decisions."""

from __future__ import annotations

import asyncio
import json

import pytest

from shoal.api.limits import refusal
from shoal.cluster.ratelimit import RateLimiter, TokenBucket
from shoal.config import RunSettings, StartupError
from shoal.schema.limits import (
    COMPLETIONS,
    OLLAMA,
    OPENAI,
    RESPONSES,
    RequestLimits,
    over_limit,
    text_chars,
)
from shoal.web.limits import BodyLimit, declared_length

# ---- token bucket ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "times", "expected"),
    [
        # a full bucket lets `burst` through at once, then nothing until it refills
        (1.0, 3.0, [0, 0, 0, 0], [True, True, True, False]),
        # one token a second: a message a second always passes
        (1.0, 1.0, [0, 1, 2, 3], [True, True, True, True]),
        # twice as fast as the rate: every other one passes
        (1.0, 1.0, [0, 0.5, 1.0, 1.5, 2.0], [True, False, True, False, True]),
        # a long quiet refills only up to the burst
        (10.0, 2.0, [0, 0, 100, 100, 100], [True, True, True, True, False]),
        # a clock that steps back mints no tokens
        (1.0, 1.0, [10, 5, 5.5], [True, False, False]),
    ],
)
def test_token_bucket(rate, burst, times, expected):
    bucket = TokenBucket.full(rate, burst, times[0])
    assert [bucket.take(t) for t in times] == expected


def test_limiter_keys_sources_apart():
    limiter = RateLimiter(1.0, 1.0)
    assert limiter.allow("a", 0).allowed
    assert not limiter.allow("a", 0).allowed
    assert limiter.allow("b", 0).allowed  # another source has its own bucket
    assert limiter.dropped == 1


def test_limiter_logs_once_per_interval_with_the_count():
    limiter = RateLimiter(1.0, 1.0, log_every=10.0)
    verdicts = [limiter.allow("peer", t * 0.01) for t in range(500)]  # 100/s for 5 s
    logged = [v.log_dropped for v in verdicts if v.log_dropped]
    assert logged == [1]  # the first refusal says so at once, the rest wait for the interval
    later = limiter.allow("peer", 12.0)  # refilled: allowed, nothing to say yet
    assert later.allowed and later.log_dropped == 0
    again = limiter.allow("peer", 12.0)  # the interval is over: one line with the count
    refused = sum(not v.allowed for v in verdicts)
    assert refused > 400
    assert (again.allowed, again.log_dropped) == (False, refused)  # all but the first, + this
    assert limiter.allow("peer", 12.5).log_dropped == 0


def test_limiter_forgets_the_least_recent_source_beyond_its_size():
    limiter = RateLimiter(1.0, 1.0, max_sources=2)
    for source in ("a", "b", "c"):  # spoofed addresses cannot grow the table
        limiter.allow(source, 0)
    assert len(limiter) == 2
    assert limiter.allow("a", 0).allowed  # "a" was forgotten: a full bucket again
    assert not limiter.allow("c", 0).allowed  # "c" is still tracked


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0.5), (-1, 5)])
def test_limiter_refuses_a_bucket_that_never_passes(rate, burst):
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


# ---- request caps ----------------------------------------------------------------------------

LIMITS = RequestLimits(max_tokens=100, max_messages=3, max_prompt_chars=20)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    ("body", "fields", "expected"),
    [
        ({"messages": [user("hi")], "max_tokens": 100}, OPENAI, None),
        ({"messages": [user("hi")] * 3}, OPENAI, None),
        ({"messages": [user("hi")] * 4}, OPENAI, ("messages", "too_many_messages")),
        ({"messages": [user("hi")] * 4}, RESPONSES, ("input", "too_many_messages")),
        (
            {"messages": [user("hi")], "max_tokens": 101},
            OPENAI,
            ("max_tokens", "max_tokens_too_large"),
        ),
        (
            {"messages": [user("hi")], "max_completion_tokens": 101, "max_tokens": 5},
            OPENAI,
            ("max_tokens", "max_tokens_too_large"),
        ),
        (
            {"messages": [user("hi")], "max_tokens": 101},
            RESPONSES,
            ("max_output_tokens", "max_tokens_too_large"),
        ),
        (
            {"messages": [user("hi")], "max_tokens": 101},
            OLLAMA,
            ("options.num_predict", "max_tokens_too_large"),
        ),
        ({"messages": [user("x" * 20)]}, OPENAI, None),
        ({"messages": [user("x" * 10), user("y" * 11)]}, OPENAI, ("messages", "prompt_too_long")),
        # text parts and tool-call arguments count too
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "z" * 21}]}]},
            OPENAI,
            ("messages", "prompt_too_long"),
        ),
        ({"prompt": "p" * 21}, COMPLETIONS, ("prompt", "prompt_too_long")),
        ({"prompt": "p" * 20, "max_tokens": 100}, COMPLETIONS, None),
        # what is not a count is the schema's business, never a crash here
        ({"messages": "not a list", "max_tokens": "9999", "prompt": None}, OPENAI, None),
        ({"messages": [user("hi")], "max_tokens": True}, OPENAI, None),
    ],
)
def test_over_limit(body, fields, expected):
    over = over_limit(LIMITS, body, fields)
    assert (over and (over.param, over.code)) == (expected or None)
    if over is not None:
        assert f"'{over.param}'" in over.message and "--max-" in over.message


def test_the_refusal_names_the_flag_and_the_cap():
    over = over_limit(LIMITS, {"messages": [user("hi")], "max_tokens": 5000})
    assert over is not None
    assert "5000" in over.message and "100" in over.message and "--max-tokens-cap" in over.message


@pytest.mark.parametrize(
    ("value", "chars"),
    [("abc", 3), (None, 0), (7, 0), (["ab", {"text": "cd", "n": 1}], 4), ({"a": ("x", "yz")}, 3)],
)
def test_text_chars(value, chars):
    assert text_chars(value) == chars


@pytest.mark.parametrize(
    "flag",
    ["max_body_bytes", "client_timeout", "max_tokens_cap", "max_messages", "max_prompt_chars"],
)
def test_a_limit_of_zero_is_refused_at_start(flag):
    with pytest.raises(StartupError, match="--" + flag.replace("_", "-")):
        RunSettings(**{flag: 0})


# ---- the body limit --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([(b"content-length", b"12")], 12),
        ([(b"Content-Length", b"7"), (b"host", b"x")], 7),
        ([(b"transfer-encoding", b"chunked")], None),
        ([(b"content-length", b"junk")], None),
        ([], None),
    ],
)
def test_declared_length(headers, length):
    assert declared_length(headers) == length


async def _echo(scope, receive, send):
    """The app behind the limit: answers the body it read."""
    message = await receive()
    body = message["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"got %d" % len(body)})


def _drive(limit: BodyLimit, path: str, headers, chunks, stall: bool = False):
    """Run one request through the middleware: the body arrives in `chunks` (then, with
    `stall`, never finishes); returns (status, body) of what was sent."""
    sent: list[dict] = []

    async def run():
        queue = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or stall}
            for i, c in enumerate(chunks)
        ]

        async def receive():
            if queue:
                return queue.pop(0)
            await asyncio.sleep(3600)  # a stuck client

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": path, "headers": headers, "method": "POST"}
        await limit(scope, receive, send)

    asyncio.run(run())
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body


def test_a_body_within_the_limit_reaches_the_app_whole():
    limit = BodyLimit(_echo, max_bytes=10, timeout_s=5)
    assert _drive(limit, "/v1/chat/completions", [], [b"12345", b"67890"]) == (200, b"got 10")


def test_a_declared_length_over_the_limit_is_413_before_reading():
    limit = BodyLimit(_echo, max_bytes=10, timeout_s=5, render=refusal)
    status, body = _drive(limit, "/v1/chat/completions", [(b"content-length", b"11")], [])
    assert status == 413
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/chat/completions", lambda b: b["error"]["code"] == "request_too_large"),
        (
            "/v1/messages",
            lambda b: b["type"] == "error" and b["error"]["type"] == "request_too_large",
        ),
        ("/api/chat", lambda b: isinstance(b["error"], str)),
        ("/ollama/api/generate", lambda b: isinstance(b["error"], str)),
    ],
)
def test_a_streamed_body_over_the_limit_is_413_in_the_routes_shape(path, shape):
    limit = BodyLimit(_echo, max_bytes=10, timeout_s=5, render=refusal)
    status, body = _drive(limit, path, [], [b"123456", b"789012", b"never read"])
    assert status == 413 and shape(json.loads(body))


def test_a_body_that_does_not_arrive_in_time_is_408():
    limit = BodyLimit(_echo, max_bytes=100, timeout_s=0.2)
    status, body = _drive(limit, "/v1/chat/completions", [], [b"{"], stall=True)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
