"""GET /metrics: Prometheus text of what this node sees: paths, instances, alerts, history."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from shoal.api.cluster import alerts_of
from shoal.api.host import controller_of
from shoal.placement.plan import runner_of

router = APIRouter()
PATH_LABELS = ("src", "dst", "addr", "kind")


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    registry = CollectorRegistry()
    controller = controller_of(request.app.state.host)
    if controller is not None:
        _paths(registry, controller)
        _instances(registry, controller)
        _alerts(registry, controller)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _gauge(registry: CollectorRegistry, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
    return Gauge(name, doc, labels, registry=registry)


def _paths(registry: CollectorRegistry, controller: Any) -> None:
    rtt = _gauge(registry, "shoal_path_rtt_ms", "Probe RTT (EWMA) per path", PATH_LABELS)
    loss = _gauge(
        registry, "shoal_path_loss_ratio", "Lost probes in the recent window", PATH_LABELS
    )
    base = _gauge(registry, "shoal_path_baseline_ms", "Best window median RTT seen", PATH_LABELS)
    status = _gauge(
        registry, "shoal_path_status", "1 for the path's current verdict", (*PATH_LABELS, "status")
    )
    for r in controller.reports():
        for p in r.links:
            if p.direction == "outbound" and p.rtt_ms_ewma is not None:
                labels = (r.node_id, p.peer_node_id, p.peer_addr, str(p.interface_kind))
                rtt.labels(*labels).set(p.rtt_ms_ewma)
                loss.labels(*labels).set(p.loss)
        for h in r.health:
            labels = (r.node_id, h.peer_node_id, h.peer_addr, str(h.interface_kind))
            if h.baseline_ms is not None:
                base.labels(*labels).set(h.baseline_ms)
            status.labels(*labels, h.status).set(1)


def _instances(registry: CollectorRegistry, controller: Any) -> None:
    labels = ("instance", "model")
    rate = _gauge(
        registry,
        "shoal_instance_tokens_per_second",
        "Recent generation rate of the instance (rank 0)",
        labels,
    )
    best = _gauge(
        registry,
        "shoal_instance_tokens_per_second_baseline",
        "Best generation rate this node has seen for the instance",
        labels,
    )
    generation = _gauge(
        registry, "shoal_instance_generation", "Times the instance was re-placed", labels
    )
    ready = _gauge(
        registry, "shoal_instance_ready", "1 when every rank is ready or running", labels
    )
    states = controller.runner_states()
    for i in controller.plan.instances:
        key = (i.instance_id, i.model_id)
        generation.labels(*key).set(i.generation)
        heads = [states.get(runner_of(i, rank)) for rank in range(len(i.nodes))]
        ready.labels(*key).set(int(all(s and s.status in ("ready", "running") for s in heads)))
        head = heads[0] if heads else None
        if head is not None and head.tok_s is not None:
            rate.labels(*key).set(head.tok_s)
            best.labels(*key).set(controller.best_rate(i.instance_id, head.tok_s))


def _alerts(registry: CollectorRegistry, controller: Any) -> None:
    alerts = _gauge(registry, "shoal_alerts", "Current alerts by kind", ("kind",))
    for kind in ("path", "instance", "runner"):
        alerts.labels(kind).set(0)
    for a in alerts_of(controller):
        alerts.labels(a["kind"]).inc()
    events = _gauge(registry, "shoal_events", "Events in this node's history by kind", ("kind",))
    for kind, n in (controller.events.counts() if controller.events else {}).items():
        events.labels(kind).set(n)
