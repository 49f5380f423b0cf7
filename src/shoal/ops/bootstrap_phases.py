"""`shoal bootstrap`'s phases over HTTP: each fetches what it needs over the nodes' APIs (no
SSH) and hands it to its pure verdict (`judge_*` in ops.phase_gates). The command that runs them
in order, with the ledger, is ops.bootstrap.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from shoal.models.manifest import Manifest
from shoal.ops import audit
from shoal.ops.client import (
    API_KEY_ENV,
    START_HINT,
    ApiClient,
    ApiError,
    ApiUnreachable,
    api_base,
    cannot_reach,
    failure_text,
    transport_cause,
)
from shoal.ops.phase_gates import (
    FAIL,
    SERVING,
    ChatAnswer,
    NodeApi,
    Options,
    PhaseResult,
    Probe,
    bench_command,
    chat_body,
    conclude,
    gate,
    judge_audit,
    judge_canary,
    judge_first_chat,
    judge_join,
    judge_placement,
    judge_preflight,
    judge_transport,
)
from shoal.ops.run_ledger import (
    Ledger,
)
from shoal.schema.documents import StateDocument
from shoal.schema.exo import InstanceBody

TITLES = {
    "preflight": "nodes alive and answering, drift, disk, model card, model dir per node",
    "audit": "files complete and identical on every node (RING_INPUT_READY)",
    "canary": "each node alone: /state answers and the model is downloaded",
    "join": "enough nodes alive in one cluster",
    "placement": "an instance of the model with every runner ready",
    "transport": "the instance's ports reachable both ways",
    "first_chat": "a real chat completion from every node",
    "bench": "shoal bench, results written as they come",
}
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3
POLL_S = 1.0
PLACE_RETRY_S = 15.0  # right after a join the paths may not be measured yet
API_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
CHAT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)


# -- the phases over HTTP ----------------------------------------------------------------------


class Unreachable(Exception):
    """The --api node does not answer: nothing else can be checked."""


@contextmanager
def reaching(api: str) -> Iterator[None]:
    """A call to the --api node that cannot connect is Unreachable: nothing else can run."""
    try:
        yield
    except ApiUnreachable as exc:
        raise Unreachable(f"cannot reach {api} ({exc.cause}): {START_HINT}") from None


@dataclass
class Context:
    opts: Options
    api: ApiClient  # the --api node; api.at(url) reaches another node over the same pool
    ledger: Ledger
    say: Callable[[str], None]
    previous_dirs: dict[str, str] = field(default_factory=dict)

    def state(self) -> StateDocument:
        with reaching(self.opts.api):
            try:
                return self.api.state()
            except ApiError as exc:
                raise Unreachable(str(exc)) from None

    def nodes(self, refresh: bool = False) -> list[NodeApi]:
        """Every alive node and the API address that answered from here (kept in the ledger,
        so a resumed run does not probe again)."""
        if refresh or not self.ledger.nodes:
            found = find_apis(self.api, self.state())
            self.ledger.nodes = [
                {"name": n.name, "node_id": n.node_id, "api": n.api or ""} for n in found
            ]
            return found
        return [NodeApi(n["node_id"], n["name"], n["api"] or None) for n in self.ledger.nodes]

    def manifests(self, hash: bool) -> tuple[dict[str, Manifest | str], dict[str, Any]] | str:
        """Every node's manifest and the card, through the --api node; or why not."""
        try:
            found = audit.collect(self.api, self.opts.model, None, hash, 900.0 if hash else 30.0)
        except ApiUnreachable as exc:
            raise Unreachable(cannot_reach(exc.base, exc)) from None
        except ApiError as exc:
            return str(exc)
        dirs = {n: m.dir for n, m in found[0].items() if isinstance(m, Manifest)}
        self.ledger.model_dirs = dict(sorted(dirs.items()))
        return found


def find_apis(api: ApiClient, state: StateDocument) -> list[NodeApi]:
    """Each alive node's first advertised address whose /node_id names that node."""
    found = []
    for node in (n for n in state.nodes if n.status == "alive"):
        errors = []
        for address in node.addresses:
            url = api_base(address)
            try:
                answer, status = api.at(url).node_id(), 200
            except ApiError as exc:
                answer, status = None, exc.status
            except (ApiUnreachable, httpx.HTTPError) as exc:
                errors.append(f"{address}: {type(transport_cause(exc)).__name__}")
                continue
            if answer == node.node_id:
                found.append(NodeApi(node.node_id, node.name, url))
                break
            errors.append(f"{address}: HTTP {status}, not {node.name}'s API")
        else:
            error = "; ".join(errors) or "no advertised address"
            found.append(NodeApi(node.node_id, node.name, None, error))
    return sorted(found, key=lambda n: n.name)


def _instances_of(state: StateDocument, model_id: str) -> dict[str, InstanceBody]:
    """The plan's instances of the model, by id."""
    return {iid: b for iid, b in state.instance_bodies().items() if b.model_id == model_id}


def preflight(ctx: Context) -> PhaseResult:
    state, apis = ctx.state(), ctx.nodes(refresh=True)
    found = ctx.manifests(hash=False)
    if isinstance(found, str):
        return conclude("preflight", [gate("manifests", False, found)])
    return judge_preflight(ctx.opts, state, apis, *found, ctx.previous_dirs)


def audit_phase(ctx: Context) -> PhaseResult:
    found = ctx.manifests(hash=ctx.opts.hash)
    if isinstance(found, str):
        return conclude("audit", [gate("manifests", False, found)])
    return judge_audit(ctx.opts, *found)


def canary(ctx: Context) -> PhaseResult:
    return judge_canary(ctx.opts, {n.name: (n, _canary_problem(ctx, n)) for n in ctx.nodes()})


def _canary_problem(ctx: Context, node: NodeApi) -> str | None:
    if node.api is None:
        return f"no API address answers: {node.error}"
    api, path = ctx.api.at(node.api), "/state"
    try:
        api.state()
        path = "/v1/models"
        ids = api.models(status="downloaded")
    except ApiError as exc:
        return f"{path}: {exc}"
    except (ApiUnreachable, httpx.HTTPError, ValueError) as exc:
        return f"{node.api}: {failure_text(exc)}"
    if ctx.opts.model not in ids:
        return f"not in /v1/models?status=downloaded (it lists: {', '.join(ids) or 'nothing'})"
    return None


def join(ctx: Context) -> PhaseResult:
    started = time.monotonic()
    while True:
        state = ctx.state()
        alive = sum(n.status == "alive" for n in state.nodes)
        waited = time.monotonic() - started
        if alive >= ctx.opts.min_nodes or waited >= ctx.opts.join_timeout:
            break
        time.sleep(POLL_S)
    result = judge_join(ctx.opts, state, waited, audited=ctx.ledger.model_dirs)
    if result.status != FAIL:
        ctx.nodes(refresh=True)  # nodes that joined just now get their API address
    return result


def placement(ctx: Context) -> PhaseResult:
    """Reuse the model's instance if there is one, else place one; then wait for its runners."""
    opts, state = ctx.opts, ctx.state()
    names = {n.node_id: n.name for n in state.nodes}
    ours = _instances_of(state, opts.model)
    if ours:
        iid = ctx.ledger.instance_id if ctx.ledger.instance_id in ours else sorted(ours)[0]
        how = "reused"
    else:
        created = _create_instance(ctx)
        if isinstance(created, PhaseResult):
            return created
        iid, how = created, "created"
    ctx.say(f"  {how} instance {iid}; waiting for its runners")
    ctx.ledger.instance_id = iid
    body, started = ours.get(iid, InstanceBody()), time.monotonic()
    while True:
        try:
            with reaching(opts.api):
                body = ctx.api.instance(iid)
        except ApiError:  # a follower may not have adopted the plan yet
            pass
        waited = time.monotonic() - started
        statuses = [s.status for s in body.runner_status.values()]
        serving = bool(statuses) and all(s in SERVING for s in statuses)
        if serving or "failed" in statuses or waited >= opts.ready_timeout:
            break
        time.sleep(POLL_S)
    return judge_placement(opts, body, names, how, waited)


def _create_instance(ctx: Context) -> str | PhaseResult:
    """GET /instance/placement, then POST /instance: the new instance's id, or why not."""
    opts = ctx.opts
    query = {
        "model_id": opts.model,
        "min_nodes": opts.min_nodes,
        "sharding": opts.sharding,
        "instance_meta": opts.instance_meta,
        "allow_blocked": opts.allow_blocked or None,
    }
    query = {k: v for k, v in query.items() if v is not None}
    deadline = time.monotonic() + PLACE_RETRY_S
    while True:
        try:
            with reaching(opts.api):
                instance = ctx.api.placement(**query)
                return ctx.api.create_instance(instance, opts.allow_blocked)
        except ApiError as exc:
            why, status = str(exc), exc.status
        # 400/409 no_placement: the paths of a node that just joined may not be measured yet
        if time.monotonic() >= deadline or status not in (400, 409):
            previews = f"curl '{opts.api}/instance/previews?model_id={opts.model}'"
            return conclude("placement", [gate("placement", False, why)], next_command=previews)
        time.sleep(POLL_S)


def transport(ctx: Context) -> PhaseResult:
    """From every node of the instance (its /cluster/reach): the store port, rank 0's
    endpoint, and every other node's API."""
    state = ctx.state()
    docs = _instances_of(state, ctx.opts.model)
    body = docs.get(ctx.ledger.instance_id or "") or next(iter(docs.values()), None)
    if body is None:
        return judge_transport(ctx.opts, [])
    members = list(body.node_to_runner)
    apis = {n.node_id: n for n in ctx.nodes()}
    if any(m not in apis for m in members):
        apis = {n.node_id: n for n in ctx.nodes(refresh=True)}
    rank0 = next(rid for rid in body.runner_to_shard if body.shard(rid).device_rank == 0)
    store_host, _, store_port = (body.store_address or "").rpartition(":")
    store_host = store_host.strip("[]")
    runner = (state.runners or {}).get(rank0)
    endpoint = runner.port if runner else None
    targets = [("store", store_host, int(store_port))]
    targets += [("rank 0 endpoint", store_host, int(endpoint))] if endpoint else []
    probes = []
    for member in members:
        source = apis.get(member) or NodeApi(member, member, None, "not in the view")
        peers = [apis[m] for m in members if m != member and m in apis and apis[m].api]
        dials = targets + [(f"{p.name}'s API", *_host_port(p.api or "")) for p in peers]
        probes += [_reach(ctx, source, *dial) for dial in dials]
    if not endpoint:
        probes.append(Probe("rank 0", "endpoint", store_host, 0, False, "rank 0 reports no port"))
    return judge_transport(ctx.opts, probes)


def _host_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    return parsed.host, parsed.port or 80


def _reach(ctx: Context, source: NodeApi, target: str, host: str, port: int) -> Probe:
    def probe(ok: bool, detail: str) -> Probe:
        return Probe(source.name, target, host, port, ok, detail)

    if source.api is None:
        return probe(False, f"its API does not answer: {source.error}")
    try:
        doc = ctx.api.at(source.api).reach(host, port)
    except ApiError as exc:
        return probe(False, str(exc))
    except (ApiUnreachable, httpx.HTTPError) as exc:
        return probe(False, f"its API: {failure_text(exc)}")
    return probe(True, f"{doc.ms:.1f} ms") if doc.ok else probe(False, doc.error)


def first_chat(ctx: Context) -> PhaseResult:
    return judge_first_chat(ctx.opts, [_chat(ctx, node) for node in ctx.nodes()])


def _chat(ctx: Context, node: NodeApi) -> ChatAnswer:
    if node.api is None:
        return ChatAnswer(node.name, "?", False, 0.0, f"no API answers: {node.error}")
    started = time.perf_counter()
    try:
        reply = ctx.api.at(node.api).chat(chat_body(ctx.opts.model), timeout=CHAT_TIMEOUT)
    except ApiError as exc:
        return ChatAnswer(node.name, node.api, False, time.perf_counter() - started, str(exc))
    except (ApiUnreachable, httpx.HTTPError, ValueError) as exc:
        detail = failure_text(exc)
        return ChatAnswer(node.name, node.api, False, time.perf_counter() - started, detail)
    seconds = time.perf_counter() - started
    if not reply.choices:
        return ChatAnswer(node.name, node.api, False, seconds, "200 without choices")
    return ChatAnswer(node.name, node.api, True, seconds, f"200 {reply.text!r}")


def bench(ctx: Context) -> PhaseResult:
    out = ctx.opts.report_dir / "bench.jsonl"
    command = bench_command(ctx.opts, out)
    ctx.say(f"  $ {shlex.join(command)}")
    last = ""
    env = {**os.environ, **({API_KEY_ENV: ctx.opts.api_key} if ctx.opts.api_key else {})}
    with subprocess.Popen(  # the key goes in the environment: a command line is public
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # streamed: a long bench shows its heartbeat as it runs
            ctx.say(f"  | {line.rstrip()}")
            last = line.strip() or last
        code = proc.wait()
    detail = f"exit {code}" + (f"; last line: {last}" if code else f"; results in {out}")
    verdict = gate("bench exit", code == 0, detail, next_command=shlex.join(command))
    return conclude("bench", [verdict], headline=f"results in {out}")


PHASE_FUNCTIONS: dict[str, Callable[[Context], PhaseResult]] = {
    "preflight": preflight,
    "audit": audit_phase,
    "canary": canary,
    "join": join,
    "placement": placement,
    "transport": transport,
    "first_chat": first_chat,
    "bench": bench,
}
