"""What the API needs from the node that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from shoal.api.router import ServedCard
from shoal.cluster.peers import PeerClient
from shoal.cluster.service import ClusterService
from shoal.schema.limits import RequestLimits
from shoal.schema.report import HeldModel

if TYPE_CHECKING:
    from shoal.control import Controller
    from shoal.models.library import Library


class ModelHost(Protocol):
    @property
    def models(self) -> Mapping[str, ServedCard]:
        """The models served here or across nodes, by the id clients use (the router's)."""
        ...

    def endpoint(self, model_id: str) -> tuple[str | None, str]:
        """The base URL of the rank 0 serving a model, or why there is none (the router's)."""
        ...

    @property
    def ready(self) -> bool:
        """True once every model this node serves alone has completed its warm-up."""
        ...

    @property
    def not_ready_reason(self) -> str:
        """Why the node is not ready (loading, warming up, or the runner's failure)."""
        ...

    @property
    def peers(self) -> PeerClient:
        """The one pool every call to another node, or to this node's runners, goes through."""
        ...

    @property
    def cluster(self) -> ClusterService | None:
        """This node's cluster service, once the API is up."""
        ...


def controller_of(host: object) -> Controller | None:
    """The node's instances across nodes, once its cluster is up."""
    return getattr(host, "controller", None)


def held_models_of(host: object) -> Mapping[str, HeldModel]:
    """The models on this node's disk (`?status=downloaded`)."""
    return getattr(host, "held_models", {})


def library_of(host: object) -> Library | None:
    """A node's model store, cards and downloads."""
    return getattr(host, "library", None)


def request_limits_of(host: object) -> RequestLimits:
    """The caps on one generation request (--max-tokens-cap, --max-messages, ...)."""
    settings = getattr(host, "settings", None)
    return getattr(settings, "request_limits", None) or RequestLimits()
