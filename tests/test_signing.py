"""The cluster secret: sign/verify of node-to-node messages (shoal.web.signing), the receiving
middleware (shoal.web.signed) and the sending side (cluster.peers' auth), on an in-process app."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from shoal.cluster.peers import BearerAuth, SignedAuth, first_key, peer_auth
from shoal.config import RunSettings, StartupError, read_cluster_secret
from shoal.runner.spec import SECRET_ENV, runner_env, runner_secret
from shoal.web.signed import SignedPeers
from shoal.web.signing import (
    HEADER_NODE,
    HEADER_NONCE,
    HEADER_SIG,
    HEADER_TS,
    NonceCache,
    SignatureError,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)

SECRET, OTHER = b"s3cret-of-the-cluster", b"another-secret"
NOW = 1_700_000_000.0
BODY = b'{"node_id": "A", "boot_id": "b1"}'
TARGET = "/cluster/goodbye?x=1"


def signed(secret: bytes = SECRET, at: float = NOW, **changes: str) -> dict[str, str]:
    headers = sign_request(secret, "POST", TARGET, BODY, "node-A", at, nonce="ab" * 16)
    return {**headers, **changes}


@pytest.mark.parametrize(
    ("headers", "method", "target", "body", "code"),
    [
        (signed(), "POST", TARGET, BODY, None),
        (signed(OTHER), "POST", TARGET, BODY, "bad_signature"),
        ({}, "POST", TARGET, BODY, "unsigned"),
        ({k: v for k, v in signed().items() if k != HEADER_SIG}, "POST", TARGET, BODY, "malformed"),
        (signed(at=NOW - 31), "POST", TARGET, BODY, "stale"),
        (signed(at=NOW + 31), "POST", TARGET, BODY, "future"),
        (signed(at=NOW - 29), "POST", TARGET, BODY, None),  # within the window
        (signed(), "POST", TARGET, BODY + b" ", "bad_signature"),  # tampered body
        (signed(), "POST", "/cluster/goodbye?x=2", BODY, "bad_signature"),  # tampered query
        (signed(), "POST", "/instance", BODY, "bad_signature"),  # tampered path
        (signed(), "DELETE", TARGET, BODY, "bad_signature"),  # tampered method
        (signed(**{HEADER_NODE: "node-B"}), "POST", TARGET, BODY, "bad_signature"),  # sender
        (signed(**{HEADER_TS: f"{NOW + 1:.3f}"}), "POST", TARGET, BODY, "bad_signature"),
        (signed(**{HEADER_NONCE: "cd" * 16}), "POST", TARGET, BODY, "bad_signature"),
        (signed(**{HEADER_TS: "soon"}), "POST", TARGET, BODY, "malformed"),
        (signed(**{HEADER_NONCE: "x"}), "POST", TARGET, BODY, "malformed"),
        (signed(**{HEADER_NODE: "a b"}), "POST", TARGET, BODY, "malformed"),
    ],
)
def test_verify_request(headers, method, target, body, code):
    seen = NonceCache()
    if code is None:
        assert verify_request(SECRET, method, target, body, headers, NOW, seen) == "node-A"
        return
    with pytest.raises(SignatureError) as caught:
        verify_request(SECRET, method, target, body, headers, NOW, seen)
    assert caught.value.code == code
    assert SECRET.decode() not in str(caught.value)
    assert len(seen) == 0  # only a valid message is remembered


def test_a_replayed_request_is_refused_within_the_window_and_stale_after():
    seen, headers = NonceCache(), signed()
    assert verify_request(SECRET, "POST", TARGET, BODY, headers, NOW, seen) == "node-A"
    with pytest.raises(SignatureError, match="replayed") as again:
        verify_request(SECRET, "POST", TARGET, BODY, headers, NOW + 5, seen)
    assert again.value.code == "replayed"
    with pytest.raises(SignatureError) as later:  # its nonce forgotten, its timestamp stale
        verify_request(SECRET, "POST", TARGET, BODY, headers, NOW + 31, seen)
    assert later.value.code == "stale"


def test_nonce_cache_forgets_expired_nonces_and_stays_bounded():
    seen = NonceCache(max_entries=3)
    assert seen.add("n1", NOW + 30, NOW) and not seen.add("n1", NOW + 30, NOW)
    assert seen.add("n2", NOW + 30, NOW + 31)  # n1 expired: pruned
    assert "n1" not in seen and len(seen) == 1
    for n in ("n3", "n4", "n5"):
        seen.add(n, NOW + 90, NOW + 32)
    assert len(seen) == 3 and "n2" not in seen


@pytest.mark.parametrize(
    ("secret", "nonce", "status", "body", "code"),
    [
        (SECRET, "ab" * 16, 200, b"report", None),
        (OTHER, "ab" * 16, 200, b"report", "bad_signature"),
        (SECRET, "cd" * 16, 200, b"report", "bad_signature"),  # an answer to another poll
        (SECRET, "ab" * 16, 304, b"report", "bad_signature"),
        (SECRET, "ab" * 16, 200, b"rep0rt", "bad_signature"),
    ],
)
def test_verify_response(secret, nonce, status, body, code):
    headers = sign_response(secret, "ab" * 16, 200, b"report", "node-B", NOW)
    if code is None:
        assert verify_response(SECRET, nonce, status, body, headers, NOW) == "node-B"
        return
    with pytest.raises(SignatureError) as caught:
        verify_response(SECRET, nonce, status, body, headers, NOW)
    assert caught.value.code == code


def test_unsigned_and_stale_answers_are_refused():
    with pytest.raises(SignatureError, match="unsigned"):
        verify_response(SECRET, "ab" * 16, 200, b"x", {}, NOW)
    old = sign_response(SECRET, "ab" * 16, 200, b"x", "node-B", NOW - 60)
    with pytest.raises(SignatureError, match="stale"):
        verify_response(SECRET, "ab" * 16, 200, b"x", old, NOW)


# ---- the middleware and the peer client's auth, in process ----------------------------------


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    state = request.scope.get("state", {})
    return JSONResponse(
        {
            "body": body.decode(),
            "signed": state.get("peer_signed", False),
            "node": state.get("peer_node"),
        }  # fmt: skip
    )


async def _stream(request: Request) -> StreamingResponse:
    async def chunks():
        yield b"one,"
        yield b"two"

    return StreamingResponse(chunks())


def _app(secret: bytes | None, peer_only: tuple[str, ...] | None = ("/peer",)) -> SignedPeers:
    routes = [
        Route("/peer", _echo, methods=["GET", "POST"]),
        Route("/open", _echo, methods=["GET", "POST"]),
        Route("/stream", _stream),
    ]
    return SignedPeers(Starlette(routes=routes), secret, "node-B", peer_only=peer_only)


def _client(app: SignedPeers, auth: httpx.Auth | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b", auth=auth)


def test_signed_calls_pass_marked_and_their_answers_verify():
    async def main() -> None:
        auth = SignedAuth(SECRET, "node-A")
        async with _client(_app(SECRET), auth) as client:
            r = await client.post("/peer?q=1", json={"x": 1})
            assert r.status_code == 200, r.text
            assert r.json() == {"body": '{"x":1}', "signed": True, "node": "node-A"}
            assert auth.verify(r) == "node-B"
            r = await client.get("/open")
            assert r.json()["signed"] is True and auth.verify(r) == "node-B"
            r = await client.get("/stream")  # streamed: headers signed, body as "streamed"
            assert r.text == "one,two" and r.headers[HEADER_SIG]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("server", "client", "path", "status", "code"),
    [
        (SECRET, None, "/peer", 401, "peer_unsigned"),  # a node without the secret
        (SECRET, OTHER, "/peer", 401, "peer_bad_signature"),  # one with another
        (SECRET, OTHER, "/open", 401, "peer_bad_signature"),  # claims to be a peer: refused
        (SECRET, None, "/open", 200, None),  # not peer-only: left to the API key's check
        (None, OTHER, "/peer", 200, None),  # this node has no secret: nothing checked
        (None, None, "/peer", 200, None),
    ],
)
def test_middleware_refuses_what_is_not_signed_with_its_secret(server, client, path, status, code):
    async def main() -> httpx.Response:
        auth = SignedAuth(client, "node-A") if client else None
        async with _client(_app(server), auth) as c:
            return await c.post(path, content=b"hello")

    r = asyncio.run(main())
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code
        assert r.headers[HEADER_NODE] == "node-B"  # who refused, for the caller's `refused`
    else:
        assert r.json()["signed"] is False


def test_a_replayed_call_is_refused_and_logged_without_the_secret(caplog):
    async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        app = _app(SECRET, peer_only=None)  # a rank 0's endpoint: every path is peer-only
        async with _client(app, SignedAuth(SECRET, "node-A")) as c:
            first = await c.post("/open", content=b"x")
        async with _client(app, None) as plain:
            replayed = await plain.send(first.request)  # the same headers, the same body
            unsigned = await plain.get("/stream")
        return first, replayed, unsigned

    with caplog.at_level(logging.INFO):
        first, replayed, unsigned = asyncio.run(main())
    assert first.status_code == 200
    assert replayed.status_code == 401 and replayed.json()["error"]["code"] == "peer_replayed"
    assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "peer_unsigned"
    assert "replayed" in caplog.text and SECRET.decode() not in caplog.text


def test_peer_auth_signs_with_a_secret_else_sends_the_first_api_key():
    assert isinstance(peer_auth(SECRET, "A", ("k1",)), SignedAuth)
    bearer = peer_auth(None, "A", ("k1", "k2"))
    assert isinstance(bearer, BearerAuth)
    request = httpx.Request("GET", "http://b/cluster/report")
    assert next(bearer.auth_flow(request)).headers["authorization"] == "Bearer k1"
    assert peer_auth(None, "A", ()) is None and peer_auth(None, "A", None) is None
    assert first_key(" k1 , k2") == "k1" and first_key("") is None
    assert SECRET.decode() not in repr(peer_auth(SECRET, "A")) and "k1" not in repr(bearer)


# ---- the secret's settings and the runner's environment -------------------------------------


def test_secret_from_flag_or_file(tmp_path: Path):
    assert read_cluster_secret(RunSettings()) is None
    assert read_cluster_secret(RunSettings(cluster_secret=" abc \n")) == b"abc"
    path = tmp_path / "secret"
    path.write_text("from-a-file\n")
    assert read_cluster_secret(RunSettings(cluster_secret_file=str(path))) == b"from-a-file"
    assert "abc" not in repr(RunSettings(cluster_secret="abc"))


@pytest.mark.parametrize(
    ("content", "given", "message"),
    [
        (None, None, "cannot read it"),
        ("  \n", None, "is empty"),
        ("x", "y", "give only one"),
    ],
)
def test_a_bad_secret_setting_is_a_clear_startup_error(tmp_path, content, given, message):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    settings = RunSettings(cluster_secret=given, cluster_secret_file=str(path))
    with pytest.raises(StartupError, match=message):
        read_cluster_secret(settings)


def test_the_runner_gets_the_secret_in_its_environment_only():
    env = runner_env({"PATH": "/bin", "SHOAL_CLUSTER_SECRET": "abc"}, b"abc")
    assert env == {"PATH": "/bin", SECRET_ENV: b"abc".hex()}
    assert runner_secret(env) == b"abc"
    assert runner_secret(runner_env({"PATH": "/bin"}, None)) is None


# ---- the distributed store: bound to the chosen address only --------------------------------


def test_rank_zeros_store_listens_on_the_store_address_only():
    import psutil
    from runner_procs import free_port

    from shoal.engine.distributed import Rendezvous, _open_store

    port = free_port()
    store = _open_store(Rendezvous(0, 2, "127.0.0.9", port), 5.0)
    try:
        store.set("k", "v")
        listening = {
            c.laddr.ip
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {"127.0.0.9"}
    finally:
        del store


@pytest.mark.parametrize(
    ("serve_host", "solo", "expected"),
    [
        ("0.0.0.0", True, "127.0.0.1"),  # only this node relays to its solo model
        ("::", True, "::1"),
        ("10.0.0.5", True, "10.0.0.5"),  # the API's own address: the router dials it
        ("0.0.0.0", False, "0.0.0.0"),  # a placed instance: any node, any of our addresses
        ("10.0.0.5", False, "10.0.0.5"),
    ],
)
def test_rank_zeros_endpoint_listens_where_its_callers_dial(serve_host, solo, expected):
    from shoal.worker import endpoint_host

    assert endpoint_host(serve_host, solo) == expected
