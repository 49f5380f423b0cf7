"""OpenAI Responses (`/v1/responses`), translated to the model's chat completions
(api.upstream) and back."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1")
