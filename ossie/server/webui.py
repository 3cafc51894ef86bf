"""The chat page: `/` and its files under /ui/static/, from the package (ossie/webui/), and /ui/config, what the page
needs to know of the server.

The page and its files are open (a browser must load the page to ask for the key), and hold nothing of the API:
/ui/config, like every API path, needs the key where keys are required. Every file goes out with a
Content-Security-Policy that allows scripts, styles and requests from this origin only, and no inline script:
model output is untrusted, and if something in an answer ever got past the page's sanitizer it still could not run
a script or send anything elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from .protocol import APIError
from .serving import Serving

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
STATIC_PREFIX = "/ui/static/"
OPEN_PREFIXES = ("/ui/static/",)  # with "/" itself: answered without the API key

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}  # no-cache: revalidated (ETag) each load, so an upgraded ossie's page is seen
MEDIA_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
               ".svg": "image/svg+xml", ".txt": "text/plain"}

router = APIRouter()


def static_files() -> dict[str, Path]:
    """The page's files by their path under /ui/static/: only these are served (a listing made once, so no path a
    request names can leave the folder)."""
    root = WEBUI_DIR / "static"
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in MEDIA_TYPES}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> FileResponse:
    return _file(WEBUI_DIR / "index.html")


@router.api_route(STATIC_PREFIX + "{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def static(name: str, request: Request) -> FileResponse:
    path = request.app.state.webui_files.get(name)
    if path is None:
        raise APIError(404, f"no such file: {STATIC_PREFIX}{name}", code="not_found")
    return _file(path)


@router.get("/ui/config", include_in_schema=False)
async def config(request: Request) -> dict:
    """The served model names, the context, and the built-in tools the server runs (the page offers them)."""
    serving: Serving = request.app.state.serving
    return {"models": serving.names, "max_model_len": serving.config.max_context,
            "builtin_tools": list(serving.options.builtin_tools)}
