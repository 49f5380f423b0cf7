"""This node's part in the cluster plan: adopt it, lead it when elected, run our share of it.

Every tick (once per cluster poll) the controller reads the view (alive reports, runners, the
cards' blocks), asks placement.decide what to do, hands the plan to its worker and records the
events the decision names. Plan changes asked of a follower's API are forwarded to the leader,
whose answer is returned. Decisions live in placement.decide and the modules under it; this
module moves data between them, the worker and the network.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import httpx

from shoal.cluster.service import ClusterService
from shoal.models.cards import blocked_refusal
from shoal.placement import decide as decisions
from shoal.placement.decide import LEADER_GRACE_S, SERVING, Decision, Memory, PlaceAsk, decide
from shoal.placement.plan import (
    find_instance,
    instance_document,
    lead,
    runner_of,
    with_instance,
    without_instance,
)
from shoal.placement.planner import Refusal
from shoal.placement.preflight import PathCheck, preflight
from shoal.placement.throughput import Floor
from shoal.schema.address import base_url
from shoal.schema.reasons import Reason, event_fields, render
from shoal.schema.report import AutoPlace, ClusterPlan, InstanceSpec, NodeReport, RunnerState
from shoal.worker import Worker

if TYPE_CHECKING:
    from shoal.models.library import Library

log = logging.getLogger(__name__)

__all__ = ["LEADER_GRACE_S", "Controller", "NotLeader", "PlaceAsk"]


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
        capabilities: tuple[tuple[str, ...], tuple[str, ...]] = (("torch:cpu",), ("gloo",)),
        min_throughput_ratio: float = Floor.ratio,
    ) -> None:
        self.service = service
        self.engines, self.backends = capabilities  # what this node reports it can run
        self.worker = worker
        self.library = library  # cards (blocked models) and the store this node reports
        self.auto_place = auto_place
        self.context_tokens = context_tokens
        self.plan = ClusterPlan()  # the newest adopted
        self.events = service.events
        self.thresholds = service.settings.thresholds
        self.memory = Memory()  # what the tick keeps between ticks (placement.decide)
        self.floor = Floor(ratio=min_throughput_ratio)  # re-place an instance this slow
        self._started = time.time()
        self._best_rates: dict[str, float] = {}

    @property
    def node_id(self) -> str:
        return self.service.identity.node_id

    def leader(self) -> str | None:
        return self.service.view.leader(self.service.report)

    def is_leader(self) -> bool:
        return self.leader() == self.node_id

    def reports(self) -> list[NodeReport]:
        return self.service.view.alive_reports(self.service.report)

    @property
    def alert_reasons(self) -> Mapping[str, Reason]:
        """Instance id -> why it cannot serve as placed, as data."""
        return self.memory.alerts

    @property
    def alerts(self) -> dict[str, str]:
        """Instance id -> why it cannot serve as placed, as a sentence."""
        return {iid: render(why) for iid, why in self.memory.alerts.items()}

    # -- the tick: read, decide, reconcile, publish ----------------------------------------

    def tick(self) -> None:
        reports, now = self.reports(), time.time()
        local = self.worker.states()
        runners = {**self.runner_states(), **{s.runner_id: s for s in local}}
        wanted = {w.model_id for r in reports for w in r.auto_place}
        decision = decide(self.plan, reports, runners, self._cards(wanted), now,
                          self._config(local, reports), self.memory)  # fmt: skip
        self._apply(decision, reports)

    def _apply(self, decision: Decision, reports: list[NodeReport]) -> None:
        self.memory = decision.memory
        names = _names(reports)
        for line in decision.logs:
            log.info("%s", render(line, names))
        for note in decision.notes:
            self.note(note.kind, note.reason, names=names, **dict(note.tags))
        if decision.plan is not None:
            log.info(
                "plan term %d version %d: %d instance(s)",
                decision.plan.term,
                decision.plan.version,
                len(decision.plan.instances),
            )
            self.plan = decision.plan
        self.worker.reconcile(self.plan)
        if decision.plan is not None:  # publish it now: the peers' next poll carries it, not
            self.service.refresh_report()  # the one after our next tick

    def _config(
        self, local: Iterable[RunnerState] = (), reports: Iterable[NodeReport] = ()
    ) -> decisions.Config:
        return decisions.Config(
            node_id=self.node_id,
            leader=self.leader(),
            started_at=self._started,
            heard_peers=any(r.node_id != self.node_id for r in reports),
            floor=self.floor,
            suspects=frozenset(self.service.view.suspects()),
            thresholds=self.thresholds,
            context_tokens=self.context_tokens,
            local_runners=frozenset(s.runner_id for s in local),
        )

    def _cards(self, model_ids: Iterable[str]) -> dict[str, Reason]:
        """The block each model's card puts on placing it (models without one are absent)."""
        if self.library is None:
            return {}
        blocks = {m: blocked_refusal(self.library.card(m)) for m in model_ids}
        return {m: why for m, why in blocks.items() if why is not None}

    def best_rate(self, instance_id: str, rate: float) -> float:
        """The instance's best tok/s seen here: the baseline its current rate is read against."""
        best = max(rate, self._best_rates.get(instance_id, 0.0))
        self._best_rates[instance_id] = best
        return best

    def note(
        self,
        kind: str,
        message: str | Reason,
        names: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> None:
        """An event in this node's history (/state, /cluster/alerts), or a log line without one.
        A Reason is stored as data beside its sentence (names: node id -> name for it)."""
        text, data = message, {}
        if isinstance(message, Reason):
            text = render(message, _names(self.reports()) if names is None else names)
            data = event_fields(message)
        if self.events is not None:
            self.events.add(kind, text, **data, **fields)
        else:
            log.warning("%s: %s", kind, text)

    def report_fields(self) -> dict[str, Any]:
        models = tuple(m.held for m in self.worker.models.values())
        return dict(
            engines=self.engines,
            backends=self.backends,
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
        return decisions.place(
            ask,
            self.reports(),
            self._cards([ask.model_id]),
            time.time(),
            self._config(),
            instance_id or str(uuid.uuid4()),
            generation=generation,
            preflight_checks=preflight_checks,
        )

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
        url = self.service.url_of(leader, path) if leader else None
        if url is None:
            raise NotLeader(leader)
        return await self.service.peers.http.request(method, url, json=body, timeout=30.0)

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
            return base_url(host, head.port), ""
        return None, "; ".join(why)

    def _host_of_rank0(self, instance: InstanceSpec) -> str | None:
        """Where this node reaches rank 0: the instance's store address (the path placement
        measured best from every rank) when we are one of its ranks, else any known address."""
        rank0 = instance.nodes[0]
        if rank0 != self.node_id and self.node_id in instance.nodes:
            return instance.store_address
        address = self.service.address_of(rank0)
        return address[0] if address else None


def _names(reports: Iterable[NodeReport]) -> dict[str, str]:
    return {r.node_id: r.name for r in reports if r.name}
