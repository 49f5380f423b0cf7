"""Ollama's API under /api/ (and /ollama/api/, as exo serves it), translated to the model's
OpenAI chat and text completions (api.upstream) and back."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
