"""Which telemetry windows count as gate evidence: none that overlaps a model load.

The first inferences on a freshly loaded runtime session are many times slower than the
rest (allocation, kernel selection, page faults), and a loaded host stretches them further.
The agent switches models, then runs its health check, then commits; the window in which a
device switched therefore holds those cold inferences, and a canary whose every device just
switched looked many times slower than a control that did not (12.5x for two identical
models on a shared 2-core host). The same happens to any device whose agent restarted.

So each device's model loads become `LoadSpan`s, and a window that overlaps a span, or
began less than ``warmup_s`` after the span ended, is not evidence; nor, for both cohorts
alike, is a window that began less than ``warmup_s`` after the bake started (the stage's
last canaries committed just before it). Spans come from:

- the device's status events (`load_spans`): ``switched`` opens a span that ``committed``
  or ``reverted`` closes; ``rolled_back`` swaps models at once (a point span), and so is a
  close with no switch before it (the agent also says ``committed`` to a deploy of the bundle
  it already runs).
- gaps in its telemetry (`restart_spans`): consecutive windows of one agent run end and
  begin at the same instant, so a window that begins well after the previous one ended
  (and does not say windows were dropped in between) follows a restart; the span runs from
  there to the first window with inferences in it (the model is loaded by then).

Spans and windows are both on the device's own clock (``DeviceEvent.sent_at``,
``window_start``), so a device whose clock is off is still compared with itself; only the
bake's start is the fleet's, as in the rest of the gates. Pure functions over plain rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from fleet.models import TelemetryRecord

__all__ = [
    "CLOSE_STATES",
    "LOAD_STATES",
    "OPEN_STATES",
    "POINT_STATES",
    "RESTART_GAP_S",
    "LoadSpan",
    "load_spans",
    "restart_spans",
    "warm_windows",
]

#: status states that start serving a model (the health check follows)
OPEN_STATES = frozenset({"switched"})
#: status states that end a switch: the new model stays, or the old one is back
CLOSE_STATES = frozenset({"committed", "reverted"})
#: status states that load and serve another model in one step
POINT_STATES = frozenset({"rolled_back"})
LOAD_STATES = OPEN_STATES | CLOSE_STATES | POINT_STATES
#: consecutive windows of one agent run touch (one closes when the next opens); an agent
#: restart takes seconds, so a gap longer than this between them is a restart
RESTART_GAP_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpan:
    """A stretch of a device's time (its own clock) in which it was loading a model."""

    device_id: str
    start: datetime
    #: None: not over yet (no closing report)
    end: datetime | None

    def covers(self, window_start: datetime, window_end: datetime, warmup_s: float) -> bool:
        """The window overlaps the span or began less than ``warmup_s`` after it ended."""
        began_after = window_end > self.start
        settled_first = self.end is None or window_start < self.end + timedelta(seconds=warmup_s)
        return began_after and settled_first


def load_spans(events: Iterable[tuple[str, str, datetime]]) -> list[LoadSpan]:
    """Spans from ``(device_id, state, sent_at)`` status events (states outside
    `LOAD_STATES` are ignored)."""
    by_device: dict[str, list[tuple[datetime, int, str]]] = {}
    for device_id, state, at in events:
        if state in LOAD_STATES:
            # at one instant a switch comes before what ends it
            rank = 0 if state in OPEN_STATES else 1 if state in CLOSE_STATES else 2
            by_device.setdefault(device_id, []).append((at, rank, state))
    spans: list[LoadSpan] = []
    for device_id, seen in by_device.items():
        opened: datetime | None = None  # a switch without its end yet
        for at, _, state in sorted(seen):
            if state in OPEN_STATES:
                if opened is not None:  # a switch that never reported its end: this one ends it
                    spans.append(LoadSpan(device_id=device_id, start=opened, end=at))
                opened = at
            else:
                start = at if opened is None else opened
                spans.append(LoadSpan(device_id=device_id, start=start, end=at))
                opened = None
        if opened is not None:
            spans.append(LoadSpan(device_id=device_id, start=opened, end=None))
    return spans


def _dropped(row: TelemetryRecord) -> bool:
    """The agent says it dropped windows just before this one (a gap, not a restart)."""
    try:
        return int((row.window or {}).get("dropped_windows") or 0) > 0
    except (TypeError, ValueError):
        return False


def restart_spans(
    rows: Iterable[TelemetryRecord],
    previous_end: Mapping[str, datetime],
    *,
    gap_s: float = RESTART_GAP_S,
) -> list[LoadSpan]:
    """Spans for agent restarts seen as gaps between a device's consecutive windows.

    ``rows`` are the devices' windows on every bundle, ``previous_end`` the end of each
    device's last window before them (a device without one: no gap can be seen).
    """
    by_device: dict[str, list[TelemetryRecord]] = {}
    for r in rows:
        by_device.setdefault(r.device_id, []).append(r)
    gap = timedelta(seconds=gap_s)
    spans: list[LoadSpan] = []
    for device_id, windows in by_device.items():
        windows.sort(key=lambda w: (w.window_start, w.window_end))
        last_end = previous_end.get(device_id)
        opened: datetime | None = None
        for w in windows:
            if last_end is not None and w.window_start - last_end > gap and not _dropped(w):
                opened = w.window_start
            if opened is not None and w.inference_count > 0:
                spans.append(LoadSpan(device_id=device_id, start=opened, end=w.window_start))
                opened = None
            last_end = w.window_end if last_end is None else max(last_end, w.window_end)
        if opened is not None:
            spans.append(LoadSpan(device_id=device_id, start=opened, end=None))
    return spans


def warm_windows(
    rows: Sequence[TelemetryRecord],
    spans: Iterable[LoadSpan],
    warmup_s: float,
    *,
    since: datetime | None = None,
) -> list[TelemetryRecord]:
    """The windows that no span covers: what the device saw once its model was warm.

    With ``since`` (the bake's start), also only windows that began ``warmup_s`` or more
    after it: the stage's last devices committed just before the bake started, so without
    this the control would cover seconds (installs keeping the host busy) that the canary
    does not, and the two would not be compared over the same time.
    """
    by_device: dict[str, list[LoadSpan]] = {}
    for s in spans:
        by_device.setdefault(s.device_id, []).append(s)
    start = None if since is None else since + timedelta(seconds=warmup_s)
    return [
        r
        for r in rows
        if (start is None or r.window_start >= start)
        and not any(
            s.covers(r.window_start, r.window_end, warmup_s) for s in by_device.get(r.device_id, ())
        )
    ]
