"""Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`), translated to the
model's OpenAI chat completions (api.upstream) and back."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1")
