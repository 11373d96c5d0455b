"""GET /console and its static files.

The console is one HTML page and a few ES modules, shipped in this package, so serving
it needs no Node build and no network. The page gets a strict Content-Security-Policy:
scripts from this origin only (no inline script), so text a model generated cannot run
even if it ever reached the DOM as markup.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Only the files shipped here are served, by name: no path a request makes up can reach
# anything else on disk.
ASSETS = {path.name: path for path in STATIC_DIR.iterdir() if path.suffix in MEDIA_TYPES}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # Generated images are fetched with the key and shown from blob: URLs.
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        # The login form is read by script; the browser never submits it anywhere.
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)


@router.get("", response_class=FileResponse)
def read_console() -> FileResponse:
    """The console's page; its script draws every view from the JSON API."""
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS
    )


@router.get("/static/{name}", response_class=FileResponse)
def read_console_asset(name: str) -> FileResponse:
    """A script, stylesheet or icon of the console."""
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"console file {name!r} not found", param="name")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=ASSET_HEADERS)
