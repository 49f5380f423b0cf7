"""Discovery: pure tables, then real zeroconf instances that talk only over 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from shoal.cluster.discovery import (
    DEFAULT_API_PORT,
    Discovery,
    NotAPeer,
    PeerAnnouncement,
    build_txt,
    default_advertise_addresses,
    namespace_hash,
    parse_announcement,
    parse_static_peers,
    resolve_interfaces,
)
from shoal.schema.report import PROTOCOL_VERSION

WAIT_S = 10.0  # registration probes for ~1.5 s and a goodbye lands ~1 s later; 10 s is slack


def test_namespace_hash_is_pinned_and_distinct_per_namespace() -> None:
    assert namespace_hash("default") == "37a8eec1ce19"  # pinned: peers of all versions agree
    names = ["default", "Default", "lab", "lab ", "test-1", "test-2", ""]
    assert len({namespace_hash(name) for name in names}) == len(names)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("10.0.0.2:6000", [("10.0.0.2", 6000)]),
        ("10.0.0.2", [("10.0.0.2", DEFAULT_API_PORT)]),
        ("mac-studio.local:1,box", [("mac-studio.local", 1), ("box", DEFAULT_API_PORT)]),
        (" a:2 , b:3 ,", [("a", 2), ("b", 3)]),
        ("a:2,a:2,a", [("a", 2), ("a", DEFAULT_API_PORT)]),
        ("[fd00::2]:7000", [("fd00::2", 7000)]),
        ("[fd00::2]", [("fd00::2", DEFAULT_API_PORT)]),
        ("fd00::2", [("fd00::2", DEFAULT_API_PORT)]),
        ("[fe80::1%en5]:52416", [("fe80::1%en5", 52416)]),
        ("h:65535", [("h", 65535)]),
    ],
)
def test_static_peers_parse(text: str, expected: list[tuple[str, int]]) -> None:
    assert parse_static_peers(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a:0", "port '0'"),
        ("a:65536", "port '65536'"),
        ("a:", "port ''"),
        ("a: 1", "port ' 1'"),
        ("ok:1,a:-1", "port '-1'"),
        ("a:01", "port '01'"),
        ("fd00::2:7000:x", "brackets"),
        ("[fd00::2", "expected host:port"),
        ("[fd00::2]7000", "expected host:port"),
        ("[10.0.0.2]:1", "not an IPv6 address"),
        ("bad host:1", "expected host:port"),
    ],
)
def test_static_peers_reject_names_the_bad_entry(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_static_peers(text)
    assert repr(text.split(",")[-1]) in str(info.value)  # the last entry is the bad one
    assert reason in str(info.value)


OURS = namespace_hash("ours")


def txt(**changes: str | None) -> dict[str, str | None]:
    fields: dict[str, str | None] = dict(build_txt("peer-1", "ours", 6000, "0.1.0"))
    fields.update(changes)
    return {key: value for key, value in fields.items() if value != "<drop>"}


def test_txt_round_trips_into_an_announcement() -> None:
    sent = build_txt("peer-1", "ours", 6000, "0.1.0")
    assert sent == dict(id="peer-1", ns=OURS, port="6000", proto=str(PROTOCOL_VERSION), v="0.1.0")
    peer = parse_announcement(txt(), ["fd00::2", "10.0.0.2", "10.0.0.2"], "me", OURS)
    assert peer == PeerAnnouncement("peer-1", ("10.0.0.2", "fd00::2"), 6000, "0.1.0", 1)
    with pytest.raises(NotAPeer, match="no addresses"):
        parse_announcement(txt(), [], "me", OURS)


@pytest.mark.parametrize(
    ("fields", "version", "proto"),
    [
        (txt(v="<drop>"), "unknown", PROTOCOL_VERSION),  # an older peer without a version
        (txt(v=None), "unknown", PROTOCOL_VERSION),
        (txt(proto="7"), "0.1.0", 7),  # a newer protocol is reported; the view decides
        (txt(extra="x"), "0.1.0", PROTOCOL_VERSION),
    ],
)
def test_txt_accepts(fields: dict[str, str | None], version: str, proto: int) -> None:
    peer = parse_announcement(fields, ["127.0.0.1"], "me", OURS)
    assert (peer.version, peer.proto) == (version, proto)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (txt(id="<drop>"), "'id' is missing"),
        (txt(id=None), "'id' is missing"),
        (txt(id="a.b"), "not a node id"),
        (txt(id="x" * 64), "not a node id"),
        (txt(ns="<drop>"), "'ns' is missing"),
        (txt(ns="zz"), "not a namespace hash"),
        (txt(ns=namespace_hash("theirs")), "is not ours"),
        (txt(port="<drop>"), "'port' is missing"),
        (txt(port="0"), "not a port"),
        (txt(port="70000"), "not a port"),
        (txt(port="6000\ufffd"), "not a port"),  # undecodable bytes, replaced
        (txt(proto="<drop>"), "'proto' is missing"),
        (txt(proto="one"), "not a protocol version"),
        (txt(id="me"), "our own"),
    ],
)
def test_txt_rejects_with_a_reason(fields: dict[str, str | None], reason: str) -> None:
    with pytest.raises(NotAPeer, match=reason):
        parse_announcement(fields, ["10.0.0.2"], "me", OURS)


HOST = {
    "lo": ["127.0.0.1", "::1"],
    "en0": ["192.168.1.5", "fe80::1", "2001:db8::5"],
    "bridge0": ["169.254.10.2"],
    "utun3": ["fe80::9"],
}


def test_interfaces_resolve_to_addresses() -> None:
    assert resolve_interfaces(["127.0.0.1"], HOST) == ["127.0.0.1"]
    assert resolve_interfaces(["en0", "192.168.1.5", "lo"], HOST) == ["192.168.1.5", "127.0.0.1"]
    assert resolve_interfaces(["fd00::7"], HOST) == ["fd00::7"]  # zeroconf maps v6 to an index


def test_interfaces_reject_unknown_names_and_interfaces_without_ipv4() -> None:
    with pytest.raises(ValueError, match="neither an IP address nor an interface"):
        resolve_interfaces(["eth9"], HOST)
    with pytest.raises(ValueError, match="no IPv4 address"):
        resolve_interfaces(["utun3"], HOST)


def test_advertised_addresses_default_to_the_bound_ones_else_every_dialable_one() -> None:
    assert default_advertise_addresses(["127.0.0.1"], HOST) == ["127.0.0.1"]
    assert default_advertise_addresses(None, HOST) == ["192.168.1.5", "169.254.10.2", "2001:db8::5"]
    assert default_advertise_addresses(None, {"lo": ["127.0.0.1"]}) == ["127.0.0.1"]


@dataclass
class Events:  # what one Discovery reported; zeroconf's thread appends (atomic for a list)
    peers: list[PeerAnnouncement] = field(default_factory=list)
    goodbyes: list[str] = field(default_factory=list)

    def peer_ids(self) -> set[str]:
        return {peer.node_id for peer in list(self.peers)}


StartNode = Callable[..., tuple[Discovery, Events]]


def make_node(node_id: str, ns: str, port: int = 6000, events: Events | None = None) -> Discovery:
    events = events or Events()
    return Discovery(
        node_id,
        ns,
        port,
        "0.1.0",
        interfaces=["127.0.0.1"],  # never announce on the machine's real interfaces
        advertise_addresses=None,
        on_peer=events.peers.append,
        on_goodbye=events.goodbyes.append,
    )


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {WAIT_S} s")
        time.sleep(0.05)


@pytest.fixture
def start_node() -> Iterator[StartNode]:
    """Starts Discovery instances on 127.0.0.1 only; stops them all afterwards."""
    started: list[Discovery] = []

    def start(namespace: str, port: int = 6000, name: str = "n") -> tuple[Discovery, Events]:
        events = Events()
        # Unique ids: parallel test runs share this host's mDNS on loopback.
        node = make_node(f"{name}-{uuid.uuid4().hex[:12]}", namespace, port, events)
        node.start()
        started.append(node)
        return node, events

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex}"  # parallel test runs on one machine never meet


@pytest.mark.timeout(30)
def test_two_nodes_find_each_other_and_never_themselves(
    start_node: StartNode, namespace: str
) -> None:
    began = time.monotonic()
    a, a_events = start_node(namespace, 6001, "a")
    b, b_events = start_node(namespace, 6002, "b")
    registered = time.monotonic()
    wait_for(lambda: b.node_id in a_events.peer_ids(), "a seeing b")
    wait_for(lambda: a.node_id in b_events.peer_ids(), "b seeing a")
    met = time.monotonic() - registered
    print(f"\ntwo nodes registered in {registered - began:.2f} s, then met after {met:.2f} s")
    loopback = ("127.0.0.1",)
    assert a_events.peers == [PeerAnnouncement(b.node_id, loopback, 6002, "0.1.0", 1)]
    assert b_events.peers == [PeerAnnouncement(a.node_id, loopback, 6001, "0.1.0", 1)]
    assert a_events.goodbyes == b_events.goodbyes == []


@pytest.mark.timeout(30)
def test_a_node_of_another_namespace_is_never_reported(
    start_node: StartNode, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="shoal.cluster.discovery")
    stranger, stranger_events = start_node(f"{namespace}-other", name="stranger")
    a, a_events = start_node(namespace, name="a")
    b, _ = start_node(namespace, name="b")
    wait_for(lambda: b.node_id in a_events.peer_ids(), "a seeing b")
    # a did see the stranger, and turned it down for its namespace rather than missing it
    wait_for(
        lambda: f"ignoring {stranger.node_id}._shoal._tcp.local.: namespace hash" in caplog.text,
        "a rejecting the stranger",
    )
    assert stranger.node_id not in a_events.peer_ids()
    assert stranger_events.peers == []
    assert f"{a.node_id}._shoal._tcp.local.: it is our own announcement" in caplog.text


@pytest.mark.timeout(30)
def test_stopping_a_node_says_goodbye_to_its_peers(start_node: StartNode, namespace: str) -> None:
    a, a_events = start_node(namespace, name="a")
    b, b_events = start_node(namespace, name="b")
    wait_for(lambda: b.node_id in a_events.peer_ids(), "a seeing b")
    stopping = time.monotonic()
    b.stop()
    wait_for(lambda: b.node_id in a_events.goodbyes, "a hearing b's goodbye")
    print(f"\ngoodbye reached the peer {time.monotonic() - stopping:.2f} s after stop() began")
    assert a_events.goodbyes == [b.node_id]
    assert b_events.goodbyes == []
    b.stop()  # a second stop is harmless


@pytest.mark.timeout(30)
def test_an_address_change_is_announced_again(start_node: StartNode, namespace: str) -> None:
    a, a_events = start_node(namespace, name="a")
    b, _ = start_node(namespace, name="b")
    wait_for(lambda: b.node_id in a_events.peer_ids(), "a seeing b")
    # Only the record changes: nothing ever dials 127.0.0.2 here.
    b.update_addresses(["127.0.0.2", "127.0.0.1"])
    wait_for(
        lambda: set(a_events.peers[-1].addresses) == {"127.0.0.1", "127.0.0.2"},
        "a hearing b's new addresses",
    )
    assert a_events.goodbyes == []


def test_start_refuses_to_block_an_event_loop(namespace: str) -> None:
    node = make_node("loop-test", namespace)

    async def start_inside_the_loop() -> None:
        node.start()

    with pytest.raises(RuntimeError, match="to_thread"):
        asyncio.run(start_inside_the_loop())


def test_discovery_refuses_ids_and_ports_peers_could_not_use() -> None:
    with pytest.raises(ValueError, match="node id"):
        make_node("a.b", "default")
    with pytest.raises(ValueError, match="bound port"):
        make_node("ok", "default", port=0)
