"""Link probing: path statistics, the probe wire format, and real probers on 127.0.0.x aliases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from shoal.cluster import probe_wire as wire
from shoal.cluster.links import (
    ACK_OK,
    ACK_UNKNOWN,
    ACK_WRONG_IDENTITY,
    INBOUND,
    MAX_OUTSTANDING,
    LinkStats,
    LinkTable,
    PathKey,
    Prober,
    percentile,
)
from shoal.schema.report import InterfaceKind

pytestmark = pytest.mark.timeout(30)

NS = "ns-test"
FAST = {"interval": 0.05, "reply_timeout": 0.5}  # a second of test time is ~20 probes


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([5.0], 0.95, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0.5, 2.5),  # order of arrival does not matter
        ([float(i) for i in range(1, 11)], 0.95, 9.55),
        ([1.0, 100.0], 0.0, 1.0),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_ewma_weights_each_new_rtt_by_alpha() -> None:
    path = LinkStats("B", "10.0.0.2:7000", alpha=0.3)
    for i, rtt in enumerate([0.010, 0.020, 0.020]):
        path.record_sent(f"n{i}", float(i))
        assert path.record_reply(f"n{i}", i + rtt) == pytest.approx(rtt)
    assert path.rtt_ewma == pytest.approx(0.3 * 0.020 + 0.7 * (0.3 * 0.020 + 0.7 * 0.010))
    assert (path.sent, path.received, path.last_success) == (3, 3, pytest.approx(2.020))


def test_unknown_duplicate_and_late_replies_are_not_counted() -> None:
    path = LinkStats("B", "10.0.0.2:7000", reply_timeout=1.0)
    assert path.record_reply("never-sent", 0.5) is None
    path.record_sent("a", 0.0)
    assert path.record_reply("a", 0.1) is not None
    assert path.record_reply("a", 0.2) is None  # duplicate
    path.record_sent("b", 1.0)
    assert path.expire(2.5) == 1
    assert path.record_reply("b", 2.6) is None  # arrived after it was counted lost
    assert (path.received, path.loss) == (1, 0.5)


def test_loss_counts_probes_only_once_they_time_out() -> None:
    path = LinkStats("B", "10.0.0.2:7000", reply_timeout=2.0)
    for i in range(4):
        path.record_sent(f"n{i}", float(i))
    path.record_reply("n0", 0.1)
    path.record_reply("n2", 2.1)
    path.expire(3.5)  # n1 is 2.5 s old: lost; n3 is 0.5 s old: still waiting
    assert path.loss == pytest.approx(1 / 3)
    assert path.is_outstanding("n3") and not path.is_outstanding("n1")
    path.expire(10.0)
    assert path.loss == pytest.approx(2 / 4)


def test_an_outage_leaves_the_loss_window_once_the_path_answers_again() -> None:
    path = LinkStats("B", "10.0.0.2:7000", reply_timeout=1.0)
    path.record_sent("a", 0.0)
    path.record_reply("a", 0.001)
    for i in range(20):  # the peer is gone for 10 s: every probe lost
        path.record_sent(f"lost{i}", 0.5 + i / 2)
    path.expire(11.0)
    assert path.loss > 0.9  # the preflight refuses a path this lossy
    path.record_sent("late", 10.6)  # sent in the outage, its answer never comes
    path.record_sent("back", 11.0)
    path.record_reply("back", 11.001)  # it is back
    path.expire(20.0)
    assert (path.loss, path.received) == (0.0, 2)  # the path as it is since: no loss
    path.record_sent("x", 20.0)
    path.expire(22.0)  # a loss after it is back counts
    assert path.loss == pytest.approx(1 / 2)


def test_windows_and_outstanding_probes_are_bounded() -> None:
    path = LinkStats("B", "10.0.0.2:7000", window=5)
    for i in range(20):  # rtt i ms: only the last five (15..19 ms) stay in the window
        path.record_sent(f"n{i}", 100.0 + i)
        path.record_reply(f"n{i}", 100.0 + i + i / 1000)
    assert path.rtt_p50 == pytest.approx(0.017)
    assert path.rtt_p95 == pytest.approx(0.0188)
    silent = LinkStats("C", "10.0.0.3:7000", window=1000, reply_timeout=1e9)
    for i in range(500):  # a peer that never answers, and no expiry ever runs
        silent.record_sent(f"n{i}", float(i))
    assert len(silent._outstanding) == MAX_OUTSTANDING
    assert silent.loss == 1.0 and silent.sent == 500


def test_report_is_in_milliseconds_and_unix_time() -> None:
    path = LinkStats("B", "10.0.0.2:7000", local_addr="10.0.0.1:7000", local_interface="en5")
    path.record_sent("a", 10.0)
    path.record_reply("a", 10.0123)
    report = path.to_report(clock_offset=1_700_000_000.0)
    assert report.rtt_ms_ewma == report.rtt_ms_p50 == report.rtt_ms_p95 == pytest.approx(12.3)
    assert report.last_success == pytest.approx(1_700_000_010.0123)
    assert report.last_attempt == pytest.approx(1_700_000_010.0)
    assert (report.direction, report.local_interface, report.loss) == ("outbound", "en5", 0.0)


def test_only_the_expected_node_answering_the_nonce_sent_there_counts() -> None:
    table = LinkTable()
    table.record_sent("B", "10.0.0.2:7000", "n1", 0.0)
    table.record_sent("B", "10.0.0.9:7000", "n2", 0.0)
    verdict, path = table.record_ack("n1", "C", 0.001)  # another machine on B's address
    assert verdict == ACK_WRONG_IDENTITY and path is not None
    assert (path.wrong_identity, path.last_wrong_node, path.received) == (1, "C", 0)
    assert table.record_ack("forged", "B", 0.002) == (ACK_UNKNOWN, None)
    verdict, path = table.record_ack("n2", "B", 0.003)  # credits the address n2 went to only
    assert verdict == ACK_OK and path is not None and path.peer_addr == "10.0.0.9:7000"
    first = table.get(PathKey("B", "10.0.0.2:7000"))
    assert first is not None and first.received == 0
    table.expire(10.0)
    assert table.record_ack("n1", "B", 10.1) == (ACK_UNKNOWN, None)  # too late
    assert first.loss == 1.0


def test_inbound_records_expire_and_are_capped() -> None:
    table = LinkTable(inbound_ttl=10.0, max_inbound=3)
    for i in range(4):
        table.record_inbound("A", f"10.0.0.{i}:7000", "10.0.0.99:7000", float(i))
    path = table.record_inbound("A", "10.0.0.3:7000", "10.0.0.99:7000", 4.0)
    assert path.received == 2 and path.direction == INBOUND
    assert sorted(p.peer_addr for p in table.paths()) == [f"10.0.0.{i}:7000" for i in (1, 2, 3)]
    table.expire(13.5)  # 10.0.0.1 and .2 were quiet for more than 10 s
    assert [p.peer_addr for p in table.paths()] == ["10.0.0.3:7000"]


@pytest.mark.parametrize("secret", [None, b"cluster-secret"])
def test_wire_round_trip(secret: bytes | None) -> None:
    ts = f"{time.time():.3f}" if secret else None  # a signed probe carries its send time
    for message in (wire.Probe("A", NS, "n1", "127.0.0.3:7000", ts), wire.Ack("B", NS, "n1")):
        data = wire.encode(message, secret)
        assert len(data) < 200 and wire.decode(data, NS, secret) == message
        reordered = json.dumps(dict(reversed(json.loads(data).items()))).encode()
        assert wire.decode(reordered, NS, secret) == message  # signature is over canonical JSON


def _body(**changes: Any) -> dict[str, Any]:
    body = {"v": 1, "t": "probe", "from": "A", "ns": NS, "nonce": "n1", "to": "127.0.0.3:1"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def _raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


SIGNED_WITH_OTHER_KEY = wire.encode(wire.Probe("A", NS, "n1", "127.0.0.3:1"), b"other-secret")
TAMPERED = json.loads(wire.encode(wire.Probe("A", NS, "n1", "127.0.0.3:1"), b"k"))
TAMPERED["nonce"] = "n2"
# Judged at a fixed NOW, not the wall clock: the table is built at collection, maybe minutes
# before the test runs in a full suite.
NOW = 1_700_000_000.0
STALE = wire.encode(wire.Probe("A", NS, "n1", "127.0.0.3:1", f"{NOW - 60:.3f}"), b"k")
AHEAD = wire.encode(wire.Probe("A", NS, "n1", "127.0.0.3:1", f"{NOW + 60:.3f}"), b"k")


@pytest.mark.parametrize(
    ("data", "secret", "reason"),
    [
        (b"not json", None, "malformed"),
        (b"\xff\xfe\x00", None, "malformed"),
        (b"[1, 2]", None, "not an object"),
        (b"[" * 1500, None, "malformed"),  # nesting bomb within the size limit
        (_raw(_body(pad="x" * 3000)), None, "oversized"),
        (_raw(_body(v=2)), None, "version"),
        (_raw(_body(v=True)), None, "version"),
        (_raw({k: v for k, v in _body().items() if k != "v"}), None, "version"),
        (_raw(_body(t="gossip")), None, "unknown type"),
        (_raw(_body(ns="other-cluster")), None, "other namespace"),
        (_raw(_body(nonce=None)), None, "bad field 'nonce'"),
        (_raw(_body(**{"from": 7})), None, "bad field 'from'"),
        (_raw(_body(to="x" * 300)), None, "bad field 'to'"),
        (_raw({"v": 1, "t": "ack", "ns": NS, "nonce": "n1"}), None, "bad field 'node'"),
        (_raw(_body()), b"k", "unsigned"),
        (SIGNED_WITH_OTHER_KEY, b"k", "bad signature"),
        (_raw(TAMPERED), b"k", "bad signature"),
        (wire.encode(wire.Probe("A", NS, "n1", "127.0.0.3:1"), b"k"), b"k", "bad field 'ts'"),
        (STALE, b"k", "stale: signed 60 s ago"),
        (AHEAD, b"k", "in the future"),
    ],
)
def test_wire_rejects(data: bytes, secret: bytes | None, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(data, NS, secret, now=NOW)


def run(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(factory(), 25))


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(*probers: Prober) -> AsyncIterator[None]:
    try:
        for prober in probers:
            await prober.start()
        yield
    finally:
        for prober in probers:
            await prober.stop()


def prober(node_id: str, host: str, **kwargs: Any) -> Prober:
    return Prober(node_id, NS, bind_host=host, port=0, **{**FAST, **kwargs})


def addr(p: Prober) -> str:  # "host:port" as paths name it
    return wire.format_addr(*p.address)


def test_two_nodes_measure_each_other_both_ways() -> None:
    async def scenario() -> None:
        # A generous timeout: "no loss" must not depend on how busy the test machine is.
        a = prober("A", "127.0.0.2", reply_timeout=2.0)
        b = prober("B", "127.0.0.3", reply_timeout=2.0)
        async with running(a, b):
            a.set_targets({"B": [b.address]})
            b.set_targets({"A": [a.address]})
            to_b, to_a = a.path("B", addr(b)), b.path("A", addr(a))
            assert to_b is not None and to_a is not None
            await wait_until(lambda: to_b.received >= 3 and to_a.received >= 3)
            await wait_until(lambda: bool(b.inbound("A")) and bool(a.inbound("B")))
            reports = {(r.peer_node_id, r.direction): r for r in a.snapshot()}
            a_addr, b_addr = addr(a), addr(b)
        out = reports[("B", "outbound")]
        assert out.rtt_ms_ewma is not None and out.rtt_ms_p50 is not None and out.loss == 0.0
        assert out.rtt_ms_p95 is not None and out.rtt_ms_p95 < 500
        assert (out.local_addr, out.local_interface) == (a_addr, "lo")
        assert out.interface_kind == InterfaceKind.LOOPBACK
        assert out.last_success == pytest.approx(time.time(), abs=5)
        inbound = reports[("B", "inbound")]  # B's probes reached A: recorded by A, the receiver
        assert (inbound.peer_addr, inbound.local_addr) == (b_addr, a_addr)
        assert inbound.received >= 1 and inbound.local_interface == "lo"
        assert to_a.rtt_ewma is not None and to_a.loss == 0.0

    run(scenario)


def test_another_node_on_the_peer_address_is_wrong_identity_never_success() -> None:
    async def scenario() -> None:
        a, b, c = prober("A", "127.0.0.2"), prober("B", "127.0.0.3"), prober("C", "127.0.0.4")
        async with running(a, b, c):
            a.set_targets({"B": [b.address, c.address]})  # stale address: C answers there now
            real, impostor = a.path("B", addr(b)), a.path("B", addr(c))
            assert real is not None and impostor is not None
            await wait_until(lambda: impostor.wrong_identity >= 3 and impostor.loss > 0.5)
            report = next(r for r in a.snapshot() if r.peer_addr == addr(c))
            assert real.received >= 3 and real.loss == 0.0
            assert c.inbound("A")  # the probe did reach C, and C says so
        assert impostor.last_wrong_node == "C" and impostor.received == 0
        assert (report.received, report.last_success, report.rtt_ms_ewma) == (0, None, None)

    run(scenario)


def test_own_address_never_passes_for_the_peer() -> None:
    async def scenario() -> None:
        a = prober("A", "127.0.0.2")
        async with running(a):
            a.set_targets({"B": [a.address]})  # a loopback/alias that is really ourselves
            path = a.path("B", addr(a))
            assert path is not None
            await wait_until(lambda: path.wrong_identity >= 3)
            assert path.received == 0 and path.last_wrong_node == "A"
            assert a.inbound("A") == []  # our own probes are not a path

    run(scenario)


def test_stopped_peer_shows_growing_loss_and_no_new_success() -> None:
    async def scenario() -> None:
        a, b = prober("A", "127.0.0.2"), prober("B", "127.0.0.3")
        async with running(a, b):
            a.set_targets({"B": [b.address]})
            path = a.path("B", addr(b))
            assert path is not None
            await wait_until(lambda: path.received >= 3)
            await b.stop()
            last_success, sent = path.last_success, path.sent
            await wait_until(lambda: path.loss >= 0.5)
            assert path.last_success == last_success and path.sent > sent
            loss_then = path.loss
            await asyncio.sleep(0.5)
            assert path.loss > loss_then

    run(scenario)


def test_one_way_path_is_visible_to_both_sides() -> None:
    async def scenario() -> None:
        cut: set[tuple[str, int]] = set()  # B drops what it sends here: B -> A is cut
        a, b = prober("A", "127.0.0.2"), prober("B", "127.0.0.3", drop_outgoing=cut.__contains__)
        async with running(a, b):
            cut.add(a.address)
            a.set_targets({"B": [b.address]})
            path = a.path("B", addr(b))
            assert path is not None
            await wait_until(lambda: path.sent >= 10 and path.loss == 1.0)
            seen = b.inbound("A")
            assert path.received == 0 and path.last_success is None
            assert len(seen) == 1 and seen[0].received >= 5 and seen[0].last_success is not None
            assert seen[0].local_addr == addr(b)

    run(scenario)


def test_address_where_nobody_answers_is_total_loss() -> None:
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
            mute.bind(("127.0.0.5", 0))  # receives, never replies
            a = prober("A", "127.0.0.2")
            async with running(a):
                a.set_targets({"B": [mute.getsockname()]})
                path = a.path("B", wire.format_addr(*mute.getsockname()))
                assert path is not None
                await wait_until(lambda: path.sent >= 10 and path.loss == 1.0)
                assert path.rtt_ewma is None and path.received == 0

    run(scenario)


def test_garbage_foreign_and_unsigned_datagrams_get_no_answer() -> None:
    async def scenario() -> None:
        a = prober("A", "127.0.0.2", secret=b"k")
        async with running(a):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.bind(("127.0.0.6", 0))
                raw.setblocking(False)
                target, now = addr(a), f"{time.time():.3f}"
                junk = [
                    b"\x00garbage",
                    b"{" * 5000,
                    wire.encode(wire.Probe("X", NS, "unsigned", target)),
                    wire.encode(wire.Probe("X", "other-ns", "foreign", target), b"k"),
                    wire.encode(wire.Ack("X", NS, "stray"), b"k"),
                    good := wire.encode(wire.Probe("X", NS, "good", target, now), b"k"),
                    good,  # replayed: dropped
                ]
                for data in junk:
                    raw.sendto(data, a.address)
                reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(raw, 4096), 5)
                assert wire.decode(reply, NS, b"k") == wire.Ack("A", NS, "good")
                await asyncio.sleep(0.2)
                with pytest.raises(BlockingIOError):
                    raw.recv(4096)  # nothing else was answered
                seen = a.inbound("X")
                assert len(seen) == 1 and seen[0].received == 1

    run(scenario)


def test_nodes_with_one_secret_measure_each_other_both_ways() -> None:
    async def scenario() -> None:
        a = prober("A", "127.0.0.2", secret=b"one", reply_timeout=2.0)
        b = prober("B", "127.0.0.3", secret=b"one", reply_timeout=2.0)
        async with running(a, b):
            a.set_targets({"B": [b.address]})
            path = a.path("B", addr(b))
            assert path is not None
            await wait_until(lambda: path.received >= 3 and bool(b.inbound("A")))

    run(scenario)


def test_nodes_with_different_secrets_never_count_each_other() -> None:
    async def scenario() -> None:
        a = prober("A", "127.0.0.2", secret=b"one")
        b = prober("B", "127.0.0.3", secret=b"two")
        async with running(a, b):
            a.set_targets({"B": [b.address]})
            path = a.path("B", addr(b))
            assert path is not None
            await wait_until(lambda: path.sent >= 10 and path.loss == 1.0)
            assert path.received == 0 and b.inbound("A") == []

    run(scenario)


def test_targets_replace_paths_and_skip_self() -> None:
    a = prober("A", "127.0.0.2")  # not started: targets and routes need no socket
    a.set_targets({"B": [("127.0.0.3", 7001), ("127.0.0.4", 7001)], "A": [("127.0.0.2", 1)]})
    assert sorted(p.peer_addr for p in a.snapshot()) == ["127.0.0.3:7001", "127.0.0.4:7001"]
    a.set_targets({"C": [("127.0.0.5", 7001)]})
    (only,) = a.snapshot()
    assert (only.peer_node_id, only.sent, only.local_interface) == ("C", 0, "lo")
    assert only.local_addr == "127.0.0.2:0"  # the real port once started


def test_stop_releases_socket_and_task() -> None:
    async def scenario() -> None:
        a = prober("A", "127.0.0.2")
        await a.start()
        bound = a.address
        await a.stop()
        await a.stop()  # idempotent
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("shoal-prober")]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(bound)  # the port is free again: the socket was closed

    run(scenario)
