"""The alert rule over consecutive windows: a small pure state machine.

A window is "drifted", "stable" or "unknown" (not enough data). An alert fires after
``consecutive`` drifted windows in a row and resolves after ``resolve_after`` stable ones
in a row. Unknown windows change nothing: a device fleet that goes quiet at night neither
resolves nor raises an alert.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["AlertState", "Observation", "Transition", "step"]

Observation = Literal["drifted", "stable", "unknown"]
Transition = Literal["fired", "resolved", "still_firing"] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertState:
    streak: int = 0
    calm: int = 0
    firing: bool = False


def step(
    state: AlertState, seen: Observation, *, consecutive: int, resolve_after: int
) -> tuple[AlertState, Transition]:
    """The next state and what happened ("fired", "resolved", "still_firing" or None)."""
    if seen == "unknown":
        return state, ("still_firing" if state.firing else None)
    if seen == "drifted":
        nxt = replace(state, streak=state.streak + 1, calm=0)
        if state.firing:
            return nxt, "still_firing"
        if nxt.streak >= consecutive:
            return replace(nxt, firing=True), "fired"
        return nxt, None
    nxt = replace(state, streak=0, calm=state.calm + 1)
    if state.firing:
        if nxt.calm >= resolve_after:
            return replace(nxt, firing=False), "resolved"
        return nxt, "still_firing"
    return nxt, None
