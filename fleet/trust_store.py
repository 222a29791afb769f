"""The fleet's trust roots: install root N+1 (verified as a successor) and hand it to devices.

The release engineer makes new roots offline (`edgefleet keys add | revoke | rotate-root`);
the fleet holds no key that could sign one. ``POST /api/v1/trust-root`` takes the root
document, accepts it only as the verified successor of the current root, stores it (every
version is kept: devices need the chain), switches bundle verification to it, and sends
each device a ``trust_root`` command carrying the chain. Devices walk the chain from their
installed version (`TrustRoot.update_chain`) and report COMMITTED or REJECTED.

Devices that are offline get the command from their broker session when they return (QoS 1,
session expiry 7 days); ``POST /api/v1/trust-root/push`` sends it again to any device.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from fleet.audit import record
from fleet.auth import Principal, authorize
from fleet.db import SessionDep
from fleet.errors import BrokerUnavailable, Conflict, InvalidRequest
from fleet.models import Device, UTCDateTime, utcnow
from protocol.errors import ProtocolError
from protocol.limits import MAX_MESSAGE_BYTES, MAX_TRUST_ROOT_BYTES
from protocol.messages import TrustRootCommand
from protocol.trust import TrustRoot

__all__ = [
    "TrustRootRecord",
    "chain_for_devices",
    "install_root",
    "load_current_root",
    "push_roots",
    "trust_router",
]

log = logging.getLogger(__name__)

#: leave room for the command's own fields inside one message
_CHAIN_BUDGET_BYTES = MAX_MESSAGE_BYTES - 4096


class TrustRootRecord(SQLModel, table=True):
    """One trust-root version the fleet accepted (the chain devices walk)."""

    __tablename__ = "trust_root"
    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    raw: str = Field(sa_type=Text)
    installed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    installed_by: str = Field(max_length=64)


def load_current_root(session: Session, file_root: TrustRoot) -> TrustRoot:
    """The newest root: the settings file's, or a newer one stored here (verified chain)."""
    rows = session.exec(select(TrustRootRecord).order_by(col(TrustRootRecord.version))).all()
    if not any(r.version == file_root.version for r in rows):
        session.add(
            TrustRootRecord(
                version=file_root.version, raw=file_root.raw.decode(), installed_by="settings"
            )
        )
        try:
            session.commit()
        except IntegrityError:  # another fleet process stored it at the same moment
            session.rollback()
    newer = [r.raw.encode() for r in rows if r.version > file_root.version]
    # the stored chain is re-verified from the file's root: a row edited in the database
    # cannot make the fleet trust a key the release engineer never signed for
    return file_root.update_chain(newer) if newer else file_root


def install_root(session: Session, current: TrustRoot, raw: bytes, *, actor: str) -> TrustRoot:
    """Verify ``raw`` as the successor of ``current`` and store it; returns the new root."""
    if len(raw) > MAX_TRUST_ROOT_BYTES:
        raise InvalidRequest(f"trust root is {len(raw)} bytes; the limit is {MAX_TRUST_ROOT_BYTES}")
    known = session.exec(select(TrustRootRecord.raw)).all()
    if raw in {r.encode() for r in known}:
        return current  # already installed: posting the same root again changes nothing
    try:
        new = current.verify_successor(raw)
        new.check_not_expired()
    except ProtocolError as exc:
        raise InvalidRequest(f"trust root refused: {exc}", extra={"reason": exc.code}) from exc
    if session.get(TrustRootRecord, new.version) is not None:
        raise Conflict(f"trust root version {new.version} is already installed")
    session.add(TrustRootRecord(version=new.version, raw=raw.decode(), installed_by=actor))
    doc = new.document
    record(
        session,
        actor,
        "trust_root.install",
        before={"version": current.version, "release_keys": sorted(current.release_keys())},
        after={
            "version": new.version,
            "release_keys": sorted(new.release_keys()),
            "root_keys": list(doc.roles["root"].keyids),
            "revoked": list(doc.revoked_keyids),
            "expires_at": doc.expires_at.isoformat(),
        },
        target=f"trust-root v{new.version}",
    )
    session.commit()
    log.warning("trust root version %d installed by %s", new.version, actor)
    return new


def chain_for_devices(session: Session) -> tuple[str, ...]:
    """Root documents for devices (version 2 up), newest kept when they do not all fit."""
    rows = session.exec(
        select(TrustRootRecord)
        .where(TrustRootRecord.version >= 2)
        .order_by(col(TrustRootRecord.version).desc())
    ).all()
    chain: list[str] = []
    used = 0
    for r in rows:
        if used + len(r.raw) > _CHAIN_BUDGET_BYTES:
            log.warning("trust-root chain truncated at version %d (message size)", r.version)
            break
        chain.append(r.raw)
        used += len(r.raw)
    return tuple(reversed(chain))


class PushResult(BaseModel):
    version: int
    pushed: list[str]
    failed: list[str]


def push_roots(
    session: Session, publisher: Any, version: int, device_ids: list[str] | None = None
) -> PushResult:
    """Send every (or the named) device a trust_root command with the chain."""
    chain = chain_for_devices(session)
    ids = device_ids or list(session.exec(select(Device.id).order_by(col(Device.id))).all())
    pushed: list[str] = []
    failed: list[str] = []
    if not chain or publisher is None:
        return PushResult(version=version, pushed=[], failed=list(ids))
    for device_id in ids:
        try:
            publisher.publish_command(TrustRootCommand(device_id=device_id, roots=chain))
        except BrokerUnavailable as exc:
            log.warning("trust root not sent to %s: %s", device_id, exc.message)
            failed.append(device_id)
        else:
            pushed.append(device_id)
    return PushResult(version=version, pushed=pushed, failed=failed)


# -- routes ---------------------------------------------------------------------------------

trust_router = APIRouter(prefix="/api/v1/trust-root")


class TrustRootPublic(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    expires_at: datetime
    root: dict[str, Any]


def _current(request: Request) -> TrustRoot:
    return request.app.state.trust  # type: ignore[no-any-return]


@trust_router.get("", response_model=TrustRootPublic)
def get_trust_root(request: Request) -> Any:
    """The trust root uploads are verified against (and devices should hold)."""
    import json

    root = _current(request)
    return TrustRootPublic(
        version=root.version, expires_at=root.document.expires_at, root=json.loads(root.raw)
    )


@trust_router.post(
    "",
    response_model=PushResult,
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": {"type": "object"}}},
            "required": True,
        }
    },
)
async def post_trust_root(
    request: Request, session: SessionDep, principal: Annotated[Principal, Depends(authorize)]
) -> Any:
    """Install root N+1 (admin): verified as the successor, then pushed to every device."""
    from starlette.concurrency import run_in_threadpool

    raw = await request.body()
    current = _current(request)
    new = await run_in_threadpool(install_root, session, current, raw, actor=principal.name)
    if new is current:
        return PushResult(version=current.version, pushed=[], failed=[])
    request.app.state.trust = new
    store = getattr(request.app.state, "store", None)
    if store is not None and dataclasses.is_dataclass(store):
        request.app.state.store = dataclasses.replace(store, trust=new)
    return await run_in_threadpool(push_roots, session, request.app.state.publisher, new.version)


class PushRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_ids: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=10_000
    )


@trust_router.post("/push", response_model=PushResult)
def post_push(
    request: Request,
    session: SessionDep,
    body: Annotated[PushRequest | None, Body()] = None,
) -> Any:
    """Send the trust-root chain again (admin), to the named devices or to all."""
    return push_roots(
        session,
        request.app.state.publisher,
        _current(request).version,
        (body.device_ids if body else None),
    )
