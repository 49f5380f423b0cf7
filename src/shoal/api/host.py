"""What the API needs from the node that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from shoal.cluster.service import ClusterService
from shoal.engine.serving import ServedModel


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


# A node also offers `controller` (shoal.control.Controller | None: instances across nodes)
# and `held_models` (model id -> HeldModel on this disk); a runner's rank-0 endpoint does
# not, so the routes read both with getattr.
