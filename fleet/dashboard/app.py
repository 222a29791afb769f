"""The dashboard as an app of its own, mounted under ``/ui`` of the fleet app.

Why a mounted app and not a router: the fleet app puts `fleet.auth.authorize` (bearer
header) on every route it owns; a browser navigating between pages sends a cookie, not a
header. The mounted app checks the same tokens itself (`fleet.dashboard.signin`), answers
errors as pages instead of JSON, and reaches the fleet's engine and settings through the
parent app's state.
"""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.dashboard.cache import TtlCache
from fleet.dashboard.render import STATIC_DIR, base_path, is_live, make_environment, render
from fleet.dashboard.routes import pages_router
from fleet.dashboard.signin import SignInRequired, login_url
from fleet.drift.reference import ReferenceCache
from fleet.drift.settings import DriftSettings
from fleet.errors import FleetError

__all__ = ["MOUNT_PATH", "create_dashboard", "mount_dashboard"]

MOUNT_PATH: Final = "/ui"
#: figures that read many rows (drift ranks) are reused for this long across refreshes
CACHE_TTL_S: Final = 15.0
#: pages load only what the package ships: no inline script, no other origin
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS: Final = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)


class _SecurityHeaders:
    """Adds the headers above to every response (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _wants_json(request: Request) -> bool:
    return is_live(request) or request.method != "GET"


def _error_page(request: Request, status: int, title: str, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse(
            {"error": title.lower().replace(" ", "_"), "detail": message}, status_code=status
        )
    viewer = getattr(request.state, "viewer", None)
    return render(
        request,
        "error.html",
        {"viewer": viewer, "status": status, "title": title, "message": message},
        status_code=status,
        poll_ms=None,
    )


async def _sign_in(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    base = base_path(request)
    path = request.url.path
    if request.url.query:
        query = "&".join(p for p in request.url.query.split("&") if not p.startswith("_live="))
        path += f"?{query}" if query else ""
    target = login_url(base, path if path.startswith(base + "/") else base + "/", exc.message)
    if _wants_json(request):
        return JSONResponse(
            {"error": "unauthorized", "detail": exc.message, "login": target}, status_code=401
        )
    return RedirectResponse(target, status_code=303)


_TITLES: Final = {
    400: "Bad request",
    401: "Sign-in required",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    422: "Bad request",
}


async def _fleet_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FleetError)
    status = exc.status_code
    return _error_page(request, status, _TITLES.get(status, "Error"), exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = (
        f"there is no dashboard page at {request.url.path}" if status == 404 else str(exc.detail)
    )
    return _error_page(request, status, _TITLES.get(status, "Error"), message)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    # a path that does not parse (a version that is not a number) names no such page
    status = 404 if any(e.get("loc", ("",))[0] == "path" for e in exc.errors()) else 422
    return _error_page(request, status, _TITLES[status], f"bad address or input ({where})")


def create_dashboard(fleet: FastAPI) -> FastAPI:
    """The dashboard app for one fleet app (reads its state: engine, settings, drift)."""
    ui = FastAPI(title="EdgeFleet dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    ui.state.fleet = fleet
    ui.state.templates = make_environment()
    ui.state.cache = TtlCache(ttl_s=CACHE_TTL_S)
    # used only when the fleet app runs without the drift router's lifespan (unit tests)
    ui.state.drift_settings = DriftSettings(enabled=False)
    ui.state.references = ReferenceCache.create()
    ui.add_middleware(_SecurityHeaders)
    ui.add_exception_handler(SignInRequired, _sign_in)
    ui.add_exception_handler(FleetError, _fleet_error)
    ui.add_exception_handler(StarletteHTTPException, _http_error)
    ui.add_exception_handler(RequestValidationError, _invalid)
    ui.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    ui.include_router(pages_router)
    return ui


def mount_dashboard(app: FastAPI, path: str = MOUNT_PATH) -> Any:
    """Serve the dashboard under ``path`` of the fleet app."""
    app.mount(path, create_dashboard(app), name="dashboard")
    return app
