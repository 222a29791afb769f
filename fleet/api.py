"""REST routes under ``/api/v1`` plus ``/healthz`` and ``/metrics``.

Routes are thin: they parse, call the core (`registry`, `deployment`, `inventory`) and
return public models. Errors are `FleetError`s, mapped to HTTP in one place (`fleet.app`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from fleet.audit import record as audit_record
from fleet.auth import actor_of
from fleet.db import SessionDep
from fleet.deployment import CommandPublisher, deploy, rollback
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.ingest import IngestStats
from fleet.inventory import device_detail, list_devices
from fleet.models import (
    Bundle,
    BundlePublic,
    BundlePublicWithManifest,
    CommandPublic,
    DeploymentCreate,
    DeploymentPublic,
    Device,
    DeviceCreate,
    DeviceDetail,
    DevicePublic,
    RollbackCreate,
    utcnow,
)
from fleet.registry import BundleStore
from fleet.settings import FleetSettings
from protocol.errors import TopicError
from protocol.topics import validate_device_id

__all__ = ["api_router", "ops_router"]

API_PREFIX = "/api/v1"
_UPLOAD_CHUNK = 1 << 20
#: multipart framing around the file part (boundaries, part headers)
_MULTIPART_SLACK_BYTES = 64 * 1024


def _settings(request: Request) -> FleetSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _store(request: Request) -> BundleStore:
    return request.app.state.store  # type: ignore[no-any-return]


def _publisher(request: Request) -> CommandPublisher:
    return request.app.state.publisher  # type: ignore[no-any-return]


SettingsDep = Annotated[FleetSettings, Depends(_settings)]
StoreDep = Annotated[BundleStore, Depends(_store)]
PublisherDep = Annotated[CommandPublisher, Depends(_publisher)]

api_router = APIRouter(prefix=API_PREFIX)
ops_router = APIRouter()


# -- bundles ------------------------------------------------------------------------------


async def _receive_upload(request: Request, store: BundleStore, tmp: Path) -> None:
    """Stream the body (raw, or the ``file`` part of a multipart form) into ``tmp``."""
    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        store.check_size(int(declared) - (_MULTIPART_SLACK_BYTES if multipart else 0))
    n = 0
    # Plain writes from the event loop: chunks are small and the page cache absorbs them;
    # the one slow call (fsync) runs in the thread pool below.
    with open(tmp, "wb") as out:
        if multipart:
            async with request.form(max_files=1, max_fields=4) as form:
                part = form.get("file")
                if not isinstance(part, UploadFile):
                    raise InvalidRequest("a multipart upload carries the bundle in field 'file'")
                while chunk := await part.read(_UPLOAD_CHUNK):
                    n += len(chunk)
                    store.check_size(n)
                    out.write(chunk)
        else:
            async for chunk in request.stream():
                n += len(chunk)
                store.check_size(n)
                out.write(chunk)
        out.flush()
        await run_in_threadpool(os.fsync, out.fileno())


@api_router.post(
    "/bundles",
    response_model=BundlePublic,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "required": True,
        }
    },
)
async def upload_bundle(
    request: Request, response: Response, store: StoreDep, session: SessionDep
) -> Any:
    """Upload a bundle (raw body, or multipart field ``file``); 201 new, 200 already stored."""
    tmp = store.new_upload_path()
    try:
        await _receive_upload(request, store, tmp)
        bundle, created = await run_in_threadpool(store.add, session, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        await run_in_threadpool(_audit_upload, session, actor_of(request), bundle)
    response.status_code = 201 if created else 200
    return bundle


def _audit_upload(session: Session, actor: str, bundle: Bundle) -> None:
    audit_record(
        session,
        actor,
        "bundle.upload",
        after={
            "model": bundle.model_name,
            "version": bundle.model_version,
            "profile": bundle.profile,
        },
        bundle_sha256=bundle.sha256,
    )
    session.commit()


@api_router.get("/bundles", response_model=list[BundlePublic])
def list_bundles(
    session: SessionDep,
    model_name: str | None = None,
    profile: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Bundles in the registry, newest upload first."""
    query = select(Bundle).order_by(col(Bundle.uploaded_at).desc()).limit(limit)
    if model_name is not None:
        query = query.where(Bundle.model_name == model_name)
    if profile is not None:
        query = query.where(Bundle.profile == profile)
    return session.exec(query).all()


def _bundle(session: Session, sha256: str) -> Bundle:
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        raise NotFound(f"bundle {sha256} is not in the registry")
    return bundle


@api_router.get("/bundles/{sha256}", response_model=BundlePublicWithManifest)
def get_bundle(sha256: str, session: SessionDep) -> Any:
    """One bundle with its verified manifest."""
    return _bundle(session, sha256)


@api_router.get("/bundles/{sha256}/download", response_class=FileResponse)
def download_bundle(sha256: str, session: SessionDep, store: StoreDep) -> FileResponse:
    """The bundle file; supports HTTP Range (single and multiple ranges, If-Range)."""
    _bundle(session, sha256)
    path = store.path_of(sha256)
    if not path.is_file():
        raise NotFound(f"bundle {sha256} is registered but its file is missing from the store")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


# -- devices ------------------------------------------------------------------------------


@api_router.post("/devices", response_model=DevicePublic, status_code=201)
def register_device(
    body: DeviceCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
) -> Any:
    """Register a device (201); the same again, or adopting a self-registered one, is 200."""
    try:
        validate_device_id(body.id)
    except TopicError as exc:
        raise InvalidRequest(str(exc)) from None
    device = session.get(Device, body.id)
    if device is None:
        device = Device(
            id=body.id,
            profile=body.profile,
            tags=sorted(set(body.tags)),
            groups=sorted(set(body.groups)),
            registered_at=utcnow(),
        )
        session.add(device)
    elif device.auto_registered or device.profile in (None, body.profile):
        device.profile = body.profile
        device.tags = sorted({*(device.tags or []), *body.tags})
        device.groups = sorted({*(device.groups or []), *body.groups})
        device.auto_registered = False
        response.status_code = 200
    else:
        raise Conflict(f"device {body.id!r} is already registered with profile {device.profile!r}")
    audit_record(
        session,
        actor_of(request),
        "device.register",
        after={"profile": device.profile, "tags": device.tags},
        target=body.id,
    )
    session.commit()
    session.refresh(device)
    return _device_public(session, device, settings)


def _device_public(session: Session, device: Device, settings: FleetSettings) -> DevicePublic:
    detail = device_detail(session, device, offline_after_s=settings.offline_after_s)
    return DevicePublic.model_validate(detail.model_dump(exclude={"events", "commands"}))


@api_router.get("/devices", response_model=list[DevicePublic])
def get_devices(
    session: SessionDep,
    settings: SettingsDep,
    profile: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Any:
    """Devices by id, with model, last seen, online, inference total and latest p95."""
    return list_devices(
        session,
        offline_after_s=settings.offline_after_s,
        profile=profile,
        limit=limit,
        offset=offset,
    )


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} is not registered")
    return device


@api_router.get("/devices/{device_id}", response_model=DeviceDetail)
def get_device(device_id: str, session: SessionDep, settings: SettingsDep) -> Any:
    """One device with its recent status events and commands."""
    return device_detail(
        session, _device(session, device_id), offline_after_s=settings.offline_after_s
    )


@api_router.post("/devices/{device_id}/rollback", response_model=CommandPublic, status_code=202)
def rollback_device(
    device_id: str,
    session: SessionDep,
    publisher: PublisherDep,
    request: Request,
    body: Annotated[RollbackCreate | None, Body()] = None,
) -> Any:
    """Send the device a rollback command (to its previous bundle unless one is named)."""
    device = session.get(Device, device_id)
    before = {"desired_bundle_sha256": device.desired_bundle_sha256} if device else None
    target = body.target_bundle_sha256 if body else None
    if device is not None and target is not None:
        # checked before the command is sent: desired state may only name a known bundle
        # (a foreign key), and an unknown one used to fail after publishing (fuzz finding)
        _bundle(session, target)
    result = rollback(session, publisher, device_id, body or RollbackCreate())
    audit_record(
        session,
        actor_of(request),
        "device.rollback",
        before=before,
        after={"desired_bundle_sha256": result.bundle_sha256, "command_id": result.id},
        bundle_sha256=result.bundle_sha256,
        target=device_id,
    )
    session.commit()
    return result


# -- deployments --------------------------------------------------------------------------


@api_router.post("/deployments", response_model=DeploymentPublic, status_code=201)
def create_deployment(
    body: DeploymentCreate,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    request: Request,
) -> Any:
    """Set desired state and send a deploy command to each device (named, or by profile)."""
    result = deploy(session, settings, publisher, body)
    audit_record(
        session,
        actor_of(request),
        "deployment.create",
        after={
            "deployment_id": result.id,
            "target": result.target,
            "device_ids": [c.device_id for c in result.commands],
        },
        bundle_sha256=result.bundle_sha256,
        target=result.id,
    )
    session.commit()
    return result


# -- operations ---------------------------------------------------------------------------


@api_router.get("/stats")
def get_stats(request: Request) -> dict[str, Any]:
    """This process's ingest counters and queue backlog."""
    stats: IngestStats = request.app.state.stats
    worker = request.app.state.worker
    return {**stats.snapshot(), "backlog": worker.backlog if worker is not None else 0}


@ops_router.get("/healthz")
def healthz(request: Request, session: SessionDep) -> dict[str, Any]:
    """Liveness: the database answers. MQTT state is reported, not required."""
    session.exec(select(1)).one()
    mqtt = request.app.state.mqtt
    return {
        "status": "ok",
        "database": "ok",
        "mqtt": "disabled" if mqtt is None else ("connected" if mqtt.connected else "disconnected"),
    }


@ops_router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )
