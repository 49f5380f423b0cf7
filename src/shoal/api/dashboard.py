"""The dashboard: static files from the package, served at / by every node (no CDN, no build).

The page polls this node's /state every second; everything it shows comes from the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

FILES = Path(__file__).resolve().parent.parent / "dashboard"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(FILES / "index.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """Mounted at /dashboard: app.js, views/*.js, style.css."""
    return StaticFiles(directory=FILES)
