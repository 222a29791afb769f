"""The pure rollout core: state machine transitions, device choice, gates. No I/O."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.rollout.gate import (
    CohortStats,
    ExternalReading,
    GateStatus,
    InstallCounts,
    evaluate_gates,
)
from fleet.rollout.machine import (
    DeviceEntry,
    DevicePhase,
    DeviceReport,
    DeviceSeen,
    OperatorRequest,
    RecordDecision,
    RolloutPhase,
    RolloutState,
    SendDeploy,
    SendRollback,
    StageMetrics,
    command_id_for,
    step,
    wants_metrics,
)
from fleet.rollout.selection import Candidate, assign_stages
from fleet.rollout.spec import GateConfig, RolloutCreate, StageSpec

T0 = datetime(2026, 3, 1, tzinfo=UTC)
NEW, OLD = "a" * 64, "b" * 64
QUIET = GateConfig(min_inferences=0)


def plan(*percents: float, bake_s: float = 60, **kw: Any) -> RolloutCreate:
    return RolloutCreate(
        bundle_sha256=NEW,
        stages=tuple(StageSpec(percent=p, bake_s=bake_s) for p in percents),
        gates=kw.pop("gates", QUIET),
        command_timeout_s=kw.pop("command_timeout_s", 60),
        **kw,
    )


def state_for(p: RolloutCreate, n: int = 10) -> RolloutState:
    cands = [Candidate(device_id=f"d{i}") for i in range(n)]
    entries = {
        d: DeviceEntry(device_id=d, stage=s, position=i, previous_sha256=OLD, online=True)
        for i, (d, s) in enumerate(assign_stages(cands, p.stages, seed=1))
    }
    return RolloutState(rollout_id="r1", bundle_sha256=NEW, plan=p, devices=entries)


def sends(actions: Any, kind: type = SendDeploy) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def commit_all(s: RolloutState, kind: str = "deploy", state: str = "committed") -> list[Any]:
    pending = {DevicePhase.SENT} if kind == "deploy" else {DevicePhase.ROLLBACK_SENT}
    return [
        DeviceReport(device_id=d.device_id, command_id=d.command_id or "", kind=kind, state=state)  # type: ignore[arg-type]
        for d in s.devices.values()
        if d.phase in pending
    ]


def good_metrics(stage: int) -> StageMetrics:
    c = CohortStats(devices=3, inferences=1000, errors=1, latency_p95_ms=10.0)
    return StageMetrics(stage=stage, canary=c, control=c)


def run_to_bake_end(s: RolloutState, now: datetime) -> tuple[RolloutState, datetime]:
    s = step(s, commit_all(s), now).state
    assert s.phase is RolloutPhase.BAKING
    now += timedelta(seconds=s.plan.stages[s.stage].bake_s)
    return s, now


def test_pending_starts_first_stage_with_deterministic_command_ids() -> None:
    s = state_for(plan(10, 100))
    t = step(s, [], T0)
    deploys = sends(t.actions)
    assert t.state.phase is RolloutPhase.DEPLOYING and t.state.stage == 0
    assert len(deploys) == 1
    d = deploys[0]
    assert d.command_id == command_id_for("r1", "deploy", 0, d.device_id, 1)
    assert set(t.changed) == {d.device_id}
    # the same step from the same state gives the same actions (replay after a crash)
    assert step(s, [], T0).actions == t.actions


def test_happy_path_through_every_stage() -> None:
    s, now = state_for(plan(10, 50, 100)), T0
    s = step(s, [], now).state
    decisions = []
    for stage in range(3):
        s, now = run_to_bake_end(s, now)
        assert wants_metrics(s, now) and not wants_metrics(s, now - timedelta(seconds=1))
        # without metrics the machine waits
        assert step(s, [], now).state == s
        t = step(s, [good_metrics(stage)], now)
        decisions += [a.outcome for a in t.actions if isinstance(a, RecordDecision)]
        s = t.state
    assert s.phase is RolloutPhase.COMPLETED
    assert decisions == ["advance", "advance", "advance", "complete"]
    assert Counter(d.phase for d in s.devices.values()) == {DevicePhase.COMMITTED: 10}


def test_failed_gate_rolls_back_committed_and_in_flight_devices() -> None:
    s, now = (
        state_for(plan(30, 100, gates=GateConfig(min_inferences=0, max_error_rate_increase=0.01))),
        T0,
    )
    s = step(s, [], now).state
    stage0 = [d for d in s.devices.values() if d.stage == 0]
    s, now = run_to_bake_end(s, now)
    bad = StageMetrics(
        stage=0,
        canary=CohortStats(devices=3, inferences=1000, errors=100),
        control=CohortStats(devices=7, inferences=1000, errors=1),
    )
    t = step(s, [bad], now)
    assert t.state.phase is RolloutPhase.ROLLING_BACK
    rb = sends(t.actions, SendRollback)
    assert sorted(a.device_id for a in rb) == sorted(d.device_id for d in stage0)
    assert {a.target_sha256 for a in rb} == {OLD}
    decision = next(a for a in t.actions if isinstance(a, RecordDecision))
    assert decision.outcome == "rollback" and "error_rate" in decision.reason
    # followed until each reports (status or heartbeat)
    s = t.state
    first, *rest = rb
    s = step(s, [DeviceReport(device_id=first.device_id, command_id=first.command_id,
                              kind="rollback", state="rolled_back")], now).state  # fmt: skip
    assert s.phase is RolloutPhase.ROLLING_BACK
    s = step(
        s, [DeviceSeen(device_id=a.device_id, online=True, reported_sha256=OLD) for a in rest], now
    ).state
    assert s.phase is RolloutPhase.ROLLED_BACK


def test_less_accurate_canary_is_rolled_back_by_the_quality_gate() -> None:
    from fleet.rollout.gate import QualityReading

    s, now = state_for(plan(30, 100, gates=GateConfig(min_inferences=0))), T0
    s = step(s, [], now).state
    s, now = run_to_bake_end(s, now)
    c = CohortStats(devices=3, inferences=1000, errors=1, latency_p95_ms=10.0)
    worse = QualityReading(
        canary_labels=400, canary_accuracy=0.68, control_labels=400, control_accuracy=0.98
    )
    t = step(s, [StageMetrics(stage=0, canary=c, control=c, quality=worse)], now)
    decision = next(a for a in t.actions if isinstance(a, RecordDecision))
    assert decision.outcome == "rollback" and "accuracy_drop" in decision.reason
    assert t.state.phase is RolloutPhase.ROLLING_BACK
    # within the margin, the same stage advances
    same = QualityReading(
        canary_labels=400, canary_accuracy=0.97, control_labels=400, control_accuracy=0.98
    )
    t = step(s, [StageMetrics(stage=0, canary=c, control=c, quality=same)], now)
    assert next(a for a in t.actions if isinstance(a, RecordDecision)).outcome == "advance"


def test_gate_pause_then_approve_advances() -> None:
    gates = GateConfig(min_inferences=0, max_latency_p95_ratio=1.1, on_fail="pause")
    s, now = state_for(plan(50, 100, gates=gates)), T0
    s = step(s, [], now).state
    s, now = run_to_bake_end(s, now)
    slow = StageMetrics(
        stage=0,
        canary=CohortStats(devices=5, inferences=100, latency_p95_ms=30.0),
        control=CohortStats(devices=5, inferences=100, latency_p95_ms=10.0),
    )
    s = step(s, [slow], now).state
    assert s.phase is RolloutPhase.PAUSED and s.pause_kind == "gate"
    assert step(s, [], now + timedelta(hours=5)).state.phase is RolloutPhase.PAUSED
    t = step(s, [OperatorRequest(request_id="q", action="approve", actor="ann")], now)
    assert t.state.phase is RolloutPhase.DEPLOYING and t.state.stage == 1
    assert len(sends(t.actions)) == 5


def test_too_little_data_waits_then_pauses() -> None:
    p = plan(50, 100, gates=GateConfig(min_inferences=500), sample_timeout_s=100)
    s, now = state_for(p), T0
    s = step(s, [], now).state
    s, now = run_to_bake_end(s, now)
    thin = StageMetrics(
        stage=0, canary=CohortStats(devices=5, inferences=10), control=CohortStats()
    )
    assert step(s, [thin], now).state.phase is RolloutPhase.BAKING
    t = step(s, [thin], now + timedelta(seconds=100))
    assert t.state.phase is RolloutPhase.PAUSED and t.state.pause_kind == "sample"


def test_last_stage_uses_the_last_control_with_data() -> None:
    gates = GateConfig(min_inferences=0, max_latency_p95_ratio=1.2)
    s, now = state_for(plan(50, 100, gates=gates)), T0
    s = step(s, [], now).state
    s, now = run_to_bake_end(s, now)
    ok = CohortStats(devices=5, inferences=9, latency_p95_ms=10)
    s = step(s, [StageMetrics(stage=0, canary=ok, control=ok)], now).state
    s, now = run_to_bake_end(s, now)
    slow = StageMetrics(
        stage=1,
        canary=CohortStats(devices=10, inferences=9, latency_p95_ms=50),
        control=CohortStats(),
    )
    t = step(s, [slow], now)
    assert t.state.phase is RolloutPhase.ROLLING_BACK
    figures = next(a for a in t.actions if isinstance(a, RecordDecision)).figures
    assert figures["control_source"] == "last control cohort with data"


def test_timeout_retries_online_waits_for_offline_and_gives_up() -> None:
    gates = GateConfig(min_inferences=0, max_install_failure_rate=None)
    p = plan(100, command_timeout_s=10, max_retries=1, stage_timeout_s=100, gates=gates)
    s = step(state_for(p, n=2), [], T0).state
    s = step(s, [DeviceSeen(device_id="d1", online=False, reported_sha256=OLD)], T0).state
    t = step(s, [], T0 + timedelta(seconds=10))
    assert [a.device_id for a in sends(t.actions)] == ["d0"]
    assert t.state.devices["d0"].attempt == 2
    assert t.state.devices["d1"].phase is DevicePhase.OFFLINE
    t2 = step(t.state, [], T0 + timedelta(seconds=20))
    assert t2.state.devices["d0"].phase is DevicePhase.FAILED and not sends(t2.actions)
    back = step(
        t2.state,
        [DeviceSeen(device_id="d1", online=True, reported_sha256=OLD)],
        T0 + timedelta(seconds=30),
    )
    assert [a.attempt for a in sends(back.actions)] == [2]
    # offline again past the stage deadline: unreachable, and the stage settles
    s = step(
        back.state,
        [DeviceSeen(device_id="d1", online=False, reported_sha256=OLD)],
        T0 + timedelta(seconds=41),
    ).state
    s = step(s, [], T0 + timedelta(seconds=101)).state
    assert s.devices["d1"].phase is DevicePhase.UNREACHABLE


def test_install_failures_fail_fast_and_skip_devices_that_said_no() -> None:
    s = step(state_for(plan(100, gates=GateConfig(max_install_failure_rate=0.1))), [], T0).state
    failed = [
        DeviceReport(device_id=f"d{i}", command_id="x", kind="deploy", state="reverted")
        for i in (0, 1)
    ]
    t = step(s, failed, T0)
    assert t.state.phase is RolloutPhase.ROLLING_BACK
    assert sorted(a.device_id for a in sends(t.actions, SendRollback)) == [
        f"d{i}" for i in range(2, 10)
    ]


@pytest.mark.parametrize(
    "phase_action",
    [("approve", "ignored"), ("pause", "pause"), ("abort", "rollback"), ("rollback", "rollback")],
)
def test_operator_actions_while_deploying(phase_action: tuple[str, str]) -> None:
    action, outcome = phase_action
    s = step(state_for(plan(50, 100)), [], T0).state
    t = step(s, [OperatorRequest(request_id="q", action=action)], T0)  # type: ignore[arg-type]
    assert [a.outcome for a in t.actions if isinstance(a, RecordDecision)] == [outcome]


def test_abort_keep_devices_and_rollback_after_completion() -> None:
    s = step(state_for(plan(100)), [], T0).state
    t = step(s, [OperatorRequest(request_id="q", action="abort", keep_devices=True)], T0)
    assert t.state.phase is RolloutPhase.ABORTED and not sends(t.actions, SendRollback)
    s, now = run_to_bake_end(s, T0)
    s = step(s, [good_metrics(0)], now).state
    assert s.phase is RolloutPhase.COMPLETED
    t = step(s, [OperatorRequest(request_id="q", action="rollback")], now)
    assert t.state.phase is RolloutPhase.ROLLING_BACK and len(sends(t.actions, SendRollback)) == 10


def test_operator_pause_and_resume_where_it_was() -> None:
    s = step(state_for(plan(50, 100)), [], T0).state
    s = step(s, [OperatorRequest(request_id="q", action="pause")], T0).state
    assert s.phase is RolloutPhase.PAUSED and s.pause_kind == "operator:deploying"
    s = step(s, commit_all(s), T0).state  # reports still count while paused
    s = step(s, [OperatorRequest(request_id="r", action="approve")], T0).state
    assert s.phase is RolloutPhase.BAKING and s.stage == 0


def test_late_and_foreign_reports_are_harmless() -> None:
    s = step(state_for(plan(100)), [], T0).state
    dup = commit_all(s)
    s1 = step(s, dup, T0).state
    assert step(s1, dup, T0).state == s1  # the same reports again change nothing
    assert (
        step(
            s1, [DeviceReport(device_id="zz", command_id="c", kind="deploy", state="committed")], T0
        ).state
        == s1
    )


# -- properties -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    answers=st.lists(
        st.tuples(st.integers(0, 9), st.sampled_from(["committed", "failed", "none", "offline"])),
        max_size=40,
    ),
    ticks=st.lists(st.integers(0, 400), min_size=1, max_size=25),
)
def test_each_attempt_is_one_command_and_the_machine_ends_somewhere_sane(
    answers: list[tuple[int, str]], ticks: list[int]
) -> None:
    p = plan(20, 60, 100, bake_s=30, command_timeout_s=50, max_retries=2, stage_timeout_s=300,
             gates=GateConfig(min_inferences=0, max_install_failure_rate=0.5))  # fmt: skip
    s, now = state_for(p), T0
    seen: set[str] = set()
    for i, dt in enumerate(ticks):
        now += timedelta(seconds=dt)
        events: list[Any] = []
        for dev, what in answers[i * 2 : i * 2 + 2]:
            e = s.devices[f"d{dev}"]
            if what == "offline":
                events.append(DeviceSeen(device_id=e.device_id, online=False, reported_sha256=OLD))
            elif what != "none" and e.command_id:
                events.append(
                    DeviceReport(
                        device_id=e.device_id, command_id=e.command_id, kind="deploy", state=what
                    )
                )
        if s.phase is RolloutPhase.BAKING and wants_metrics(s, now):
            events.append(good_metrics(s.stage))
        t = step(s, events, now)
        for a in t.actions:
            if isinstance(a, SendDeploy | SendRollback):
                assert a.command_id not in seen  # never the same command twice
                seen.add(a.command_id)
                assert a.command_id == command_id_for(
                    "r1",
                    "deploy" if isinstance(a, SendDeploy) else "rollback",
                    a.stage,
                    a.device_id,
                    a.attempt,
                )
        # a device never runs ahead of its stage
        for e in t.state.devices.values():
            if e.stage > max(t.state.stage, 0):
                assert e.phase is DevicePhase.PLANNED
            assert e.attempt <= 1 + p.max_retries + 10
        s = t.state


# -- selection --------------------------------------------------------------------------------


def test_assignment_is_seeded_cumulative_and_input_order_free() -> None:
    cands = [Candidate(device_id=f"d{i:03d}") for i in range(200)]
    stages = (
        StageSpec(percent=1),
        StageSpec(percent=10),
        StageSpec(percent=50),
        StageSpec(percent=100),
    )
    a = assign_stages(cands, stages, seed=9)
    assert a == assign_stages(list(reversed(cands)), stages, seed=9)
    assert a != assign_stages(cands, stages, seed=10)
    assert Counter(s for _, s in a) == {0: 2, 1: 18, 2: 80, 3: 100}


def test_explicit_canary_and_spread_by_tag() -> None:
    cands = [Candidate(device_id=f"a{i:02d}", tags=("eu",)) for i in range(80)] + [
        Candidate(device_id=f"b{i:02d}", tags=("us",)) for i in range(20)
    ]
    stages = (
        StageSpec(devices=("b07",)),
        StageSpec(tags=("lab",)),
        StageSpec(percent=10),
        StageSpec(percent=100),
    )
    a = assign_stages(cands, stages, seed=3, spread_by_tag=True)
    assert a[0] == ("b07", 0)
    first10 = [d for d, s in a if s in (0, 2)]
    assert len(first10) == 10
    assert Counter(d[0] for d in first10)["b"] in (2, 3)  # b07 came first, then 80/20
    plain = assign_stages(cands, (StageSpec(percent=10), StageSpec(percent=100)), seed=3,
                          spread_by_tag=True)  # fmt: skip
    assert Counter(d[0] for d, s in plain if s == 0) == {"a": 8, "b": 2}


# -- gates ------------------------------------------------------------------------------------


def test_gates_report_figures_and_missing_data_never_blocks() -> None:
    v = evaluate_gates(
        GateConfig(
            min_inferences=10, custom=({"name": "temp", "metric": "cpu_temp_c", "max_value": 80},)
        ),  # type: ignore[arg-type]
        install=InstallCounts(stage_devices=5, committed=5, failed=0),
        canary=CohortStats(devices=5, inferences=100, errors=0, custom={"cpu_temp_c": 85.0}),
        control=None,
        drift=ExternalReading(detail="not installed"),
    )
    by = {r.name: r for r in v.results}
    assert by["drift"].status is GateStatus.NOT_AVAILABLE
    assert by["latency_p95_ratio"].status is GateStatus.NOT_AVAILABLE
    assert by["battery_drain_ratio"].status is GateStatus.NOT_AVAILABLE
    assert by["custom:temp"].status is GateStatus.FAIL and by["custom:temp"].canary == 85.0
    assert [r.name for r in v.failed] == ["custom:temp"]


def test_battery_and_shadow_gates() -> None:
    v = evaluate_gates(
        GateConfig(min_inferences=0),
        install=InstallCounts(stage_devices=1, committed=1, failed=0),
        canary=CohortStats(devices=1, inferences=1, battery_drain_pct_per_h=5.0),
        control=CohortStats(devices=1, inferences=1, battery_drain_pct_per_h=2.0),
        shadow=ExternalReading(value=0.9, available=True),
        shadow_stage=True,
    )
    assert {r.name for r in v.failed} == {"battery_drain_ratio", "shadow_agreement"}


def test_spec_refuses_bad_stage_lists() -> None:
    with pytest.raises(ValueError, match="last stage"):
        RolloutCreate(bundle_sha256=NEW, stages=(StageSpec(percent=10), StageSpec(percent=90)))
    with pytest.raises(ValueError, match="must not decrease"):
        RolloutCreate(
            bundle_sha256=NEW,
            stages=(StageSpec(percent=50), StageSpec(percent=10), StageSpec(percent=100)),
        )
    with pytest.raises(ValueError, match="needs a percent"):
        StageSpec()


def test_entry_is_frozen() -> None:
    e = DeviceEntry(device_id="d", stage=0, position=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.phase = DevicePhase.SENT  # type: ignore[misc]
