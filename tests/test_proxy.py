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

from shoal.api import ollama, proxy
from shoal.api.anthropic_translate import AnthropicError
from shoal.cluster.peers import PeerClient, relay_socket_options
from shoal.web.errors import RETRY_AFTER_S, ApiError

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

    code, headers, body = asyncio.run(relayed(plan))
    assert (code, json.loads(body)) == (status, doc), name
    assert code != 503 or headers.get("retry-after") == str(RETRY_AFTER_S), headers  # says when


async def relayed(
    plan: Plan | One, client: httpx.AsyncClient | None = None
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one relayed request, its stream read to the end."""
    async with client or httpx.AsyncClient() as http:
        response = await proxy.to_instance(Body(), plan, "m", "/chat/completions", http)  # type: ignore[arg-type]
        if hasattr(response, "body_iterator"):
            body = b"".join([c async for c in response.body_iterator])
        else:
            body = response.body
        return response.status_code, dict(response.headers), body


class One:
    """Always the same rank 0: nothing moves."""

    def __init__(self, url: str) -> None:
        self.url = url

    def endpoint(self, model_id: str) -> tuple[str | None, str]:
        return self.url, ""


def raw_server(reply: bytes) -> tuple[socket.socket, str]:
    """A rank 0 that reads a request, writes `reply` (maybe nothing) and hangs up: a runner
    killed mid-request, before or after its headers."""
    server = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        for _ in range(4):  # bounded: each test makes one or two connections
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=run, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}"


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
CHUNK = b'data: {"choices": [{"delta": {"content": "Pa"}}]}\n\n'


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        ("hangs up before answering", b""),
        ("sends half a head and hangs up", b"HTTP/1.1 200 OK\r\ncontent-ty"),
    ],
)
def test_a_rank_0_lost_before_its_answer_is_a_503_with_retry_after(monkeypatch, name, reply):
    monkeypatch.setattr(proxy, "MOVE_WAIT_S", 0.3)
    server, url = raw_server(reply)
    with server:
        code, headers, body = asyncio.run(relayed(One(url)))
    assert code == 503 and headers.get("retry-after") == str(RETRY_AFTER_S), (name, headers)
    assert json.loads(body)["error"]["code"] == "instance_unreachable", body


def test_a_rank_0_lost_mid_stream_ends_the_stream_with_an_error_event() -> None:
    chunk = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n"
    server, url = raw_server(SSE_HEAD + chunk)  # ...and no last chunk: the stream was cut
    with server:
        code, _, body = asyncio.run(relayed(One(url)))
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert code == 200 and events[0].startswith('{"choices"'), body  # what was sent, then
    assert json.loads(events[1])["error"]["code"] == "instance_lost" and events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("name", "response"),
    [
        ("OpenAI", lambda: ApiError(503, "moving").response()),
        ("Anthropic", lambda: AnthropicError(503, "moving").response()),
        ("Ollama", lambda: ollama._error(503, "moving")),
    ],
)
def test_every_api_shape_says_when_to_retry_a_503(name, response) -> None:
    assert response().headers["retry-after"] == str(RETRY_AFTER_S), name


def test_the_relay_pool_finds_a_dead_path_by_tcp_keepalive(upstreams) -> None:
    async def keepalive() -> int:
        peers = PeerClient(links=lambda: [])
        try:
            async with peers.relay.stream("POST", upstreams["serving"] + "/x", json={}) as r:
                sock = r.extensions["network_stream"].get_extra_info("socket")
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        finally:
            await peers.aclose()

    assert asyncio.run(keepalive()) != 0
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in relay_socket_options()
