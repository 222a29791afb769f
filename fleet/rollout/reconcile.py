"""Desired vs reported state: re-send a device the bundle the fleet wants, rate-limited.

A device outside any active rollout whose heartbeat reports another bundle than its desired
one gets the command again: a deploy when the desired bundle is newer (or another model), a
rollback naming the desired bundle when it is an older version of the same model (the agent
refuses to deploy older versions). At most once per ``interval_s`` per device and at most
``max_attempts`` times per desired bundle; then the mismatch is only shown.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, insert
from sqlmodel import Session, col, select

from fleet.models import Bundle, Device
from fleet.rollout.machine import ACTIVE_PHASES
from fleet.rollout.table import CommandOutbox, DeviceReconcile, Rollout, RolloutDevice
from fleet.settings import FleetSettings
from protocol.messages import DeployCommand, RollbackCommand, encode_message

__all__ = ["reconcile"]

log = logging.getLogger(__name__)

BATCH_MAX = 1000


def _command_id(device_id: str, desired: str, n: int) -> str:
    return hashlib.sha256(f"reconcile/{device_id}/{desired}/{n}".encode()).hexdigest()[:32]


def reconcile(
    session: Session,
    settings: FleetSettings,
    now: datetime,
    *,
    interval_s: float,
    max_attempts: int,
) -> int:
    """Queue repair commands in the outbox (not committed); returns how many."""
    cutoff = now - timedelta(seconds=settings.offline_after_s)
    in_rollout = (
        select(RolloutDevice.device_id)
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(col(Rollout.phase).in_([p.value for p in ACTIVE_PHASES]))
    )
    unsent = select(CommandOutbox.device_id).where(col(CommandOutbox.sent_at).is_(None))
    candidates = session.exec(
        select(Device, DeviceReconcile)
        .join(DeviceReconcile, col(DeviceReconcile.device_id) == col(Device.id), isouter=True)
        .where(
            col(Device.desired_bundle_sha256).is_not(None),
            col(Device.online).is_(True),
            col(Device.last_seen) >= cutoff,
            col(Device.id).not_in(in_rollout),
            col(Device.id).not_in(unsent),
        )
        .where(
            (col(Device.reported_bundle_sha256).is_(None))
            | (col(Device.reported_bundle_sha256) != col(Device.desired_bundle_sha256))
        )
        .limit(BATCH_MAX)
    ).all()
    rows = []
    for device, rec in candidates:
        desired = device.desired_bundle_sha256
        assert desired is not None
        if rec is not None and rec.desired_sha256 == desired:
            if rec.sent_count >= max_attempts:
                continue
            if now - rec.last_sent_at < timedelta(seconds=interval_s):
                continue
            n = rec.sent_count + 1
        else:
            n = 1
        bundle = session.get(Bundle, desired)
        if bundle is None:
            continue
        cid = _command_id(device.id, desired, n)
        older = (
            device.reported_model_name == bundle.model_name
            and device.reported_model_version is not None
            and bundle.model_version < device.reported_model_version
        )
        command: DeployCommand | RollbackCommand
        if older:
            command = RollbackCommand(
                device_id=device.id,
                command_id=cid,
                message_id=cid,
                target_bundle_sha256=desired,
                reason="reconcile: the fleet wants this bundle",
            )
        else:
            command = DeployCommand(
                device_id=device.id,
                command_id=cid,
                message_id=cid,
                bundle_sha256=desired,
                bundle_size=bundle.size,
                bundle_url=settings.bundle_url(desired),
                model_name=bundle.model_name,
                model_version=bundle.model_version,
            )
        rows.append(
            {
                "id": cid,
                "rollout_id": None,
                "device_id": device.id,
                "kind": command.kind,
                "stage": None,
                "attempt": n,
                "bundle_sha256": desired,
                "payload": encode_message(command).decode(),
                "created_at": now,
                "send_count": 0,
            }
        )
        if rec is None:
            session.add(
                DeviceReconcile(
                    device_id=device.id, desired_sha256=desired, sent_count=1, last_sent_at=now
                )
            )
        else:
            rec.desired_sha256, rec.sent_count, rec.last_sent_at = desired, n, now
            session.add(rec)
        log.info(
            "device %s runs %s, wants %s: re-sending (%s, attempt %d)",
            device.id,
            (device.reported_bundle_sha256 or "nothing")[:12],
            desired[:12],
            command.kind,
            n,
        )
    if rows:
        existing = set(
            session.exec(
                select(CommandOutbox.id).where(
                    and_(col(CommandOutbox.id).in_([r["id"] for r in rows]))
                )
            )
        )
        rows = [r for r in rows if r["id"] not in existing]
        if rows:
            session.execute(insert(CommandOutbox), rows)
    return len(rows)
