"""A request relayed to an instance's rank 0 follows the instance when it moves mid-request."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from shoal.api import proxy

STOPPING = {"error": {"message": "The generation was stopped", "code": "server_stopping"}}
ANSWER = {"choices": [{"message": {"content": "Paris"}}]}


def serve(status: int, doc: dict) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, str]]:
    stopping, stopping_url = serve(503, STOPPING)
    serving, serving_url = serve(200, ANSWER)
    yield {"stopping": stopping_url, "serving": serving_url, "gone": closed_port()}
    stopping.shutdown()
    serving.shutdown()


class Plan:
    """endpoint() names `first` until it has been asked `moves_after` times, then `then`
    (None: the new generation is still loading)."""

    def __init__(self, first: str, then: str | None, moves_after: int) -> None:
        self.urls, self.asked, self.moves_after = (first, then), 0, moves_after

    def endpoint(self, model_id: str) -> tuple[str | None, str]:
        self.asked += 1
        return self.urls[self.asked > self.moves_after], "loading"


class Body:
    async def body(self) -> bytes:
        return b'{"model": "m", "messages": []}'


@pytest.mark.parametrize(
    ("name", "first", "then", "moves_after", "status", "doc"),
    [
        ("rank 0 stopping, the move shows: the new rank 0 answers",
         "stopping", "serving", 2, 200, ANSWER),
        ("rank 0 gone, the move shows: the new rank 0 answers", "gone", "serving", 2, 200, ANSWER),
        ("refused and nothing moved: the refusal as rank 0 sent it",
         "stopping", "stopping", 10**6, 503, STOPPING),
        ("moved, but the new rank 0 still loading: the refusal, not a long wait",
         "stopping", None, 1, 503, STOPPING),
        ("a plain answer is passed through", "serving", "serving", 10**6, 200, ANSWER),
    ],
)  # fmt: skip
def test_to_instance(upstreams, monkeypatch, name, first, then, moves_after, status, doc) -> None:
    monkeypatch.setattr(proxy, "MOVE_WAIT_S", 1.0)
    plan = Plan(upstreams[first], upstreams[then] if then else None, moves_after)

    async def ask() -> tuple[int, dict]:
        async with httpx.AsyncClient() as client:
            response = await proxy.to_instance(Body(), plan, "m", "/chat/completions", client)  # type: ignore[arg-type]
            if hasattr(response, "body_iterator"):
                chunks = [c async for c in response.body_iterator]
                return response.status_code, json.loads(b"".join(chunks))
            return response.status_code, json.loads(response.body)

    assert asyncio.run(ask()) == (status, doc), name
