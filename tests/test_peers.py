"""The one peer client: host:port parsing table by table, the address ranking (placement's
path ranking over this node's own probe records, never "the first that answered"), and a real
call over loopback that goes to the best-ranked of two listening addresses."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from shoal.cluster.peers import PeerClient, PeerUnknown, rank_addresses
from shoal.schema import address
from shoal.schema.address import base_url, host_of, join_host_port, split_host_port
from shoal.schema.report import InterfaceKind, PathStats

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("address", "default", "expected"),
    [
        ("10.0.0.2:52415", None, ("10.0.0.2", 52415)),
        ("10.0.0.2", 52415, ("10.0.0.2", 52415)),
        ("10.0.0.2", None, ("10.0.0.2", None)),
        ("[fe80::1%en5]:52415", None, ("fe80::1%en5", 52415)),
        ("[::1]", 80, ("::1", 80)),
        ("fe80::1", 80, ("fe80::1", 80)),  # bare IPv6: all host, no port
        ("host.local:8000", None, ("host.local", 8000)),
        ("host:notaport", 1, ("host:notaport", 1)),
        (" 10.0.0.2:1 ", None, ("10.0.0.2", 1)),
    ],
)
def test_split_host_port(address: str, default: int | None, expected: tuple) -> None:
    assert split_host_port(address, default) == expected


@pytest.mark.parametrize(
    ("host", "port", "joined", "url"),
    [
        ("10.0.0.2", 1, "10.0.0.2:1", "http://10.0.0.2:1"),
        ("::1", 2, "[::1]:2", "http://[::1]:2"),
        ("[::1]", 2, "[::1]:2", "http://[::1]:2"),
    ],
)
def test_join_host_port(host: str, port: int, joined: str, url: str) -> None:
    assert join_host_port(host, port) == joined
    assert base_url(host, port) == url
    assert host_of(joined) == host.strip("[]")


def outbound(host: str, kind: InterfaceKind, rtt: float | None, ago: float | None) -> PathStats:
    success = None if ago is None else NOW - ago
    return PathStats(
        peer_node_id="b",
        peer_addr=f"{host}:52415",
        interface_kind=kind,
        rtt_ms_ewma=rtt,
        last_success=success,
        last_attempt=success,
    )


TS, CABLE, WIFI = "100.64.0.2", "192.168.100.2", "10.0.0.2"


@pytest.mark.parametrize(
    ("links", "answered", "best"),
    [
        # seed 002: Tailscale answered first after a restart; the measured cable still wins
        (
            [
                outbound(TS, InterfaceKind.VPN, 45.0, 1),
                outbound(CABLE, InterfaceKind.THUNDERBOLT, 0.4, 1),
            ],
            TS,
            CABLE,
        ),  # fmt: skip
        # nothing measured yet: the subnet and address class decide, not who answered
        ([], TS, CABLE),
        # the cable's probes stopped answering long ago: the working path wins
        (
            [
                outbound(TS, InterfaceKind.VPN, 45.0, 1),
                outbound(CABLE, InterfaceKind.THUNDERBOLT, 0.4, 60),
            ],
            CABLE,
            TS,
        ),  # fmt: skip
        # wifi and cable both usable, same RTT bucket: the interface kind decides
        (
            [
                outbound(WIFI, InterfaceKind.WIFI, 2.0, 1),
                outbound(CABLE, InterfaceKind.ETHERNET, 2.5, 1),
            ],
            WIFI,
            CABLE,
        ),  # fmt: skip
        # a record for another peer says nothing about this one
        (
            [outbound(TS, InterfaceKind.VPN, 45.0, 1).model_copy(update={"peer_node_id": "c"})],
            TS,
            CABLE,
        ),  # fmt: skip
    ],
)
def test_rank_addresses(links: list[PathStats], answered: str, best: str) -> None:
    known = [(TS, 52415), (CABLE, 52415), (WIFI, 52415)]
    ranked = rank_addresses(known, "b", links, NOW, answered=(answered, 52415))
    assert ranked[0] == (best, 52415)
    assert sorted(ranked) == sorted(known)


def test_the_address_that_answered_breaks_a_tie_only() -> None:
    known = [("10.0.0.2", 1), ("10.0.0.3", 1)]  # same shape, nothing measured
    assert rank_addresses(known, "b", [], NOW)[0] == ("10.0.0.2", 1)
    assert rank_addresses(known, "b", [], NOW, answered=("10.0.0.3", 1))[0] == ("10.0.0.3", 1)


CABLE_OK = outbound(CABLE, InterfaceKind.THUNDERBOLT, 0.4, 5)  # last probe reply 5 s ago


@pytest.mark.parametrize(
    ("failed_ago", "best"),
    [
        (None, CABLE),  # nothing failed: the measured cable
        (1, TS),  # a call failed after the cable's last probe reply: it goes last at once
        (9, CABLE),  # the failure is older than a probe reply since: the cable again
    ],
)
def test_an_address_a_call_just_failed_on_goes_last_until_it_answers(
    failed_ago: float | None, best: str
) -> None:
    known = [(TS, 52415), (CABLE, 52415)]
    links = [outbound(TS, InterfaceKind.VPN, 45.0, 1), CABLE_OK]
    failed = {} if failed_ago is None else {(CABLE, 52415): NOW - failed_ago}
    assert rank_addresses(known, "b", links, NOW, failed=failed)[0] == (best, 52415)


@pytest.fixture
def two_listeners() -> Iterator[int]:
    """One app answering its own host on 127.0.0.2 and 127.0.0.3 (same port)."""
    app = FastAPI()

    @app.get("/who")
    def who() -> dict[str, str]:
        return {"ok": "yes"}

    @app.middleware("http")
    async def tag(request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers["x-served-by"] = request.url.hostname or ""
        return response

    probe = socket.socket()
    probe.bind(("127.0.0.2", 0))
    port = probe.getsockname()[1]
    probe.close()
    servers = [
        uvicorn.Server(uvicorn.Config(app, host=h, port=port, log_level="warning"))
        for h in ("127.0.0.2", "127.0.0.3")
    ]
    threads = [threading.Thread(target=s.run, daemon=True) for s in servers]
    for t in threads:
        t.start()
    for s in servers:
        for _ in range(200):
            if s.started:
                break
            threading.Event().wait(0.02)
    yield port
    for s in servers:
        s.should_exit = True
    for t in threads:
        t.join(timeout=5)


def test_a_call_goes_to_the_best_measured_address_over_one_pool(two_listeners: int) -> None:
    port = two_listeners
    links = [outbound("127.0.0.3", InterfaceKind.ETHERNET, 0.1, 1)]  # .3 measured, .2 not

    async def go() -> list[str]:
        peers = PeerClient(lambda: links, clock=lambda: NOW)
        peers.answered("b", ("127.0.0.2", port))  # .2 answered first: no matter
        peers.learn("b", [("127.0.0.3", port)])
        try:
            served = [(await peers.get("b", "/who")).headers["x-served-by"] for _ in range(3)]
            with pytest.raises(PeerUnknown):
                await peers.get("nobody", "/who")
            return served
        finally:
            await peers.aclose()

    assert asyncio.run(go()) == ["127.0.0.3"] * 3


def test_a_failed_call_sends_the_next_one_to_the_next_address(two_listeners: int) -> None:
    port = two_listeners
    closed = socket.socket()  # a port nobody listens on: connection refused
    closed.bind(("127.0.0.3", 0))
    dead = closed.getsockname()[1]
    closed.close()
    links = [outbound("127.0.0.3", InterfaceKind.ETHERNET, 0.1, 1)]  # the dead one measured best

    async def go() -> tuple[str, ...]:
        peers = PeerClient(lambda: links, clock=lambda: NOW)
        peers.learn("b", [("127.0.0.3", dead), ("127.0.0.2", port)])
        try:
            with pytest.raises(httpx.ConnectError):
                await peers.get("b", "/who")
            served = (await peers.get("b", "/who")).headers["x-served-by"]
            return served, peers.best("b")
        finally:
            await peers.aclose()

    assert asyncio.run(go()) == ("127.0.0.2", ("127.0.0.2", port))


@pytest.mark.parametrize(
    ("host", "addresses", "expected"),
    [
        ("10.0.0.2", [("en0", "10.0.0.2/24")], "en0"),
        ("127.0.0.2", [("lo", "127.0.0.1/8")], "lo"),
        ("10.1.2.3", [("wide", "10.0.0.1/8"), ("narrow", "10.1.2.1/24")], "narrow"),
        ("10.1.2.3", [("narrow", "10.1.2.1/24"), ("wide", "10.0.0.1/8")], "narrow"),
        ("10.1.2.3", [("subnet", "10.1.2.1/24"), ("exact", "10.1.2.3/32")], "exact"),
        ("fe80::1%en5", [("en5", "fe80::1/64")], "en5"),
        ("::1", [("lo", "127.0.0.1/8")], None),
        ("192.168.1.9", [("en0", "10.0.0.2/24")], None),
        ("not-an-ip", [("en0", "10.0.0.2/24")], None),
        ("10.0.0.9", [("bad", "garbage"), ("en0", "10.0.0.2/24")], "en0"),
    ],
)  # fmt: skip
def test_interface_holding(host: str, addresses: list, expected: str | None) -> None:
    assert address.interface_holding(host, addresses) == expected
