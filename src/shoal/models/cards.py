"""Model cards: what an operator states about a model, in TOML.

Built-in cards ship in the package (`shoal/models/cards/`); user cards in `<config>/cards/*.toml`
override them per model id. A field a card lacks gets a default (an older card keeps working);
a field a card has must be valid and known, and the error names the file and the field.

The card's `status` is the model's profile: `blocked` models are not placed unless the caller
says so explicitly (`allow_blocked`), `watch` ones are placed with a warning.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.schema.reasons import Reason, reason, render
from shoal.schema.report import BACKEND_ENGINE

BUILTIN_DIR = Path(__file__).with_name("cards")
STATUSES = ("active", "blocked", "watch", "deprecated")
BACKENDS = tuple(BACKEND_ENGINE)


class CardError(ValueError):
    """A card that cannot be used; the message names the file and the field."""


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a typo'd field is an error

    model_id: str
    name: str = ""
    format: Literal["safetensors", "gguf"] | None = None  # None: whatever the files are
    file: str | None = None  # the GGUF file to load when a dir holds several
    # None: every backend the node supports (older cards predate the field)
    backends: tuple[Literal["gloo", "nccl", "ring", "jaccl"], ...] | None = None
    include: tuple[str, ...] = ()  # `shoal models pull` patterns, as `hf download --include`
    expected_shards: int | None = Field(None, ge=1)  # safetensors shards, or GGUF files
    min_disk_gb: float | None = Field(None, ge=0)
    status: Literal["active", "blocked", "watch", "deprecated"] = "active"
    status_note: str = ""
    notes: str = ""
    source: str = ""  # the file it came from (set on load)

    def backends_on(self, supported: Iterable[str]) -> tuple[str, ...]:
        supported = tuple(supported)
        return (
            supported
            if self.backends is None
            else tuple(b for b in self.backends if b in supported)
        )


def default_card(model_id: str) -> ModelCard:
    """A model without a card: active, every backend, any format."""
    return ModelCard(model_id=model_id, name=model_id.rsplit("/", 1)[-1])


def read_card(path: Path) -> ModelCard:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CardError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CardError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", str(data.get("model_id", "")).rsplit("/", 1)[-1])
    try:
        return ModelCard(**data, source=str(path))
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in e['loc']) or '?'}': {e['msg']}" for e in exc.errors()
        )
        raise CardError(f"{path}: {problems}") from None


def load_cards(config_dir: Path | None, builtin_dir: Path = BUILTIN_DIR) -> dict[str, ModelCard]:
    """Built-in cards, then the user's (which win for the same model id)."""
    cards: dict[str, ModelCard] = {}
    dirs = [builtin_dir] + ([config_dir / "cards"] if config_dir is not None else [])
    for folder in dirs:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            card = read_card(path)
            cards[card.model_id] = card
    return cards


def cards_digest(cards: Mapping[str, ModelCard]) -> str:
    """One short string per set of cards: nodes whose cards differ show as drift, since the
    leader's cards decide what may be placed."""
    text = "\n".join(c.model_dump_json(exclude={"source"}) for _, c in sorted(cards.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def card_for(cards: Mapping[str, ModelCard], model_id: str) -> ModelCard:
    return cards.get(model_id) or default_card(model_id)


def blocked_refusal(card: ModelCard) -> Reason | None:
    """The card's block as data (placement refuses with it unless the caller overrides)."""
    if card.status != "blocked":
        return None
    return reason("blocked", model=card.model_id, status_note=card.status_note, source=card.source)


def blocked_reason(card: ModelCard, allow_blocked: bool) -> str | None:
    """Why placing this model is refused, or None. Only `blocked` stops; the caller may override."""
    why = None if allow_blocked else blocked_refusal(card)
    return render(why) if why else None
