"""Rollouts: each stage and its devices, gate figures against the control cohort over time,
and every decision with its reason."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from fleet.dashboard import svg
from fleet.dashboard.series import bucketize, fleet_points, values
from fleet.rollout.machine import ACTIVE_PHASES, RolloutPhase
from fleet.rollout.service import ALLOWED, describe, get_rollout, phase_counts
from fleet.rollout.table import Rollout, RolloutDecision, RolloutDevice, RolloutRequest

__all__ = ["PHASE_CSS", "gather_rollout", "gather_rollouts"]

ROLLOUTS_LISTED = 100
DEVICES_LISTED = 500
#: the cohort chart covers the rollout's life, at most this long, in this many buckets
CHART_SPAN_MAX_S = 6 * 3600
CHART_BUCKETS = 60
#: device phase -> CSS class (bar colours): green new version, blue back on the old one
PHASE_CSS = {
    "committed": "ok",
    "sent": "busy",
    "offline": "off",
    "planned": "idle",
    "failed": "bad",
    "unreachable": "bad",
    "rollback_sent": "busy",
    "rollback_offline": "off",
    "rolled_back": "back",
    "rollback_failed": "bad",
}
_PHASE_ORDER = list(PHASE_CSS)


def _stage_bar(counts: dict[str, int], label: str) -> Any:
    segments = [
        svg.Segment(label=p, value=counts.get(p, 0), css=PHASE_CSS.get(p, "idle"))
        for p in sorted(counts, key=lambda p: _PHASE_ORDER.index(p) if p in PHASE_CSS else 99)
    ]
    return svg.stacked_bar(segments, label=label)


def gather_rollouts(session: Session) -> dict[str, Any]:
    """Rollouts, newest first, with device counts per phase."""
    rows = session.exec(
        select(Rollout).order_by(col(Rollout.created_at).desc()).limit(ROLLOUTS_LISTED)
    ).all()
    out = []
    for r in rows:
        total, _ = phase_counts(session, r.id)
        out.append(
            {
                **describe(r),
                "devices": total,
                "active": RolloutPhase(r.phase) in ACTIVE_PHASES,
                "bar": _stage_bar(total, f"rollout {r.id}: devices by phase"),
            }
        )
    return {"rollouts": out}


def _stages(rollout: Rollout, per_stage: list[dict[str, int]], now: datetime) -> list[dict]:
    plan_stages = rollout.plan.get("stages") or []
    out = []
    for i, spec in enumerate(plan_stages):
        counts = per_stage[i] if i < len(per_stage) else {}
        total = sum(counts.values())
        if i < rollout.stage or rollout.phase == RolloutPhase.COMPLETED.value:
            state = "done"
        elif i == rollout.stage:
            state = "current"
        else:
            state = "waiting"
        bake = None
        if state == "current" and rollout.bake_started_at is not None:
            bake = {
                "elapsed_s": max(0.0, (now - rollout.bake_started_at).total_seconds()),
                "bake_s": float(spec.get("bake_s") or 0.0),
            }
        who = []
        if spec.get("percent") is not None:
            who.append(f"{spec['percent']:g} %")
        if spec.get("devices"):
            who.append(f"{len(spec['devices'])} named devices")
        if spec.get("tags"):
            who.append("tags " + ", ".join(spec["tags"]))
        out.append(
            {
                "index": i,
                "who": " + ".join(who),
                "bake_s": spec.get("bake_s"),
                "require_approval": bool(spec.get("require_approval")),
                "shadow": bool(spec.get("shadow")),
                "counts": counts,
                "total": total,
                "committed": counts.get("committed", 0),
                "state": state,
                "bake": bake,
                "bar": _stage_bar(counts, f"stage {i}: devices by phase"),
            }
        )
    return out


def _cohort_charts(session: Session, rollout: Rollout, now: datetime) -> dict[str, Any]:
    """Canary (windows on the rollout's bundle) vs control (the same devices on any other
    bundle) over the rollout's life: p95 latency and error rate."""
    device_ids = session.exec(
        select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
    ).all()
    end = now
    start = max(
        rollout.created_at - timedelta(seconds=60), now - timedelta(seconds=CHART_SPAN_MAX_S)
    )
    points, cut = fleet_points(session, since=start, device_ids=device_ids)
    width = max((end - start).total_seconds() / CHART_BUCKETS, 1.0)
    canary = bucketize(
        points, start=start, end=end, width_s=width,
        keep=lambda p: p.bundle_sha256 == rollout.bundle_sha256,
    )  # fmt: skip
    control = bucketize(
        points, start=start, end=end, width_s=width,
        keep=lambda p: p.bundle_sha256 != rollout.bundle_sha256,
    )  # fmt: skip
    marks = []
    decisions = session.exec(
        select(RolloutDecision)
        .where(RolloutDecision.rollout_id == rollout.id)
        .order_by(col(RolloutDecision.id))
    ).all()
    for d in decisions:
        gates = {g.get("name"): g for g in (d.figures or {}).get("gates", [])}
        lat = gates.get("latency_p95_ratio") or {}
        marks.append((d.at.timestamp(), lat.get("canary"), lat.get("control")))
    x_min, x_max = start.timestamp(), end.timestamp()
    latency = svg.line_chart(
        [
            svg.Series(name="canary (new bundle)", points=values(canary, "p95_ms"), css="canary"),
            svg.Series(name="control (other bundles)", points=values(control, "p95_ms"),
                       css="control"),
        ],
        title="p95 latency, canary vs control",
        y_unit="ms", y_min=0.0, x_min=x_min, x_max=x_max,
    )  # fmt: skip
    errors = svg.line_chart(
        [
            svg.Series(name="canary", points=values(canary, "error_rate"), css="canary"),
            svg.Series(name="control", points=values(control, "error_rate"), css="control"),
        ],
        title="Error rate, canary vs control",
        y_unit="errors/inf", y_min=0.0, x_min=x_min, x_max=x_max,
    )  # fmt: skip
    gate_latency = svg.line_chart(
        [
            svg.Series(name="canary p95 at decision", points=[(t, c) for t, c, _ in marks],
                       css="canary"),
            svg.Series(name="control p95 at decision", points=[(t, k) for t, _, k in marks],
                       css="control"),
        ],
        title="Gate figures at each decision: p95 latency (ms)",
        y_unit="ms", y_min=0.0, x_min=x_min, x_max=x_max, width=1100, height=150,
        empty_text="no gate has been judged yet",
    )  # fmt: skip
    return {
        "latency_chart": latency,
        "error_chart": errors,
        "gate_chart": gate_latency,
        "chart_cut": cut,
    }


def gather_rollout(session: Session, rollout_id: str, now: datetime) -> dict[str, Any]:
    """Everything the rollout page shows; NotFound for an unknown id."""
    rollout = get_rollout(session, rollout_id)
    total, per_stage = phase_counts(session, rollout.id)
    devices = session.exec(
        select(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout.id)
        .order_by(col(RolloutDevice.stage), col(RolloutDevice.position))
        .limit(DEVICES_LISTED)
    ).all()
    decisions = session.exec(
        select(RolloutDecision)
        .where(RolloutDecision.rollout_id == rollout.id)
        .order_by(col(RolloutDecision.id).desc())
        .limit(200)
    ).all()
    pending = session.exec(
        select(RolloutRequest).where(
            RolloutRequest.rollout_id == rollout.id, col(RolloutRequest.applied_at).is_(None)
        )
    ).all()
    phase = RolloutPhase(rollout.phase)
    allowed = {action: phase in phases for action, phases in ALLOWED.items()}
    return {
        "rollout": {**describe(rollout), "devices": total},
        "plan": rollout.plan,
        "stages": _stages(rollout, per_stage, now),
        "devices": devices,
        "devices_cut": rollout.device_count > DEVICES_LISTED,
        "decisions": decisions,
        "pending": pending,
        "allowed": allowed,
        "active": phase in ACTIVE_PHASES,
        "bar": _stage_bar(total, "all devices by phase"),
        **_cohort_charts(session, rollout, now),
    }
