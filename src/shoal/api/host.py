"""What the API needs from the node that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from shoal.cluster.service import ClusterService
from shoal.engine.serving import ServedModel
from shoal.schema.report import HeldModel

if TYPE_CHECKING:  # the controller imports the worker, which imports the runner, which the API
    from shoal.control import Controller
    from shoal.models.library import Library


class ModelHost(Protocol):
    @property
    def models(self) -> Mapping[str, ServedModel]:
        """The models served here, by the id clients use."""
        ...

    @property
    def ready(self) -> bool:
        """True once every served model has completed its warm-up generation."""
        ...

    @property
    def not_ready_reason(self) -> str:
        """Why the node is not ready (loading, warming up, or the warm-up error)."""
        ...

    @property
    def cluster(self) -> ClusterService | None:
        """This node's cluster service, once the API is up."""
        ...


def controller_of(host: object) -> Controller | None:
    """A node's instances across nodes; a runner's rank-0 endpoint serves its one model only."""
    return getattr(host, "controller", None)


def held_models_of(host: object) -> Mapping[str, HeldModel]:
    """The models on this node's disk (`?status=downloaded`); none behind a runner."""
    return getattr(host, "held_models", {})


def library_of(host: object) -> Library | None:
    """A node's model store, cards and downloads; a runner's endpoint has none."""
    return getattr(host, "library", None)
