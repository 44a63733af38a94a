"""``/console``: the operators' web page, served by editserve itself (``service/console/``:
HTML, a stylesheet and one script, no build step). The page holds no data of its own; it signs
in with an API key and reads and writes through the HTTP API like any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import Problem

router = APIRouter(include_in_schema=False)

FOLDER = Path(__file__).resolve().parent.parent / "console"
FILES = {
    "console.js": "text/javascript",
    "console.css": "text/css",
}
# The page's own files only: no inline script, nothing from elsewhere.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/console")
def console_page() -> FileResponse:
    return FileResponse(FOLDER / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/console/{name}")
def console_file(name: str) -> FileResponse:
    if name not in FILES:
        raise Problem(404, f"no console file {name}")
    return FileResponse(FOLDER / name, media_type=FILES[name], headers=HEADERS)
