"""REST routes under ``/api/v1/drift``; the router's lifespan runs the drift loop.

Including this router is the whole integration: its lifespan (merged into the app's by
FastAPI) starts `DriftService` and registers its collector on the app's metrics registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from sqlmodel import col, func, select

from fleet.db import SessionDep
from fleet.drift.models import DriftAlert, DriftAlertPublic, DriftTile
from fleet.drift.scope import fleet_report, rank_devices
from fleet.drift.service import DriftCollector, DriftService
from fleet.drift.settings import DriftSettings
from fleet.errors import NotFound
from fleet.models import utcnow

__all__ = ["drift_router"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service = DriftService(engine=app.state.engine, settings=DriftSettings())
    app.state.drift = service
    registry = getattr(app.state, "metrics_registry", None)
    collector = DriftCollector(service)
    if registry is not None:
        registry.register(collector)
    service.start()
    try:
        yield
    finally:
        service.stop()
        if registry is not None:
            registry.unregister(collector)


drift_router = APIRouter(prefix="/api/v1/drift", tags=["drift"], lifespan=_lifespan)


def _service(request: Request) -> DriftService:
    service = getattr(request.app.state, "drift", None)
    if service is None:  # app built without the lifespan (e.g. a bare TestClient)
        service = request.app.state.drift = DriftService(
            engine=request.app.state.engine, settings=DriftSettings(enabled=False)
        )
    return service


def _latest_version(session: SessionDep, model: str) -> int:
    version = session.exec(
        select(func.max(DriftTile.model_version)).where(DriftTile.model_name == model)
    ).one()
    if version is None:
        raise NotFound(f"no drift data for model {model!r} yet")
    return int(version)


@drift_router.get("")
def get_drift(
    request: Request,
    session: SessionDep,
    model: str,
    version: int | None = None,
    window_s: Annotated[int | None, Query(ge=1, le=30 * 86400)] = None,
) -> dict[str, Any]:
    """Drift report of one model version over the last window, against its baseline."""
    service = _service(request)
    version = version if version is not None else _latest_version(session, model)
    ref, sha = service.references.for_version(session, model, version)
    end = utcnow()
    start = end - timedelta(seconds=window_s or service.settings.report_window_s)
    report = fleet_report(
        session, ref, model, version, start=start, end=end, config=service.settings.config()
    )
    report.extra["reference"] = {"kind": "baseline", "bundle_sha256": sha}
    return report.to_dict()


@drift_router.get("/devices")
def get_drift_devices(
    request: Request,
    session: SessionDep,
    model: str,
    version: int | None = None,
    window_s: Annotated[int | None, Query(ge=1, le=7 * 86400)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """Devices ranked by drift against the rest of the fleet (worst first)."""
    service = _service(request)
    window = window_s or service.settings.report_window_s
    ranked = rank_devices(
        session, model, version, window_s=window, config=service.settings.config(), limit=limit
    )
    return {
        "model": model,
        "version": version,
        "window_s": window,
        "devices": [d.to_dict() for d in ranked],
    }


@drift_router.get("/alerts", response_model=list[DriftAlertPublic])
def get_drift_alerts(
    session: SessionDep,
    model: str | None = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """Drift alerts, newest first."""
    q = select(DriftAlert)
    if model is not None:
        q = q.where(DriftAlert.model_name == model)
    if status is not None:
        q = q.where(DriftAlert.status == status)
    return session.exec(q.order_by(col(DriftAlert.last_seen).desc()).limit(limit)).all()
