"""Bundles: versions, profiles, sizes, verification reports, and where each one runs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.errors import NotFound
from fleet.models import Bundle, Device

__all__ = ["gather_bundle", "gather_bundles", "verification_of"]

BUNDLES_LISTED = 500
DEVICES_LISTED = 500


def verification_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's verification report, flattened for display (missing fields: None)."""
    v = manifest.get("verification") or {}
    return {
        "passed": v.get("passed"),
        "gate": v.get("gate"),
        "samples": v.get("samples"),
        "runtime": v.get("runtime"),
        "float_top1": v.get("float_top1_accuracy"),
        "artifact_top1": v.get("artifact_top1_accuracy"),
        "drop_points": v.get("top1_drop_points"),
        "outputs": v.get("outputs") or [],
        "notes": v.get("notes") or "",
    }


def _counts(session: Session, column: Any) -> dict[str, int]:
    return {
        sha: int(n)
        for sha, n in session.exec(
            select(column, func.count()).where(column.is_not(None)).group_by(column)
        )
    }


def gather_bundles(session: Session) -> dict[str, Any]:
    """Every bundle (newest first) with its verification summary and device counts."""
    bundles = session.exec(
        select(Bundle).order_by(col(Bundle.uploaded_at).desc()).limit(BUNDLES_LISTED)
    ).all()
    running = _counts(session, col(Device.reported_bundle_sha256))
    desired = _counts(session, col(Device.desired_bundle_sha256))
    rows = []
    for b in bundles:
        artifact = (b.manifest or {}).get("artifact") or {}
        rows.append(
            {
                "bundle": b,
                "precision": artifact.get("precision"),
                "runtime": artifact.get("runtime"),
                "verification": verification_of(b.manifest or {}),
                "running": running.get(b.sha256, 0),
                "desired": desired.get(b.sha256, 0),
            }
        )
    return {"bundles": rows}


def gather_bundle(session: Session, sha256: str) -> dict[str, Any]:
    """One bundle's manifest, verification and devices; NotFound for an unknown hash."""
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        raise NotFound(f"bundle {sha256} is not in the registry")
    devices = session.exec(
        select(Device)
        .where(
            (col(Device.reported_bundle_sha256) == sha256)
            | (col(Device.desired_bundle_sha256) == sha256)
        )
        .order_by(col(Device.id))
        .limit(DEVICES_LISTED)
    ).all()
    manifest = bundle.manifest or {}
    versions = session.exec(
        select(Bundle)
        .where(Bundle.model_name == bundle.model_name, Bundle.profile == bundle.profile)
        .order_by(col(Bundle.model_version).desc(), col(Bundle.uploaded_at).desc())
    ).all()
    return {
        "bundle": bundle,
        "manifest": manifest,
        "artifact": manifest.get("artifact") or {},
        "files": manifest.get("files") or [],
        "lineage": manifest.get("lineage") or {},
        "quantization": manifest.get("quantization") or {},
        "verification": verification_of(manifest),
        "devices": devices,
        "versions": versions,
    }
