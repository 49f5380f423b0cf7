"""Where a model is served: the one source for routing, /v1/models, /health and the banner.

Every served model is an instance with a rank-0 runner: this node's solo instances (a model
it serves alone) and the instances the leader's plan places across nodes. The router answers
"which models, how long a context, and where is the rank 0 to relay a request to" from the
runner states; the API never runs a model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from shoal.placement.plan import runner_of
from shoal.schema.report import ClusterPlan, InstanceSpec, NodeReport, RunnerState

SERVING = ("ready", "running")


@dataclass(frozen=True)
class ServedCard:
    """One model a client can ask for, as /v1/models shows it."""

    id: str
    created: int
    context_length: int | None


class Placed(Protocol):
    """The instances placed across nodes (the Controller)."""

    def models_served(self) -> list[str]: ...

    def endpoint(self, model_id: str) -> tuple[str | None, str]: ...

    def reports(self) -> list[NodeReport]: ...

    @property
    def plan(self) -> ClusterPlan: ...


def placed_card(plan: ClusterPlan, reports: list[NodeReport], model_id: str) -> ServedCard:
    """A placed model's card: created with its oldest instance, context from a holder's file."""
    instance = min(
        (i for i in plan.instances if i.model_id == model_id), key=lambda i: i.created_at
    )
    held = next((m for r in reports for m in r.models if m.model_id == model_id), None)
    return ServedCard(model_id, int(instance.created_at), held.context_length if held else None)


def solo_readiness(
    solo: Mapping[str, InstanceSpec], states: Mapping[str, RunnerState]
) -> tuple[bool, str]:
    """(ready, why not): ready once every solo runner passed its warm-up generation."""
    for model_id, instance in solo.items():
        state = states.get(runner_of(instance, 0))
        status = state.status if state else "idle"
        if status in SERVING:
            continue
        if status == "warming":
            return False, f"warming up {model_id}"
        if status == "failed":
            return False, f"the runner of {model_id} failed: {state.reason if state else ''}"
        if status == "stopped":
            return False, f"the runner of {model_id} stopped"
        return False, f"loading {model_id}"
    return True, ""


class Router:
    """Built complete by the node: its solo instances, its runners' states, and (once the
    cluster is up) the placed instances."""

    def __init__(
        self,
        solo: Mapping[str, InstanceSpec],
        states: Callable[[], tuple[RunnerState, ...]],
        serve_host: str,
        placed: Callable[[], Placed | None],
    ) -> None:
        self.solo = dict(solo)
        self._states = states
        self._serve_host = serve_host
        self._placed = placed

    def _solo_states(self) -> dict[str, RunnerState]:
        return {s.runner_id: s for s in self._states()}

    def readiness(self) -> tuple[bool, str]:
        return solo_readiness(self.solo, self._solo_states())

    def models(self) -> dict[str, ServedCard]:
        states = self._solo_states()
        served = {}
        for model_id, instance in self.solo.items():
            state = states.get(runner_of(instance, 0))
            context = state.context_length if state else None
            served[model_id] = ServedCard(model_id, int(instance.created_at), context)
        placed = self._placed()
        if placed is not None:
            for model_id in placed.models_served():
                if model_id not in served:
                    served[model_id] = placed_card(placed.plan, placed.reports(), model_id)
        return served

    def endpoint(self, model_id: str) -> tuple[str | None, str]:
        """The base URL of a rank 0 serving the model, or why there is none (yet)."""
        instance = self.solo.get(model_id)
        if instance is not None:
            state = self._solo_states().get(runner_of(instance, 0))
            if state is not None and state.status in SERVING and state.port is not None:
                host = self._serve_host
                host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
                host = f"[{host}]" if ":" in host else host
                return f"http://{host}:{state.port}", ""
            placed = self._placed()
            if placed is None or model_id not in placed.models_served():
                return None, solo_readiness({model_id: instance}, self._solo_states())[1]
        placed = self._placed()
        if placed is None:
            return None, f"no instance of {model_id} is placed"
        return placed.endpoint(model_id)
