"""Deployments and rollbacks: choose devices, send each its command, record desired state.

Nothing is half-done: every check (bundle known, devices known, profile and selectors
match) happens before the first command is sent, and desired state is recorded only for
devices whose command the broker acknowledged. If the broker fails part-way, the devices
already sent to are recorded and the error says which.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sqlmodel import Session, col, select

from fleet.errors import BrokerUnavailable, Conflict, InvalidRequest, NotFound
from fleet.models import (
    Bundle,
    Command,
    CommandPublic,
    Deployment,
    DeploymentCreate,
    DeploymentPublic,
    Device,
    RollbackCreate,
    utcnow,
)
from fleet.settings import FleetSettings
from protocol.errors import TopicError
from protocol.messages import DeployCommand, RollbackCommand, new_id
from protocol.topics import validate_device_id

__all__ = ["CommandPublisher", "deploy", "rollback"]

log = logging.getLogger(__name__)


class CommandPublisher(Protocol):
    """The seam to the broker: the MQTT client in production, a fake in unit tests."""

    def publish_command(self, command: DeployCommand | RollbackCommand) -> None:
        """Send with QoS 1 and wait for the broker's ack; raise BrokerUnavailable if not."""
        ...


def _selected(device: Device, bundle: Bundle) -> bool:
    selectors = bundle.manifest.get("device_selectors") or []
    if not selectors:
        return True
    mine = {device.id, *(f"tag:{t}" for t in device.tags or [])}
    return bool(mine.intersection(selectors))


def _devices_for(session: Session, request: DeploymentCreate, bundle: Bundle) -> list[Device]:
    if request.profile is not None:
        if request.profile != bundle.profile:
            raise Conflict(
                f"bundle {bundle.sha256[:12]} is for profile {bundle.profile!r}, "
                f"not {request.profile!r}"
            )
        devices = list(
            session.exec(
                select(Device).where(Device.profile == request.profile).order_by(col(Device.id))
            )
        )
        if not devices:
            raise NotFound(f"no devices with profile {request.profile!r} are registered")
        return [d for d in devices if _selected(d, bundle)]
    assert request.device_ids is not None
    ids = list(dict.fromkeys(request.device_ids))  # unique, in the caller's order
    for device_id in ids:
        try:
            validate_device_id(device_id)
        except TopicError as exc:
            raise InvalidRequest(str(exc)) from None
    found = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))}
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotFound(f"unknown devices: {missing[:20]}", extra={"device_ids": missing})
    devices = [found[i] for i in ids]
    wrong = [d.id for d in devices if d.profile != bundle.profile]
    if wrong:
        raise Conflict(
            f"bundle {bundle.sha256[:12]} is for profile {bundle.profile!r}; these devices "
            f"are not (or have not reported a profile yet): {wrong[:20]}",
            extra={"device_ids": wrong},
        )
    unselected = [d.id for d in devices if not _selected(d, bundle)]
    if unselected:
        raise Conflict(
            f"bundle {bundle.sha256[:12]} is limited by its device selectors; it does not "
            f"target: {unselected[:20]}",
            extra={"device_ids": unselected},
        )
    return devices


def deploy(
    session: Session,
    settings: FleetSettings,
    publisher: CommandPublisher,
    request: DeploymentCreate,
) -> DeploymentPublic:
    """Send a DeployCommand to each chosen device and record its desired bundle."""
    bundle = session.get(Bundle, request.bundle_sha256)
    if bundle is None:
        raise NotFound(f"bundle {request.bundle_sha256} is not in the registry; upload it first")
    devices = _devices_for(session, request, bundle)
    deployment = Deployment(
        id=new_id(),
        bundle_sha256=bundle.sha256,
        target=(
            {"profile": request.profile}
            if request.profile is not None
            else {"device_ids": [d.id for d in devices]}
        ),
    )
    session.add(deployment)
    # no ORM relationships, so the unit of work does not order inserts by foreign key
    session.flush()
    sent: list[Command] = []
    failure: BrokerUnavailable | None = None
    for device in devices:
        command = DeployCommand(
            device_id=device.id,
            bundle_sha256=bundle.sha256,
            bundle_size=bundle.size,
            bundle_url=settings.bundle_url(bundle.sha256),
            model_name=bundle.model_name,
            model_version=bundle.model_version,
        )
        try:
            publisher.publish_command(command)
        except BrokerUnavailable as exc:
            failure = exc
            break
        now = utcnow()
        device.desired_bundle_sha256 = bundle.sha256
        device.desired_at = now
        row = Command(
            id=command.command_id,
            device_id=device.id,
            kind="deploy",
            bundle_sha256=bundle.sha256,
            deployment_id=deployment.id,
            sent_at=now,
            updated_at=now,
        )
        session.add(row)
        sent.append(row)
    if failure is not None and not sent:
        session.rollback()
        raise failure
    session.commit()
    if failure is not None:
        raise BrokerUnavailable(
            f"{failure.message}; commands went to {len(sent)} of {len(devices)} devices "
            f"(deployment {deployment.id})",
            extra={
                "deployment_id": deployment.id,
                "sent_device_ids": [c.device_id for c in sent],
                "unsent_device_ids": [d.id for d in devices[len(sent) :]],
            },
        ) from failure
    log.info(
        "deployment %s: %s v%d to %d devices",
        deployment.id,
        bundle.model_name,
        bundle.model_version,
        len(sent),
    )
    return DeploymentPublic(
        id=deployment.id,
        bundle_sha256=bundle.sha256,
        created_at=deployment.created_at,
        target=deployment.target,
        commands=[CommandPublic.model_validate(c, from_attributes=True) for c in sent],
    )


def rollback(
    session: Session,
    publisher: CommandPublisher,
    device_id: str,
    request: RollbackCreate,
) -> CommandPublic:
    """Send a RollbackCommand to one device and record it."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} is not registered")
    command = RollbackCommand(
        device_id=device.id,
        target_bundle_sha256=request.target_bundle_sha256,
        reason=request.reason,
    )
    publisher.publish_command(command)
    now = utcnow()
    row = Command(
        id=command.command_id,
        device_id=device.id,
        kind="rollback",
        bundle_sha256=request.target_bundle_sha256,
        sent_at=now,
        updated_at=now,
    )
    # the device no longer should run what was desired; its next report says what it runs
    device.desired_bundle_sha256 = request.target_bundle_sha256
    device.desired_at = now
    session.add(row)
    session.commit()
    session.refresh(row)
    return CommandPublic.model_validate(row, from_attributes=True)
