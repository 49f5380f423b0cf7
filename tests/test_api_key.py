"""`--api-key`: the pure check table by table, then a real keyed node (bundled SmolLM2, uvicorn)
route by route, with the real openai and anthropic clients and the real `shoal chat`."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx
import openai
import psutil
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from test_cli import shoal

from shoal.api.app import create_app
from shoal.api.auth import allowed, api_keys, credentials, open_api_warning, parse_keys
from shoal.config import Paths, RunSettings, StartupError
from shoal.models.bundled import BUNDLED_MODEL_ID as MODEL
from shoal.node import Node

from conftest import SERVER_SETTINGS, LiveServer, live_node
from test_instances import Pair
from waiting import wait_for

pytestmark = pytest.mark.timeout(300)

KEY, OTHER = "sk-shoal-test-1", "second-key"  # the node accepts both
KEYS = (KEY, OTHER)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
OPEN = {"/health", "/"}  # and the dashboard's static files: the page asks for the key itself


# ---- the pure check ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "keys", "peer_signed", "ok"),
    [
        ("/v1/models", {"authorization": f"Bearer {KEY}"}, KEYS, False, True),
        ("/v1/models", {"authorization": f"bearer  {OTHER} "}, KEYS, False, True),  # 2nd key
        ("/v1/messages", {"x-api-key": KEY}, KEYS, False, True),  # Anthropic's clients
        ("/v1/models", {"authorization": "Bearer wrong", "x-api-key": KEY}, KEYS, False, True),
        ("/v1/models", {"authorization": "Bearer wrong"}, KEYS, False, False),
        ("/v1/models", {"authorization": KEY}, KEYS, False, False),  # no scheme
        ("/v1/models", {"authorization": f"Basic {KEY}"}, KEYS, False, False),
        ("/v1/models", {"x-api-key": KEY[:-1]}, KEYS, False, False),  # a prefix is no key
        ("/v1/models", {"x-api-key": KEY + "x"}, KEYS, False, False),
        ("/v1/models", {}, KEYS, False, False),  # missing
        ("/state", {}, KEYS, False, False),
        ("/dashboard", {}, KEYS, False, False),  # only the files under it are open
        ("/health", {}, KEYS, False, True),
        ("/", {}, KEYS, False, True),
        ("/dashboard/app.js", {}, KEYS, False, True),
        ("/instance/x", {}, KEYS, True, True),  # signed with the cluster secret
        ("/instance/x", {}, KEYS, False, False),
        ("/v1/models", {}, (), False, True),  # no key set: open
    ],
)
def test_allowed(
    path: str, headers: dict[str, str], keys: tuple[str, ...], peer_signed: bool, ok: bool
) -> None:
    assert allowed(path, headers, keys, peer_signed) is ok


@pytest.mark.parametrize(
    ("headers", "found"),
    [
        ({}, []),
        ({"authorization": "Bearer a"}, ["a"]),
        ({"authorization": "Bearer "}, []),
        ({"authorization": "Bearer a", "x-api-key": "b"}, ["a", "b"]),
        ({"x-api-key": " b "}, ["b"]),
    ],
)
def test_credentials(headers: dict[str, str], found: list[str]) -> None:
    assert credentials(headers) == found


@pytest.mark.parametrize(
    ("text", "sep", "keys"),
    [
        ("", ",", ()),
        ("a", ",", ("a",)),
        (" a , b,,a ", ",", ("a", "b")),
        ("# keys\na\n\n b \n#c\n", "\n", ("a", "b")),
    ],
)
def test_parse_keys(text: str, sep: str, keys: tuple[str, ...]) -> None:
    assert parse_keys(text, sep) == keys


@pytest.mark.parametrize("bad", ["a b", "kéy", "a\tb"])
def test_a_key_a_header_cannot_carry_is_a_startup_error(bad: str) -> None:
    with pytest.raises(StartupError, match="printable ASCII"):
        parse_keys(bad, "\n")


def test_keys_from_the_flag_and_the_file(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("# one a line\nfile-key\nk1\n")
    settings = RunSettings(api_key="k1,k2", api_key_file=str(file))
    assert api_keys(settings) == ("k1", "k2", "file-key")
    assert KEY not in repr(replace(settings, api_key=KEY))  # no key in a printed settings
    with pytest.raises(StartupError, match="--api-key-file .*missing"):
        api_keys(RunSettings(api_key_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(StartupError, match="holds no key"):
        api_keys(RunSettings(api_key_file=str(tmp_path / "empty")))


@pytest.mark.parametrize(
    ("host", "keys", "warns"),
    [
        ("0.0.0.0", (), True),
        ("::", (), True),
        ("192.168.1.5", (), True),
        ("my-host.lan", (), True),
        ("0.0.0.0", ("k",), False),
        ("127.0.0.1", (), False),
        ("127.0.0.2", (), False),
        ("::1", (), False),
        ("localhost", (), False),
    ],
)
def test_open_api_warning(host: str, keys: tuple[str, ...], warns: bool) -> None:
    warning = open_api_warning(host, keys)
    assert (warning is not None) is warns
    if warning:
        assert "--api-key" in warning and "\n" not in warning


@pytest.mark.parametrize(
    ("host", "api_key", "lines"), [("0.0.0.0", "", 1), ("0.0.0.0", KEY, 0), ("127.0.0.1", "", 0)]
)
def test_a_node_open_beyond_loopback_warns_once_at_startup(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, host: str, api_key: str, lines: int
) -> None:
    settings = RunSettings(host=host, api_key=api_key, model="none", paths=_home(tmp_path))
    with caplog.at_level(logging.WARNING):
        Node(settings).close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    opened = [line for line in said if "open to anyone" in line]
    assert len(opened) == lines, said
    assert all(KEY not in line for line in said)


def test_a_request_the_cluster_secret_verified_needs_no_key() -> None:
    """The contract with the cluster-secret middleware: it marks a verified request with
    scope["state"]["peer_signed"], and the key check lets that request through."""
    settings = RunSettings(api_key=KEY, host="127.0.0.1")
    app = create_app(SimpleNamespace(settings=settings, ready=True, not_ready_reason=""))

    def signed(inner: ASGIApp) -> ASGIApp:
        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("state", {})["peer_signed"] = True
            await inner(scope, receive, send)

        return asgi

    assert TestClient(app).delete("/instance/x").status_code == 401
    # past the key check, the route answers (this bare host holds no cluster: a 503/500)
    assert TestClient(signed(app)).delete("/instance/x").status_code != 401


# ---- a real keyed node ---------------------------------------------------------------------------


def _home(root: Path) -> Paths:
    return Paths.from_env({"SHOAL_HOME": str(root)})  # its own identity and event log


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    home = _home(tmp_path_factory.mktemp("keyed"))
    with live_node(replace(SERVER_SETTINGS, api_key=f"{KEY},{OTHER}", paths=home)) as live:
        yield live


def concrete(path: str) -> str:
    """/instance/{instance_id} -> /instance/x: a path every route answers quickly (4xx)."""
    return re.sub(r"\{[^}]+\}", "x", path)


def every_route(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route and mount in app.routes, included routers' too (FastAPI
    0.16x keeps an included router whole, with its prefix, instead of copying its routes)."""
    found = []
    for route in routes:
        if included := getattr(route, "original_router", None):
            found += every_route(included.routes, prefix + route.include_context.prefix)
        elif isinstance(route, Mount):
            found.append(("GET", f"{prefix}{route.path}/app.js"))
        elif isinstance(route, APIRoute | Route):
            path = concrete(prefix + route.path)
            found += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return found


def assert_refused_in_shape(path: str, response: httpx.Response) -> None:
    assert response.status_code == 401, (path, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    if path.startswith(("/api/", "/ollama/api/")):  # Ollama
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        message = body["error"]
    elif path.startswith("/v1/messages"):  # Anthropic
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error", body
        message = body["error"]["message"]
    else:  # OpenAI's shape, as every other route of the node answers
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] in ("missing_api_key", "invalid_api_key"), body
        message = body["error"]["message"]
    assert "Authorization: Bearer" in message and "x-api-key" in message


def test_every_route_needs_the_key(keyed: LiveServer) -> None:
    routes = every_route(keyed.node.app.routes)
    assert len(routes) > 40 and ("DELETE", "/instance/x") in routes
    answers = []
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        for method, path in routes:
            bare = http.request(method, path)
            wrong = http.request(method, path, headers={"x-api-key": "wrong"})
            right = http.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            answers += [bare.text, wrong.text, right.text]
            if path in OPEN or path.startswith("/dashboard/"):
                assert bare.status_code != 401 and wrong.status_code != 401, (method, path)
                continue
            assert_refused_in_shape(path, bare)
            assert_refused_in_shape(path, wrong)
            assert right.status_code != 401, (method, path, right.text)
        assert http.get("/openapi.json", headers={"x-api-key": OTHER}).status_code == 200
    assert not [a for a in answers if KEY in a or OTHER in a]  # never echoed back


def test_the_key_is_in_no_document_and_no_runner_command_line(keyed: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in ("/state", "/cluster/report", "/cluster/nodes", "/cluster/history", "/models"):
        response = httpx.get(keyed.url + path, headers=headers, timeout=30)
        assert response.status_code == 200, (path, response.text)
        assert KEY not in response.text and OTHER not in response.text, path
    runners = psutil.Process().children(recursive=True)
    assert runners, "the bundled model runs in a runner process"
    assert not [p for p in runners if any(KEY in part for part in p.cmdline())]


def test_a_peers_unsigned_delete_is_refused(keyed: LiveServer) -> None:
    """From another address, as a peer node's call would come, without the key or a cluster
    signature: refused before the plan changes; with the key the same call deletes."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.url, headers=auth, timeout=60) as owner:
        placed = owner.post("/place_instance", json={"model_id": MODEL})
        assert placed.status_code == 200, placed.text
        instance_id = placed.json()["instance_id"]
        peer = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=peer, base_url=keyed.url, timeout=30) as unsigned:
            for method, path in [("DELETE", f"/instance/{instance_id}"),
                                 ("POST", "/place_instance"), ("POST", "/instance"),
                                 ("POST", "/models/pull"), ("GET", "/cluster/reach")]:  # fmt: skip
                assert_refused_in_shape(path, unsigned.request(method, path))
        assert instance_id in owner.get("/state").json()["instances"]
        deleted = owner.delete(f"/instance/{instance_id}")
        assert deleted.status_code == 200, deleted.text
        assert instance_id not in owner.get("/state").json()["instances"]


def test_the_openai_client_with_the_key(keyed: LiveServer) -> None:
    client = openai.OpenAI(base_url=keyed.base_url, api_key=KEY, max_retries=0, timeout=60)
    answer = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    wrong = openai.OpenAI(base_url=keyed.base_url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401


def test_the_anthropic_client_with_the_key(keyed: LiveServer) -> None:
    client = anthropic.Anthropic(base_url=keyed.url, api_key=OTHER, max_retries=0, timeout=60)
    greedy = {"temperature": 0}  # this anthropic client version takes it as an extra field
    message = client.messages.create(model=MODEL, max_tokens=24, messages=FRANCE, extra_body=greedy)
    assert "Paris" in "".join(b.text for b in message.content if b.type == "text")
    wrong = anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        wrong.messages.create(model=MODEL, max_tokens=4, messages=FRANCE)
    assert refused.value.status_code == 401
    assert refused.value.body["error"]["type"] == "authentication_error"


def test_shoal_chat_with_and_without_the_key(keyed: LiveServer) -> None:
    ask = ("chat", "--api", keyed.url, "-m", "What is the capital of France?",
           "--temperature", "0", "--max-tokens", "24")  # fmt: skip
    with_key = shoal(*ask, "--api-key", KEY)
    out, err = with_key.communicate(timeout=120)
    assert with_key.returncode == 0, err
    assert "Paris" in out
    without = shoal(*ask)  # test_cli's shoal() leaves every SHOAL_* variable out
    out, err = without.communicate(timeout=120)
    assert without.returncode == 1, (out, err)
    assert "--api-key" in err and "SHOAL_API_KEY" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


# ---- a keyed cluster without a cluster secret --------------------------------------------------


def test_nodes_with_the_same_key_form_a_cluster_and_a_node_with_another_does_not(
    tmp_path: Path,
) -> None:
    """Peer calls carry the node's first key (cluster.peers), so a keyed cluster still talks;
    a node with another key gets 401 on every poll, both ways, and never merges."""
    port, hosts = 52805, {"a": "127.0.0.4", "b": "127.0.0.5"}
    stranger = "127.0.0.6"
    everyone = ",".join(f"{h}:{port}" for h in [*hosts.values(), stranger])
    listed = ("--model", "none", "--peers", everyone)  # each lists all three
    (tmp_path / "keyed").mkdir()
    (tmp_path / "other").mkdir()
    keyed = Pair(tmp_path / "keyed", port=port, env={"SHOAL_API_KEY": KEY}, hosts=hosts,
                 extra=listed)  # fmt: skip
    other = Pair(tmp_path / "other", port=port, env={"SHOAL_API_KEY": "another-key"},
                 hosts={"c": stranger}, extra=listed)  # fmt: skip
    auth = {"Authorization": f"Bearer {KEY}"}

    def names(pair: Pair, name: str, key: str) -> set[str]:
        try:
            answer = httpx.get(pair.url(name, "/state"), headers={"x-api-key": key}, timeout=5)
        except httpx.HTTPError:
            return set()
        nodes = answer.json()["nodes"] if answer.status_code == 200 else []
        return {n["name"] for n in nodes if n["status"] == "alive"}

    try:
        for name in hosts:
            keyed.start(name)
        other.start("c")
        for name in hosts:
            wait_for(f"{name} sees a and b", lambda n=name: names(keyed, n, KEY) == {"a", "b"},
                     60, 0.5, detail=keyed.log)  # fmt: skip
        wait_for("c up", lambda: names(other, "c", "another-key") == {"c"}, 60, 0.5)
        for _ in range(3):  # several poll rounds later: still apart
            time.sleep(1)
            assert names(keyed, "a", KEY) == {"a", "b"}
            assert names(other, "c", "another-key") == {"c"}
        assert httpx.get(other.url("c", "/state"), headers=auth, timeout=5).status_code == 401
    finally:
        keyed.stop()
        other.stop()
