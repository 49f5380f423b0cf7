"""The one HTTP document of the tools that cannot live in `shoal.schema`: it carries a model
manifest (`shoal.models.manifest`). Every other document is in `shoal.schema.documents`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from shoal.models.manifest import Manifest
from shoal.schema.documents import Document


class ManifestEntry(Document):
    name: str | None = None
    node_id: str | None = None
    manifest: Manifest | None = None
    error: str | None = None


class ManifestsDocument(Document):
    """GET /cluster/manifests/{model}: every node's manifest and the card this node holds."""

    nodes: tuple[ManifestEntry, ...] = ()
    card: dict[str, Any] = Field(default_factory=dict)

    def by_name(self) -> dict[str, Manifest | str]:
        """Manifests by node name: the manifest, or why there is none."""
        out: dict[str, Manifest | str] = {}
        for entry in self.nodes:
            name = entry.name or entry.node_id or "?"
            out[name] = entry.manifest if entry.manifest is not None else (
                entry.error or "no manifest"
            )
        return out
