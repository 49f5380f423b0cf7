"""This node's part in the cluster plan: adopt it, lead it when elected, run our share of it.

Every tick (once per cluster poll) the node adopts the newest plan it sees. The leader also
places `--min-nodes` models once enough nodes hold them, and publishes the plan in its report.
Plan changes asked of a follower's API are forwarded to the leader, whose answer is returned.
Decisions live in cluster.plan and placement.planner; this module moves data between them,
the worker and the network.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from shoal.cluster.service import ClusterService, url_host
from shoal.models.cards import blocked_reason
from shoal.placement.plan import (
    META_NAME,
    files_agree,
    find_instance,
    holders,
    instance_document,
    instance_from_placement,
    lead,
    model_spec,
    newest_plan,
    pending_auto_places,
    runner_of,
    with_instance,
    without_instance,
)
from shoal.placement.planner import CandidateReason, Placement, PlacementRequest, Refusal, plan
from shoal.placement.preflight import PathCheck, preflight
from shoal.placement.review import review
from shoal.schema.report import AutoPlace, ClusterPlan, InstanceSpec, NodeReport, RunnerState
from shoal.worker import Worker

if TYPE_CHECKING:
    from shoal.models.library import Library

log = logging.getLogger(__name__)

SERVING = ("ready", "running")
# "RTT 5.3 ms", "12.0 GiB", "loss 10%"; not addresses (10.0.0.2) nor counts
_MEASURED = re.compile(r"(?<![\d.])\d+\.\d+(?!\.?\d)|\d+%")
LEADER_GRACE_S = 3.0  # a starting node hears its peers' plans before it may lead


@dataclass(frozen=True)
class PlaceAsk:
    """What a caller asks placement for (GET /instance/placement, POST /instance, auto)."""

    model_id: str
    sharding: str = "pipeline"
    backend: str = "gloo"
    meta: str = "GlooInstance"
    min_nodes: int = 1
    max_nodes: int | None = None
    nodes: frozenset[str] | None = None  # only these nodes
    allow_blocked: bool = False  # place a model whose card says blocked


def gist(text: str) -> str:
    """A refusal without its measured numbers: "RTT 5.3 ms" and "RTT 5.4 ms" say one thing."""
    return _MEASURED.sub("#", text)


class NotLeader(Exception):
    def __init__(self, leader: str | None) -> None:
        super().__init__(f"this node is not the leader ({leader or 'none known'})")
        self.leader = leader


class Controller:
    def __init__(
        self,
        service: ClusterService,
        worker: Worker,
        auto_place: tuple[AutoPlace, ...] = (),
        context_tokens: int | None = None,
        library: Library | None = None,
    ) -> None:
        self.service = service
        self.worker = worker
        self.library = library  # cards (blocked models) and the store this node reports
        self.auto_place = auto_place
        self.context_tokens = context_tokens
        self.plan = ClusterPlan()  # the newest adopted
        self.events = service.events
        self.thresholds = service.settings.thresholds
        self.alerts: dict[str, str] = {}  # instance id -> why it cannot serve as placed
        self._auto_refused: dict[str, str] = {}  # model -> gist of the last refusal noted
        self._runner_status: dict[str, str] = {}  # runner id -> last status seen (for events)
        self._started = time.monotonic()
        self._best_rates: dict[str, float] = {}
        service.report_extras = self._report_fields
        service.on_tick = self.tick

    @property
    def node_id(self) -> str:
        return self.service.identity.node_id

    def leader(self) -> str | None:
        return self.service.view.leader(self.service.report)

    def is_leader(self) -> bool:
        return self.leader() == self.node_id

    def reports(self) -> list[NodeReport]:
        return self.service.view.alive_reports(self.service.report)

    # -- the tick --------------------------------------------------------------------------

    def tick(self) -> None:
        adopted = newest_plan(self.plan, self.reports())
        # A node that just started leads only after it had the time to hear its peers' plans.
        if self.is_leader() and time.monotonic() - self._started >= LEADER_GRACE_S:
            adopted = lead(adopted, self.node_id)
            for want in pending_auto_places(self.reports(), adopted):
                adopted = self._auto(adopted, want)
            adopted = self._review(adopted)
        self._note_runner_changes()
        if adopted != self.plan:
            log.info(
                "plan term %d version %d: %d instance(s)",
                adopted.term,
                adopted.version,
                len(adopted.instances),
            )
        self.plan = adopted
        self.worker.reconcile(adopted)

    def _auto(self, current: ClusterPlan, want: AutoPlace) -> ClusterPlan:
        ask = PlaceAsk(
            want.model_id,
            want.sharding,
            want.backend,
            META_NAME[want.backend],
            min_nodes=want.min_nodes,
            allow_blocked=want.allow_blocked,
        )
        result = self.place(ask)
        if isinstance(result, InstanceSpec):
            log.info(
                "placed %s on %s (auto, --min-nodes %d)",
                want.model_id,
                ", ".join(result.nodes),
                want.min_nodes,
            )
            self._auto_refused.pop(want.model_id, None)
            return with_instance(current, result)
        text = result.text()
        # measured numbers move every tick: only a refusal that says something new is noted
        if self._auto_refused.get(want.model_id) != gist(text):
            self._auto_refused[want.model_id] = gist(text)
            self.note(
                "refused",
                f"waiting to place {want.model_id} (--min-nodes {want.min_nodes}): {text}",
                model=want.model_id,
            )
        return current

    def _review(self, current: ClusterPlan) -> ClusterPlan:
        """Move instances that cannot serve as placed, or whose paths got much slower."""
        reports, runners, now = self.reports(), self.runner_states(), time.time()
        alerts = {}
        for instance in current.instances:
            ask = PlaceAsk(
                instance.model_id,
                instance.sharding,
                instance.backend,
                instance.meta,
                min_nodes=len(instance.nodes),
                max_nodes=len(instance.nodes),
                allow_blocked=True,  # placed once already: moving it is not a new decision
            )
            result = self.place(ask, instance.instance_id, generation=instance.generation + 1)
            candidate = result if isinstance(result, InstanceSpec) else None
            verdict = review(instance, candidate, reports, runners, now)
            if verdict.move and candidate is not None:
                moved = candidate.model_copy(update={"reason": verdict.reason})
                current = with_instance(current, moved)
                self.note(
                    "moved",
                    f"instance {instance.instance_id} ({instance.model_id}) "
                    f"re-placed on {', '.join(self.service.name_of(n) for n in moved.nodes)}"
                    f" at {moved.store_address}: {verdict.reason}",
                    instance=instance.instance_id,
                )
            elif verdict.reason:
                why = f"; no other layout: {result.text()}" if isinstance(result, Refusal) else ""
                alerts[instance.instance_id] = verdict.reason + why
        for iid, text in alerts.items():
            if self.alerts.get(iid) != text:
                self.note("instance", f"instance {iid}: {text}", instance=iid)
        self.alerts = alerts
        return current

    def _note_runner_changes(self) -> None:
        for state in self.worker.states():
            before = self._runner_status.get(state.runner_id)
            if state.status != before:
                self._runner_status[state.runner_id] = state.status
                if state.status == "failed":
                    self.note(
                        "runner_failed",
                        f"runner {state.runner_id} failed: {state.reason}",
                        instance=state.instance_id,
                    )

    def best_rate(self, instance_id: str, rate: float) -> float:
        """The instance's best tok/s seen here: the baseline its current rate is read against."""
        best = max(rate, self._best_rates.get(instance_id, 0.0))
        self._best_rates[instance_id] = best
        return best

    def note(self, kind: str, message: str, **fields: Any) -> None:
        """An event in this node's history (/state, /cluster/alerts), or a log line without one."""
        if self.events is not None:
            self.events.add(kind, message, **fields)
        else:
            log.warning("%s: %s", kind, message)

    def _report_fields(self) -> dict[str, Any]:
        models = tuple(m.held for m in self.worker.models.values())
        return dict(
            models=models,
            auto_place=self.auto_place,
            runners=self.worker.states(),
            plan=self.plan,  # followers echo it: a restarted leader finds it again
            store=self.library.state() if self.library is not None else None,
        )

    # -- placement -------------------------------------------------------------------------

    def place(
        self,
        ask: PlaceAsk,
        instance_id: str | None = None,
        generation: int = 0,
        preflight_checks: bool = True,
    ) -> InstanceSpec | Refusal:
        """A fresh layout for the ask from the current view, or every reason there is none.

        With preflight_checks, a layout whose paths miss the thresholds is refused with the
        measured numbers (and a better path where one was measured)."""
        reports = self.reports()
        if self.library is not None:
            blocked = blocked_reason(self.library.card(ask.model_id), ask.allow_blocked)
            if blocked:
                return Refusal((CandidateReason((), blocked),))
        held = holders(reports, ask.model_id)
        extra: list[CandidateReason] = []
        if not held:
            known = sorted({m.model_id for r in reports for m in r.models})
            return Refusal(
                (
                    CandidateReason(
                        (),
                        f"no alive node holds {ask.model_id}; "
                        f"held models: {', '.join(known) or 'none'}",
                    ),
                )
            )
        allowed, differ = files_agree(held)
        extra += differ
        for r in reports:
            if r.node_id not in held and (ask.nodes is None or r.node_id in ask.nodes):
                extra.append(
                    CandidateReason((r.node_id,), f"node {r.node_id} does not hold {ask.model_id}")
                )
        first = held[next(iter(allowed))]
        window = first.context_length or 4096
        context = min(self.context_tokens or window, window)  # the KV budget per rank
        request = PlacementRequest(
            model=model_spec(first),
            sharding=ask.sharding,  # type: ignore[arg-type]
            backend=ask.backend,  # type: ignore[arg-type]
            min_nodes=ask.min_nodes,
            max_nodes=ask.max_nodes,
            node_filter=frozenset(allowed & ask.nodes if ask.nodes is not None else allowed),
            context_tokens=context,
        )
        now = time.time()
        result = plan(request, reports, now)
        if isinstance(result, Refusal):
            return Refusal((*extra, *result.reasons))
        assert isinstance(result, Placement)
        instance = instance_from_placement(
            result,
            request,
            instance_id=instance_id or str(uuid.uuid4()),
            meta=ask.meta,
            reports={r.node_id: r for r in reports},
            now=now,
            generation=generation,
        )
        if preflight_checks:
            failed = [c for c in self.preflight(instance) if not c.ok]
            if failed:
                return Refusal(
                    tuple(
                        CandidateReason(
                            instance.nodes,
                            f"preflight: {c.describe()}"
                            + (f"; better measured path: {c.better}" if c.better else ""),
                        )
                        for c in failed
                    )
                )
        return instance

    def preflight(self, instance: InstanceSpec) -> list[PathCheck]:
        reports = {r.node_id: r for r in self.reports()}
        return preflight(instance, reports, self.thresholds)

    # -- plan changes (leader only; the API forwards otherwise) ----------------------------

    def create(self, instance: InstanceSpec) -> None:
        if not self.is_leader():
            raise NotLeader(self.leader())
        self.plan = with_instance(lead(self.plan, self.node_id), instance)
        self.worker.reconcile(self.plan)
        self.service.refresh_report()

    def delete(self, instance_id: str) -> bool:
        if not self.is_leader():
            raise NotLeader(self.leader())
        if find_instance(self.plan, instance_id) is None:
            return False
        self.plan = without_instance(lead(self.plan, self.node_id), instance_id)
        self.worker.reconcile(self.plan)
        self.service.refresh_report()
        return True

    async def forward(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """Send a plan change to the leader; its answer goes back to our caller."""
        leader = self.leader()
        address = self.service.address_of(leader) if leader else None
        if address is None:
            raise NotLeader(leader)
        host, port = address
        url = f"http://{host}:{port}{path}"
        async with httpx.AsyncClient(timeout=30.0) as client:
            return await client.request(method, url, json=body)

    # -- what the API shows and where requests go -----------------------------------------

    def runner_states(self) -> dict[str, RunnerState]:
        return {s.runner_id: s for r in self.reports() for s in r.runners}

    def instances_document(self) -> dict[str, Any]:
        states = self.runner_states()
        return {i.instance_id: instance_document(i, states) for i in self.plan.instances}

    def instance(self, instance_id: str) -> InstanceSpec | None:
        return find_instance(self.plan, instance_id)

    def models_served(self) -> list[str]:
        return sorted({i.model_id for i in self.plan.instances})

    def endpoint(self, model_id: str) -> tuple[str | None, str]:
        """An OpenAI base URL of a serving instance of the model, or why there is none."""
        instances = [i for i in self.plan.instances if i.model_id == model_id]
        if not instances:
            return None, f"no instance of {model_id} is placed"
        states = self.runner_states()
        why = []
        for i in sorted(instances, key=lambda i: i.created_at):
            head = states.get(runner_of(i, 0))
            if head is None or head.status not in SERVING or head.port is None:
                status = head.status if head else "not started"
                detail = f": {head.reason}" if head and head.reason else ""
                why.append(f"instance {i.instance_id} is {status}{detail}")
                continue
            host = self._host_of_rank0(i)
            if host is None:
                why.append(f"no known address of {i.nodes[0]}, rank 0 of {i.instance_id}")
                continue
            return f"http://{host}:{head.port}", ""
        return None, "; ".join(why)

    def _host_of_rank0(self, instance: InstanceSpec) -> str | None:
        """Where this node reaches rank 0: the instance's store address (the path placement
        measured best from every rank) when we are one of its ranks, else any known address."""
        rank0 = instance.nodes[0]
        if rank0 != self.node_id and self.node_id in instance.nodes:
            return url_host(instance.store_address)
        address = self.service.address_of(rank0)
        return address[0] if address else None
