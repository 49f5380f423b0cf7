"""Each limit against a real node (bundled SmolLM2, real uvicorn, real sockets) started with
small caps: the body cap on the API and on rank 0, slow heads and bodies, the request caps in
each API's shape, and floods of UDP probes and peer calls that never take the node down."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal.cluster import probe_wire as wire
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL

from conftest import SERVER_SETTINGS, LiveServer, live_node

pytestmark = pytest.mark.timeout(240)

MAX_BODY = 64 * 1024
CLIENT_TIMEOUT = 2.0
CAPS = dict(
    max_body_bytes=MAX_BODY,
    client_timeout=CLIENT_TIMEOUT,
    max_tokens_cap=64,
    max_messages=8,
    max_prompt_chars=4000,
)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def capped() -> Iterator[LiveServer]:
    with live_node(dataclasses.replace(SERVER_SETTINGS, **CAPS)) as live:
        yield live


def chat(live: LiveServer, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 4, **extra}
    return httpx.post(f"{live.base_url}/chat/completions", json=body, timeout=60)


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (or `wait`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        return got


def padded(size: int) -> bytes:
    """A JSON chat body of about `size` bytes."""
    filler = "x" * size
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": filler}]}).encode()


# ---- the body cap ----------------------------------------------------------------------------


def test_a_declared_body_over_the_cap_is_413_in_openai_shape(capped: LiveServer) -> None:
    r = httpx.post(f"{capped.base_url}/chat/completions", content=padded(MAX_BODY), timeout=30)
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and str(MAX_BODY) in error["message"]


@pytest.mark.parametrize(
    ("path", "is_shape"),
    [
        ("/v1/chat/completions", lambda b: b["error"]["code"] == "request_too_large"),
        (
            "/v1/messages",
            lambda b: (b["type"], b["error"]["type"]) == ("error", "request_too_large"),
        ),
        ("/api/chat", lambda b: "--max-body-bytes" in b["error"]),
    ],
)
def test_a_chunked_body_over_the_cap_is_413_in_the_apis_shape(capped, path, is_shape) -> None:
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:  # no Content-Length: only reading finds the size
        for _ in range(MAX_BODY // 8192 + 2):
            sent.append(8192)
            yield b" " * 8192

    r = httpx.post(capped.url + path, content=chunks(), timeout=30)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and is_shape(r.json())


def test_a_body_within_the_cap_is_served(capped: LiveServer) -> None:
    r = chat(capped)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_rank_0_refuses_a_body_over_the_cap_too(capped: LiveServer) -> None:
    url, why = capped.node.endpoint(MODEL)
    assert url is not None, why
    r = httpx.post(f"{url}/v1/chat/completions", content=padded(MAX_BODY), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# ---- slow clients ----------------------------------------------------------------------------


def test_a_body_that_stops_arriving_is_408(capped: LiveServer) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    answer = raw(capped.port, head + b'{"model": ')  # 10 of 100 bytes, then nothing
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408")
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert (
        body["error"]["code"] == "request_timeout"
        and "--client-timeout" in body["error"]["message"]
    )


def test_a_request_head_that_never_ends_has_its_connection_closed(capped: LiveServer) -> None:
    started = time.monotonic()
    answer = raw(capped.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", wait=CLIENT_TIMEOUT + 8)
    assert answer == b""  # closed by the server, not by our wait running out
    assert time.monotonic() - started < CLIENT_TIMEOUT + 8
    whole = raw(capped.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert whole.startswith(b"HTTP/1.1 200")  # a whole head on time is served


def test_an_incomplete_request_head_over_16_kib_is_400(capped: LiveServer) -> None:
    # h11 holds at most 16 KiB of a head it has not seen the end of (a head that arrives
    # whole in one read is parsed instead): a client trickling a huge head gets 400.
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    assert raw(capped.port, head).startswith(b"HTTP/1.1 400")


# ---- the request caps, in each API's shape ---------------------------------------------------


def test_openai_max_tokens_over_the_cap_is_400_naming_the_field(capped: LiveServer) -> None:
    r = chat(capped, max_tokens=65)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("max_tokens", "max_tokens_too_large")
    assert "--max-tokens-cap" in error["message"] and "64" in error["message"]


def test_openai_message_count_and_prompt_length_caps(capped: LiveServer) -> None:
    many = chat(capped, messages=FRANCE * 9)
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_messages"
    long = chat(capped, messages=[{"role": "user", "content": "y" * 4001}])
    assert long.status_code == 400 and long.json()["error"]["code"] == "prompt_too_long"
    text = httpx.post(
        f"{capped.base_url}/completions",
        json={"model": MODEL, "prompt": "p" * 4001, "max_tokens": 4},
        timeout=30,
    )
    assert text.status_code == 400 and text.json()["error"]["param"] == "prompt"


def test_anthropic_max_tokens_over_the_cap_is_400_in_its_shape(capped: LiveServer) -> None:
    body = {"model": MODEL, "max_tokens": 100, "messages": FRANCE}
    r = httpx.post(f"{capped.url}/v1/messages", json=body, timeout=30)
    assert r.status_code == 400
    answer = r.json()
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert "'max_tokens'" in answer["error"]["message"]


def test_responses_max_output_tokens_over_the_cap_names_its_field(capped: LiveServer) -> None:
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 100}
    r = httpx.post(f"{capped.base_url}/responses", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_output_tokens"
    many = httpx.post(
        f"{capped.base_url}/responses", json={"model": MODEL, "input": FRANCE * 9}, timeout=30
    )
    assert many.status_code == 400 and many.json()["error"]["param"] == "input"


def test_ollama_num_predict_over_the_cap_is_400_in_its_shape(capped: LiveServer) -> None:
    body = {"model": MODEL, "messages": FRANCE, "stream": False, "options": {"num_predict": 100}}
    r = httpx.post(f"{capped.url}/api/chat", json=body, timeout=30)
    assert r.status_code == 400 and "options.num_predict" in r.json()["error"]
    # raw generate without num_predict asks for the context, within the cap: served
    raw_body = {"model": MODEL, "prompt": "Paris is", "raw": True, "stream": False}
    raw_body["options"] = {"temperature": 0}
    ok = httpx.post(f"{capped.url}/api/generate", json=raw_body, timeout=60)
    assert ok.status_code == 200 and ok.json()["done"]


# ---- floods ----------------------------------------------------------------------------------


def test_a_udp_probe_flood_is_dropped_logged_once_and_the_node_serves(
    capped: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.cluster.links")
    cluster = capped.node.cluster
    assert cluster is not None
    before = cluster.prober.flood.dropped
    probe = wire.encode(
        wire.Probe("f" * 32, cluster.namespace_hash, "n0", f"127.0.0.1:{capped.port}")
    )
    garbage = [
        b"",
        secrets.token_bytes(64),
        b"\x00" * 512,
        b"{not json",
        json.dumps({"t": "probe"}).encode(),
        probe,
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for burst in range(10):  # 5000 datagrams, in bursts the node can drain in between
            for i in range(500):
                sock.sendto(garbage[i % len(garbage)], ("127.0.0.1", capped.port))
            time.sleep(0.01 * (burst % 2))
    deadline = time.monotonic() + 10
    while cluster.prober.flood.dropped == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.prober.flood.dropped > before
    lines = [r for r in caplog.records if "link probes from 127.0.0.1" in r.getMessage()]
    assert 1 <= len(lines) <= 2  # one line an interval for the source, not one per datagram
    assert httpx.get(f"{capped.url}/health", timeout=10).status_code == 200
    assert chat(capped).status_code == 200


def test_a_peer_route_flood_is_429_with_a_body_and_the_node_serves(capped: LiveServer) -> None:
    statuses: list[int] = []
    with httpx.Client(timeout=10) as client:
        deadline = time.monotonic() + 30
        while len(statuses) < 600 and time.monotonic() < deadline:
            r = client.get(f"{capped.url}/cluster/report")
            statuses.append(r.status_code)
            if r.status_code == 429:
                refused = r
    assert set(statuses) <= {200, 429} and 429 in statuses
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert httpx.get(f"{capped.url}/health", timeout=10).status_code == 200
    assert chat(capped).status_code == 200


def test_a_request_naming_no_max_tokens_gets_at_most_the_cap(capped: LiveServer) -> None:
    body = {"model": MODEL, "messages": FRANCE, "ignore_eos": True}  # would fill the context
    r = httpx.post(f"{capped.base_url}/chat/completions", json=body, timeout=120)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == CAPS["max_tokens_cap"]
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_rank_0_refuses_max_tokens_over_the_cap_itself(capped: LiveServer) -> None:
    url, why = capped.node.endpoint(MODEL)
    assert url is not None, why
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": CAPS["max_tokens_cap"] + 1}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
        "max_tokens",
        "max_tokens_too_large",
    )
