"""Jinja2 rendering: whole pages, or only their live regions as JSON for the page's poller.

A page template marks each part that changes with ``{% block live_<name> %}`` inside an
element ``data-live="<name>"``. A request with ``?_live=1`` gets ``{"regions": {name: html}}``
rendered from the very same blocks, so the live update and the first load never disagree.
Autoescaping is on for every template: whatever a device sent is text, never markup.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

__all__ = ["LIVE_PARAM", "STATIC_DIR", "TEMPLATE_DIR", "is_live", "make_environment", "render"]

HERE: Final = Path(__file__).resolve().parent
TEMPLATE_DIR: Final = HERE / "templates"
STATIC_DIR: Final = HERE / "static"
LIVE_PARAM: Final = "_live"
_LIVE_PREFIX: Final = "live_"
#: how often pages refresh their live regions (ms); a page may ask for another period
DEFAULT_POLL_MS: Final = 3000
NO_STORE: Final = {"Cache-Control": "no-store"}


def _as_dt(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            return _as_dt(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def ago(value: Any, now: datetime | None = None) -> str:
    """'12 s ago', '3 min ago', '2 h ago', '4 d ago'; '-' when there is no time."""
    dt = _as_dt(value)
    if dt is None:
        return "-"
    s = ((now or datetime.now(UTC)) - dt).total_seconds()
    future = s < 0
    s = abs(s)
    if s < 90:
        text = f"{s:.0f} s"
    elif s < 5400:
        text = f"{s / 60:.0f} min"
    elif s < 129600:
        text = f"{s / 3600:.0f} h"
    else:
        text = f"{s / 86400:.0f} d"
    return f"in {text}" if future else f"{text} ago"


def when(value: Any) -> str:
    dt = _as_dt(value)
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def short(value: Any, n: int = 12) -> str:
    return "-" if not value else str(value)[:n]


def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: Any, digits: int = 2) -> str:
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value * 100:.{digits}f} %"


def size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def make_environment() -> Environment:
    """The templates' environment (built by the dashboard app, never at import)."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=ago, when=when, short=short, num=num, pct=pct, size=size)
    return env


def is_live(request: Request) -> bool:
    """The page's poller asks for its live regions only."""
    return request.query_params.get(LIVE_PARAM) == "1"


def base_path(request: Request) -> str:
    """Where the dashboard is mounted (``/ui``), from the ASGI scope."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def render(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    poll_ms: int | None = DEFAULT_POLL_MS,
) -> Response:
    """The whole page, or (``?_live=1``) its live regions as JSON."""
    env: Environment = request.app.state.templates
    template = env.get_template(name)
    base = base_path(request)
    ctx = {
        "base": base,
        "path": request.url.path,
        "now": datetime.now(UTC),
        "poll_ms": poll_ms or 0,
        # the macros, given to every template and block (a live block rendered alone does
        # not run its template's top-level imports)
        "m": env.get_template("_macros.html").module,
        **context,
    }
    if is_live(request):
        regions = {
            block[len(_LIVE_PREFIX) :]: "".join(render_block(template.new_context(ctx)))
            for block, render_block in template.blocks.items()
            if block.startswith(_LIVE_PREFIX)
        }
        return JSONResponse(
            {"regions": regions, "at": ctx["now"].isoformat()},
            status_code=status_code,
            headers=NO_STORE,
        )
    return HTMLResponse(template.render(ctx), status_code=status_code, headers=NO_STORE)
