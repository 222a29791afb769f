"""The dashboard's pages, sign-in, and the buttons' endpoints (which call the REST API)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlmodel import Session

from fleet.auth import authenticate
from fleet.dashboard.bundle import gather_bundle, gather_bundles
from fleet.dashboard.device import gather_device
from fleet.dashboard.drift import gather_drift, gather_drift_index
from fleet.dashboard.forward import ApiAnswer, call_api
from fleet.dashboard.overview import gather_overview
from fleet.dashboard.render import base_path, render
from fleet.dashboard.rollout import gather_rollout, gather_rollouts
from fleet.dashboard.signin import (
    COOKIE,
    SignInRequired,
    Viewer,
    current_viewer,
    read_form,
    safe_next,
    token_of,
)
from fleet.drift.reference import ReferenceCache
from fleet.drift.settings import DriftSettings
from fleet.errors import InvalidRequest

__all__ = ["pages_router"]

#: the header the dashboard's own script sends with every button press: a cross-site form
#: cannot set it, and a cross-site fetch that sets it needs a CORS preflight we never grant
ACTION_HEADER: Final = "x-edgefleet-dashboard"
COOKIE_MAX_AGE_S: Final = 12 * 3600
MAX_ACTION_BYTES: Final = 16 * 1024

pages_router = APIRouter()


def _fleet(request: Request) -> Any:
    return request.app.state.fleet.state


def _viewer(request: Request) -> Viewer:
    viewer = current_viewer(request, _fleet(request))
    request.state.viewer = viewer  # error pages show the navigation for whoever is in
    return viewer


def _session(request: Request) -> Iterator[Session]:
    with Session(_fleet(request).engine) as session:
        yield session


ViewerDep = Annotated[Viewer, Depends(_viewer)]
SessionDep = Annotated[Session, Depends(_session)]


def _now() -> datetime:
    return datetime.now(UTC)


# -- sign-in ------------------------------------------------------------------------------


@pages_router.get("/login")
def login_page(request: Request, next: str = "", why: str = "") -> Response:
    """The sign-in form: paste an API token."""
    settings = _fleet(request).settings
    return render(
        request,
        "login.html",
        {
            "next": safe_next(next, base_path(request)),
            "why": why[:200],
            "error": "",
            "viewer": None,
            "auth_enabled": settings.auth_enabled,
        },
        poll_ms=None,
    )


@pages_router.post("/login")
async def login(request: Request) -> Response:
    """Check the token; on success keep it in an HttpOnly cookie and go where asked."""
    base = base_path(request)
    form = await read_form(request)
    token = form.get("token", "").strip()
    target = safe_next(form.get("next"), base)
    with Session(_fleet(request).engine) as session:
        principal = authenticate(session, token) if token else None
    if principal is None:
        return render(
            request,
            "login.html",
            {
                "next": target,
                "why": "",
                "error": "That token is unknown or revoked. Paste a token made with "
                "`edgefleet fleet token create`.",
                "viewer": None,
                "auth_enabled": _fleet(request).settings.auth_enabled,
            },
            status_code=401,
            poll_ms=None,
        )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path=base + "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@pages_router.post("/logout")
def logout(request: Request) -> Response:
    """Forget the token (the cookie); the token itself stays valid."""
    base = base_path(request)
    response = RedirectResponse(f"{base}/login?why=signed+out", status_code=303)
    response.delete_cookie(COOKIE, path=base + "/")
    return response


# -- pages --------------------------------------------------------------------------------


@pages_router.get("/")
def overview_page(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
    """Fleet health at a glance."""
    data = gather_overview(session, _fleet(request).settings, _now())
    return render(request, "overview.html", {"viewer": viewer, "section": "overview", **data})


@pages_router.get("/devices/{device_id}")
def device_page(
    request: Request, device_id: str, viewer: ViewerDep, session: SessionDep
) -> Response:
    """One device."""
    drift = _drift_settings(request)
    data = gather_device(
        session,
        _fleet(request).settings,
        device_id,
        cache=request.app.state.cache,
        drift_config=drift.config(),
        now=_now(),
    )
    return render(request, "device.html", {"viewer": viewer, "section": "devices", **data})


@pages_router.get("/rollouts")
def rollouts_page(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
    """Every rollout, newest first."""
    data = gather_rollouts(session)
    return render(request, "rollouts.html", {"viewer": viewer, "section": "rollouts", **data})


@pages_router.get("/rollouts/{rollout_id}")
def rollout_page(
    request: Request, rollout_id: str, viewer: ViewerDep, session: SessionDep
) -> Response:
    """One rollout's stages, devices, gates and decisions."""
    data = gather_rollout(session, rollout_id, _now())
    return render(
        request,
        "rollout.html",
        {"viewer": viewer, "section": "rollouts", **data},
        poll_ms=2000 if data["active"] else 5000,
    )


def _drift_settings(request: Request) -> DriftSettings:
    service = getattr(_fleet(request), "drift", None)
    if service is not None:
        return service.settings  # type: ignore[no-any-return]
    return request.app.state.drift_settings  # type: ignore[no-any-return]


def _references(request: Request) -> ReferenceCache:
    service = getattr(_fleet(request), "drift", None)
    if service is not None:
        return service.references  # type: ignore[no-any-return]
    return request.app.state.references  # type: ignore[no-any-return]


@pages_router.get("/drift")
def drift_index_page(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
    """Model versions and drift alerts."""
    data = gather_drift_index(session)
    return render(
        request, "drift_index.html", {"viewer": viewer, "section": "drift", **data}, poll_ms=10_000
    )


@pages_router.get("/drift/{model}/{version}")
def drift_page(
    request: Request, model: str, version: int, viewer: ViewerDep, session: SessionDep
) -> Response:
    """One model version's drift, feature by feature."""
    data = gather_drift(
        session,
        references=_references(request),
        settings=_drift_settings(request),
        cache=request.app.state.cache,
        model=model,
        version=version,
        now=_now(),
    )
    return render(
        request, "drift.html", {"viewer": viewer, "section": "drift", **data}, poll_ms=10_000
    )


@pages_router.get("/bundles")
def bundles_page(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
    """Every bundle in the registry."""
    data = gather_bundles(session)
    return render(
        request, "bundles.html", {"viewer": viewer, "section": "bundles", **data}, poll_ms=10_000
    )


@pages_router.get("/bundles/{sha256}")
def bundle_page(request: Request, sha256: str, viewer: ViewerDep, session: SessionDep) -> Response:
    """One bundle: manifest, verification, devices."""
    data = gather_bundle(session, sha256)
    return render(
        request, "bundle.html", {"viewer": viewer, "section": "bundles", **data}, poll_ms=10_000
    )


# -- buttons ------------------------------------------------------------------------------


async def _action_body(request: Request) -> dict[str, Any]:
    """The button's JSON body, after checking the request came from the dashboard's script."""
    if request.headers.get(ACTION_HEADER) != "1":
        raise InvalidRequest(f"dashboard actions need the {ACTION_HEADER} header")
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    if origin and origin.split("://", 1)[-1] != host:
        raise InvalidRequest(f"a dashboard action from another site ({origin}) is refused")
    raw = await request.body()
    if len(raw) > MAX_ACTION_BYTES:
        raise InvalidRequest("the action's body is too large")
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise InvalidRequest("the action's body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the action's body must be a JSON object")
    return body


async def _act(request: Request, viewer: Viewer, path: str, body: dict[str, Any]) -> Response:
    answer: ApiAnswer = await call_api(
        request.app.state.fleet,
        "POST",
        path,
        token=token_of(request) if viewer.auth_enabled else None,
        body=body,
        client=(request.client.host, request.client.port) if request.client else None,
        state=request.scope.get("state"),
    )
    if answer.status == 401:
        raise SignInRequired(answer.message)
    payload = {"ok": answer.ok, "status": answer.status, "detail": answer.message}
    if answer.ok:
        payload["result"] = answer.body
    return JSONResponse(payload, status_code=answer.status)


@pages_router.post("/act/devices/{device_id}/rollback")
async def act_device_rollback(request: Request, device_id: str, viewer: ViewerDep) -> Response:
    """The device page's rollback button: POST /api/v1/devices/{id}/rollback."""
    body = await _action_body(request)
    api_body: dict[str, Any] = {"reason": str(body.get("reason", ""))[:512]}
    if body.get("target_bundle_sha256"):
        api_body["target_bundle_sha256"] = str(body["target_bundle_sha256"])
    return await _act(
        request, viewer, f"/api/v1/devices/{quote(device_id, safe='')}/rollback", api_body
    )


RolloutAction = Literal["approve", "pause", "abort", "rollback"]


@pages_router.post("/act/rollouts/{rollout_id}/{action}")
async def act_rollout(
    request: Request, rollout_id: str, action: RolloutAction, viewer: ViewerDep
) -> Response:
    """The rollout page's buttons: POST /api/v1/rollouts/{id}/{action}."""
    body = await _action_body(request)
    api_body: dict[str, Any] = {"reason": str(body.get("reason", ""))[:512]}
    if action == "abort":
        api_body["keep_devices"] = bool(body.get("keep_devices", False))
    return await _act(
        request, viewer, f"/api/v1/rollouts/{quote(rollout_id, safe='')}/{action}", api_body
    )
