"""The health verdict after a switch: pure, over what the new model did in its window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.inference import HealthStats

__all__ = ["HealthVerdict", "judge_health"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthVerdict:
    healthy: bool
    detail: str
    p95_ms: float | None


def judge_health(stats: HealthStats, *, budget_ms: float, min_calls: int) -> HealthVerdict:
    """Healthy when no inference failed, enough ran, and p95 latency is within budget."""
    p95 = float(np.percentile(stats.latencies_ms, 95)) if stats.latencies_ms else None
    if stats.runtime_errors:
        return HealthVerdict(
            healthy=False,
            detail=f"{stats.runtime_errors} of {stats.calls} inferences failed",
            p95_ms=p95,
        )
    if stats.calls < min_calls:
        return HealthVerdict(
            healthy=False,
            detail=f"only {stats.calls} inferences ran; the health window needs {min_calls}",
            p95_ms=p95,
        )
    if p95 is not None and p95 > budget_ms:
        return HealthVerdict(
            healthy=False,
            detail=f"p95 latency {p95:.3g} ms over the profile's budget of {budget_ms:g} ms",
            p95_ms=p95,
        )
    shown = "n/a" if p95 is None else f"{p95:.3g} ms"
    return HealthVerdict(
        healthy=True, detail=f"{stats.calls} inferences, 0 errors, p95 {shown}", p95_ms=p95
    )
