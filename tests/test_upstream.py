"""api.upstream: the node's chat completions at the rank 0 as data, for the translating APIs."""

from __future__ import annotations

import asyncio

import pytest

from shoal.api import upstream
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL

from conftest import LiveServer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_complete_and_stream_give_the_same_greedy_answer(server: LiveServer) -> None:
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 12, "temperature": 0}

    async def both() -> tuple[dict, list[dict]]:
        whole = await upstream.complete(server.node, body)
        chunks = [c async for c in upstream.stream(server.node, body)]
        return whole, chunks

    whole, chunks = asyncio.run(both())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in whole["choices"][0]["message"]["content"]
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "no-such-model", "messages": FRANCE}, 404, "model_not_found"),
        ({"model": MODEL, "messages": FRANCE, "temperature": 9}, 400, None),
    ],
)
def test_refusals_carry_the_status_and_message(
    server: LiveServer, body: dict, status: int, code: str | None
) -> None:
    async def both() -> list[upstream.UpstreamError]:
        errors = []
        for call in (upstream.complete(server.node, body), _drain(server, body)):
            with pytest.raises(upstream.UpstreamError) as caught:
                await call
            errors.append(caught.value)
        return errors

    for error in asyncio.run(both()):
        assert error.status == status and error.message
        assert code is None or error.code == code


async def _drain(server: LiveServer, body: dict) -> None:
    async for _ in upstream.stream(server.node, body):
        pass
