"""A check for the typed HTTP documents: every key a node writes is declared by its type."""

from __future__ import annotations

from pydantic import BaseModel

from shoal.schema.documents import Alert, Event

OPEN = (Alert, Event)  # a reason's code and fields ride along as extras, by design


def undeclared(model: BaseModel, where: str = "") -> list[str]:
    """Keys a document carries that its type does not declare, anywhere inside it."""
    out = [] if isinstance(model, OPEN) else [f"{where}.{k}" for k in model.model_extra or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value.values() if isinstance(value, dict) else value
        for item in items if isinstance(value, tuple | list | dict) else (value,):
            if isinstance(item, BaseModel):
                out += undeclared(item, f"{where}.{name}")
            elif isinstance(item, dict):  # {meta: body} inside a mapping of documents
                out += [u for v in item.values() if isinstance(v, BaseModel)
                        for u in undeclared(v, f"{where}.{name}")]  # fmt: skip
    return out
