"""The rollout gates read warm telemetry only: a device's switch window and the window after an
agent restart hold cold-start inferences (10x slower) and are not evidence.

Pure tests of `fleet.rollout.warmup` and of the gates fed by it, then the same stories through
`canary_and_control` on a SQLite file (no broker), as the rollout runner reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.db import create_db, make_engine
from fleet.models import Device, DeviceEvent, TelemetryRecord
from fleet.rollout.cohort import CohortQuery, canary_and_control, cohort_stats
from fleet.rollout.gate import GateStatus, GateVerdict, InstallCounts, evaluate_gates
from fleet.rollout.spec import GateConfig
from fleet.rollout.warmup import LoadSpan, load_spans, restart_spans, warm_windows
from protocol.sketch import FeatureSketch

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OLD, NEW, OTHER = "0" * 64, "1" * 64, "2" * 64
CANARY, CONTROL = ("can-0", "can-1"), ("ctl-0", "ctl-1")
WARMUP_S = 5.0


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def window(
    device: str,
    start_s: float,
    end_s: float,
    bundle: str,
    latencies_ms: Sequence[float],
    *,
    seq: int = 0,
    dropped: int = 0,
) -> TelemetryRecord:
    """One stored window as ingest writes it (the raw window JSON holds the sketch)."""
    raw: dict[str, object] = {"dropped_windows": dropped}
    if latencies_ms:
        raw["latency_ms"] = FeatureSketch.of(list(latencies_ms)).to_wire().model_dump(mode="json")
    return TelemetryRecord(
        device_id=device,
        stream_id="s",
        seq=seq,
        window_start=at(start_s),
        window_end=at(end_s),
        bundle_sha256=bundle,
        inference_count=len(latencies_ms),
        latency_count=len(latencies_ms),
        window=raw,
    )


def canary_story(warm_ms: float) -> tuple[list[TelemetryRecord], list[tuple[str, str, datetime]]]:
    """Each canary switches at 2 s and commits at 3 s (after its health check); its switch
    window holds 50 cold-start inferences at 120 ms, later windows 50 at ``warm_ms``."""
    rows, events = [], []
    for d in CANARY:
        rows.append(window(d, -10, 2, OLD, [10.0] * 50, seq=1))
        rows.append(window(d, 2, 10, NEW, [120.0] * 50, seq=2))
        for i, start in enumerate((10, 20, 30)):
            rows.append(window(d, start, start + 10, NEW, [warm_ms] * 50, seq=3 + i))
        events += [(d, "switched", at(2)), (d, "health_check", at(2)), (d, "committed", at(3))]
    return rows, events


def control_story(*, restart: bool = False) -> list[TelemetryRecord]:
    """Control devices on the old bundle at 10 ms; with ``restart`` the second one's agent
    restarts at 12-14 s and its first window after that holds cold inferences at 150 ms."""
    rows = []
    for d in CONTROL:
        for i, start in enumerate((-10, 0, 10, 20, 30)):
            if restart and d == CONTROL[1] and start == 10:
                rows.append(window(d, 10, 12, OLD, [10.0] * 10, seq=1 + i))
                rows.append(window(d, 14, 20, OLD, [150.0] * 50, seq=10))
                continue
            rows.append(window(d, start, start + 10, OLD, [10.0] * 50, seq=1 + i))
    return rows


def judge(canary_rows: list[TelemetryRecord], control_rows: list[TelemetryRecord]) -> GateVerdict:
    """What the gates say of the two cohorts' windows that overlap the bake (from 3 s)."""
    return evaluate_gates(
        GateConfig(min_inferences=100),
        install=InstallCounts(stage_devices=2, committed=2, failed=0),
        canary=cohort_stats(canary_rows),
        control=cohort_stats(control_rows),
    )


def latency_gate(verdict: GateVerdict) -> tuple[GateStatus, float | None]:
    """The latency gate's verdict and the canary's p95 (ms, to 0.1: sketches are approximate)."""
    result = next(r for r in verdict.results if r.name == "latency_p95_ratio")
    return result.status, None if result.canary is None else round(result.canary, 1)


def pure_cohorts(
    canary_rows: list[TelemetryRecord],
    events: list[tuple[str, str, datetime]],
    control_rows: list[TelemetryRecord],
) -> tuple[list[TelemetryRecord], list[TelemetryRecord]]:
    """Each cohort's warm windows on its bundle over the bake, as the runner picks them."""

    def pick(rows: list[TelemetryRecord], bundle: str) -> list[TelemetryRecord]:
        since = at(3)
        every = [r for r in rows if r.window_end >= since]
        first = {r.device_id: r for r in sorted(rows, key=lambda r: r.window_start)}
        before = {
            d: max(r.window_end for r in rows if r.device_id == d and r.window_end < since)
            for d in first
            if any(r.device_id == d and r.window_end < since for r in rows)
        }
        spans = load_spans(events) + restart_spans(every, before)
        wanted = [r for r in every if r.bundle_sha256 == bundle]
        return warm_windows(wanted, spans, WARMUP_S, since=since)

    return pick(canary_rows, NEW), pick(control_rows, OLD)


# -- pure: spans ------------------------------------------------------------------------------


def test_a_switch_is_a_span_from_switched_to_committed_and_a_rollback_a_point() -> None:
    events = [
        ("a", "received", at(0)),
        ("a", "switched", at(2)),
        ("a", "health_check", at(2)),
        ("a", "committed", at(3)),
        ("a", "committed", at(40)),  # the same deploy again: "bundle is already active"
        ("b", "committed", at(7)),  # one instant, listed out of order
        ("b", "switched", at(7)),
        ("c", "rolled_back", at(9)),
        ("d", "switched", at(4)),  # still in its health check
    ]
    spans = sorted(load_spans(events), key=lambda s: (s.device_id, s.end or at(999)))
    assert spans == [
        LoadSpan(device_id="a", start=at(2), end=at(3)),
        LoadSpan(device_id="a", start=at(40), end=at(40)),
        LoadSpan(device_id="b", start=at(7), end=at(7)),
        LoadSpan(device_id="c", start=at(9), end=at(9)),
        LoadSpan(device_id="d", start=at(4), end=None),
    ]


def test_a_span_covers_windows_until_the_warm_up_after_it_is_over() -> None:
    span = LoadSpan(device_id="a", start=at(2), end=at(3))
    assert not span.covers(at(-10), at(2), WARMUP_S)  # the old model's window, closed at 2 s
    assert span.covers(at(2), at(10), WARMUP_S)  # the switch window
    assert span.covers(at(7.9), at(18), WARMUP_S)  # began within the warm-up
    assert not span.covers(at(8), at(18), WARMUP_S)
    assert not span.covers(at(3.5), at(13), 0.0)  # no warm-up: only what overlaps the switch
    assert LoadSpan(device_id="a", start=at(2), end=None).covers(at(500), at(510), 0.0)


def test_a_gap_in_a_devices_windows_is_a_restart_unless_windows_were_dropped() -> None:
    rows = [
        window("a", 0, 10, OLD, [10.0]),
        window("a", 13, 20, OLD, []),  # restarted; model not loaded before 20 s
        window("a", 20, 30, OLD, [150.0]),
        window("a", 30, 40, OLD, [10.0]),
        window("b", 0, 10, OLD, [10.0]),
        window("b", 30, 40, OLD, [10.0], dropped=2),  # the agent's outbox dropped two
        window("c", 12, 20, OLD, [150.0]),  # the window before it ended at 10 s
        window("e", 0, 10, OLD, [10.0]),
        window("e", 25, 30, OLD, []),  # restarted, nothing served yet
    ]
    spans = sorted(restart_spans(rows, {"c": at(10)}), key=lambda s: s.device_id)
    assert spans == [
        LoadSpan(device_id="a", start=at(13), end=at(20)),
        LoadSpan(device_id="c", start=at(12), end=at(12)),
        LoadSpan(device_id="e", start=at(25), end=None),
    ]
    warm = warm_windows(rows, spans, WARMUP_S)
    assert [(r.device_id, r.window_start) for r in warm] == [
        ("a", at(0)), ("a", at(30)), ("b", at(0)), ("b", at(30)), ("e", at(0)),
    ]  # fmt: skip


def test_both_cohorts_skip_the_first_seconds_of_the_bake() -> None:
    rows = [window("a", s, s + 3, OLD, [10.0]) for s in (0, 3, 6, 9)]
    # the bake began at 1 s: only windows from 6 s on cover time the canary's do too
    warm = warm_windows(rows, [], WARMUP_S, since=at(1))
    assert [r.window_start for r in warm] == [at(6), at(9)]
    assert warm_windows(rows, [], WARMUP_S) == rows


# -- pure: the gates on warm windows ---------------------------------------------------------------


def test_a_canary_slow_only_in_its_switch_window_passes_the_latency_gate() -> None:
    canary, events = canary_story(warm_ms=10.0)
    warm_canary, warm_control = pure_cohorts(canary, events, control_story())
    verdict = judge(warm_canary, warm_control)
    assert latency_gate(verdict) == (GateStatus.PASS, 10.0)
    assert verdict.passed, verdict
    # what the gate read before: the switch window made an identical model look 12x slower
    bake = [r for r in canary if r.bundle_sha256 == NEW]
    assert latency_gate(judge(bake, control_story()))[0] is GateStatus.FAIL


def test_a_canary_really_slower_after_it_warmed_up_fails_the_latency_gate() -> None:
    canary, events = canary_story(warm_ms=20.0)
    verdict = judge(*pure_cohorts(canary, events, control_story()))
    assert latency_gate(verdict) == (GateStatus.FAIL, 20.0)
    assert not verdict.passed


def test_a_control_restart_does_not_hide_a_slower_canary() -> None:
    canary, events = canary_story(warm_ms=20.0)
    control = control_story(restart=True)
    warm_canary, warm_control = pure_cohorts(canary, events, control)
    assert all(r.window_start != at(14) for r in warm_control)
    assert latency_gate(judge(warm_canary, warm_control))[0] is GateStatus.FAIL


# -- the same through canary_and_control on a database -------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_db(eng)
    yield eng
    eng.dispose()


def store(
    engine: Engine, rows: list[TelemetryRecord], events: list[tuple[str, str, datetime]]
) -> None:
    with Session(engine) as session:
        for d in sorted({r.device_id for r in rows}):
            session.add(Device(id=d, profile="x86-cpu"))
        session.flush()
        for r in rows:
            session.add(r)
        for i, (d, state, sent_at) in enumerate(events):
            session.add(
                DeviceEvent(
                    device_id=d, message_id=f"m{i}", state=state, sent_at=sent_at,
                    at=sent_at + timedelta(milliseconds=300),
                )
            )  # fmt: skip
        session.commit()


def stored_verdict(engine: Engine, **query: object) -> tuple[GateVerdict, int]:
    """The gates on what `canary_and_control` reads for a bake from 3 s to 41 s."""
    with Session(engine) as session:
        canary, control, _ = canary_and_control(
            session,
            CohortQuery(
                bundle_sha256=NEW,
                canary_device_ids=CANARY,
                control_device_ids=CONTROL,
                since=at(3),
                until=at(41),
                **query,  # type: ignore[arg-type]
            ),
        )
    verdict = evaluate_gates(
        GateConfig(min_inferences=100),
        install=InstallCounts(stage_devices=2, committed=2, failed=0),
        canary=canary,
        control=control,
    )
    return verdict, canary.cold_windows


def test_stored_switch_window_cold_starts_do_not_fail_the_gate(engine: Engine) -> None:
    canary, events = canary_story(warm_ms=10.0)
    store(engine, canary + control_story(), events)
    verdict, cold = stored_verdict(engine)
    assert latency_gate(verdict) == (GateStatus.PASS, 10.0)
    assert verdict.passed, verdict
    assert cold == len(CANARY)  # each canary's switch window


def test_stored_slower_canary_fails_the_gate(engine: Engine) -> None:
    canary, events = canary_story(warm_ms=20.0)
    store(engine, canary + control_story(restart=True), events)
    verdict, _ = stored_verdict(engine)
    assert latency_gate(verdict) == (GateStatus.FAIL, 20.0)


def test_stored_control_counts_only_the_bundle_it_ran_when_chosen(engine: Engine) -> None:
    canary, events = canary_story(warm_ms=20.0)
    # the second control device runs another bundle (not this rollout's doing), slowly
    control = [
        window(d, s, s + 10, bundle, [ms] * 50, seq=i)
        for d, bundle, ms in ((CONTROL[0], OLD, 10.0), (CONTROL[1], OTHER, 200.0))
        for i, s in enumerate(range(-10, 40, 10))
    ]
    store(engine, canary + control, events)
    verdict, _ = stored_verdict(engine, control_bundles={d: OLD for d in CONTROL})
    assert latency_gate(verdict)[0] is GateStatus.FAIL
    # without knowing each control device's old bundle, any other bundle is the control
    assert latency_gate(stored_verdict(engine)[0])[0] is GateStatus.PASS
