"""Rollouts on a real database (SQLite and PostgreSQL): the runner, outbox, leases, gates.

The broker is a fake `CommandPublisher` (recording every publish); device answers go through
the real ingest (`fleet.ingest.handle`) as the MQTT worker would apply them; the clock is
driven by the test. Each test runs on SQLite and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.db import create_db, make_engine
from fleet.errors import BrokerUnavailable, Conflict, FleetError, InvalidRequest
from fleet.ingest import handle
from fleet.models import Device
from fleet.registry import BundleStore
from fleet.rollout.gate import ExternalReading
from fleet.rollout.runner import RolloutRunner
from fleet.rollout.service import create_rollout, request_action, rollback_devices
from fleet.rollout.spec import GateConfig, RolloutCreate, StageSpec, TargetSpec
from fleet.rollout.table import CommandOutbox, Rollout, RolloutDecision, RolloutDevice
from fleet.settings import FleetSettings
from protocol.messages import (
    DeployCommand,
    Heartbeat,
    InstallState,
    ReasonCode,
    RollbackCommand,
    StatusEvent,
    TelemetryWindow,
    encode_message,
)
from protocol.sketch import FeatureSketch
from protocol.topics import Channel, device_topic
from tests.unit.test_fleet_api import make_bundle, make_keys

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OLD = "0" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return str(request.getfixturevalue("pg_url"))


@dataclass
class Recorder:
    """The broker seam: records each publish; can be made to refuse."""

    sent: list[DeployCommand | RollbackCommand] = field(default_factory=list)
    down: bool = False

    def publish_command(self, command: DeployCommand | RollbackCommand) -> None:
        if self.down:
            raise BrokerUnavailable("test broker is down")
        self.sent.append(command)

    def ids(self, kind: str | None = None) -> list[str]:
        return [c.command_id for c in self.sent if kind is None or c.kind == kind]


@dataclass
class World:
    engine: Engine
    settings: FleetSettings
    trust: Any
    publisher: Recorder
    now: datetime
    bundle_sha: str = ""
    keys: Any = None
    tmp: Path = Path()

    def clock(self) -> datetime:
        return self.now

    def runner(self, **kw: Any) -> RolloutRunner:
        return RolloutRunner(
            self.engine,
            self.settings,
            kw.pop("publisher", self.publisher),
            clock=self.clock,
            drift_source=kw.pop(
                "drift_source", lambda s, q: ExternalReading(detail="no drift in this test")
            ),
            **kw,
        )

    def ingest(self, msg: Any, at: datetime | None = None) -> None:
        channel = {
            "status": Channel.STATUS,
            "heartbeat": Channel.HEARTBEAT,
            "telemetry": Channel.TELEMETRY,
        }[msg.kind]
        with Session(self.engine) as session:
            result = handle(
                device_topic(msg.device_id, channel),
                encode_message(msg),
                session,
                now=at or self.now,
            )
            assert result.reason is None, result
            session.commit()

    def heartbeat(self, device_id: str, active: str | None, tags: tuple[str, ...] = ()) -> None:
        self.ingest(
            Heartbeat(
                device_id=device_id, profile="x86-cpu", agent_version="t", uptime_s=1.0,
                active_bundle_sha256=active, tags=tags,
            )
        )  # fmt: skip

    def answer(
        self, command: DeployCommand | RollbackCommand, state: InstallState, **kw: Any
    ) -> None:
        active = kw.pop("active", None)
        if active is None and isinstance(command, DeployCommand):
            active = command.bundle_sha256 if state is InstallState.COMMITTED else OLD
        if isinstance(command, RollbackCommand):
            active = command.target_bundle_sha256
        self.ingest(
            StatusEvent(
                device_id=command.device_id,
                command_id=command.command_id,
                rollout_id=command.rollout_id,
                state=state,
                bundle_sha256=getattr(command, "bundle_sha256", None),
                active_bundle_sha256=active,
                # the simulated devices' clock is the test's (gates compare it with windows)
                sent_at=kw.pop("sent_at", self.now),
                **kw,
            )
        )

    def telemetry(self, device_id: str, bundle: str, seq: int, *, n: int = 100, errors: int = 0,
                  latency_ms: float = 5.0, window_s: float = 10.0) -> None:  # fmt: skip
        self.ingest(
            TelemetryWindow(
                device_id=device_id,
                seq=seq,
                stream_id="s",
                window_start=self.now - timedelta(seconds=window_s),
                window_end=self.now,
                bundle_sha256=bundle,
                model_name="digits",
                model_version=3,
                inference_count=n,
                error_counts={"runtime": errors} if errors else {},
                latency_ms=FeatureSketch.of([latency_ms] * 50).to_wire(),
            )
        )

    def create(self, **kw: Any) -> str:
        body = RolloutCreate(bundle_sha256=self.bundle_sha, **kw)
        with Session(self.engine) as session:
            rollout = create_rollout(session, self.settings, self.trust, body, now=self.now)
            session.commit()
            return rollout.id

    def rollout(self, rid: str) -> Rollout:
        with Session(self.engine) as session:
            row = session.get(Rollout, rid)
            assert row is not None
            return row

    def devices(self, rid: str) -> dict[str, RolloutDevice]:
        with Session(self.engine) as session:
            rows = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rid))
            return {r.device_id: r for r in rows}

    def decisions(self, rid: str) -> list[RolloutDecision]:
        with Session(self.engine) as session:
            return list(
                session.exec(
                    select(RolloutDecision)
                    .where(RolloutDecision.rollout_id == rid)
                    .order_by(col(RolloutDecision.id))
                )
            )

    def request(self, rid: str, action: str, **kw: Any) -> None:
        with Session(self.engine) as session:
            request_action(session, rid, action, **kw)  # type: ignore[arg-type]
            session.commit()


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[World]:
    keys = make_keys(tmp_path)
    settings = FleetSettings(
        database_url=db_url,
        trust_root=keys.trust_path,
        bundle_dir=tmp_path / "bundles",
        offline_after_s=20,
        reconcile_interval_s=0,
    )
    engine = make_engine(settings.database_url)
    create_db(engine)
    store = BundleStore(bundle_dir=settings.bundle_dir, trust=keys.trust, max_upload_bytes=1 << 26)
    store.prepare()
    src = make_bundle(tmp_path / "b.efb", keys.release)
    tmp = store.new_upload_path()
    shutil.copy(src, tmp)
    with Session(engine) as session:
        bundle, _ = store.add(session, tmp)
        sha = bundle.sha256
    w = World(
        engine=engine, settings=settings, trust=keys.trust, publisher=Recorder(), now=T0,
        bundle_sha=sha, keys=keys, tmp=tmp_path,
    )  # fmt: skip
    yield w
    engine.dispose()


def fleet_of(w: World, n: int, *, tags: tuple[str, ...] = ()) -> list[str]:
    ids = [f"dev-{i:03d}" for i in range(n)]
    for i in ids:
        w.heartbeat(i, OLD, tags)
    return ids


def answer_all(w: World, state: InstallState = InstallState.COMMITTED, kind: str = "deploy",
               skip: set[str] = frozenset()) -> int:  # fmt: skip
    """Answer every command published since the last call (once each)."""
    done = getattr(w, "_answered", set())
    n = 0
    for c in list(w.publisher.sent):
        if c.command_id in done or c.kind != kind or c.device_id in skip:
            continue
        done.add(c.command_id)
        w.answer(c, state)
        n += 1
    w._answered = done  # type: ignore[attr-defined]
    return n


def no_gates() -> GateConfig:
    return GateConfig(min_inferences=0, max_latency_p95_ratio=None, max_error_rate_increase=None,
                      max_battery_drain_ratio=None)  # fmt: skip


# -- tests ------------------------------------------------------------------------------------


def test_staged_rollout_completes_each_command_once(world: World) -> None:
    w = world
    fleet_of(w, 20)
    rid = w.create(
        stages=(StageSpec(percent=10, bake_s=60), StageSpec(percent=50, bake_s=60),
                StageSpec(percent=100, bake_s=60)),
        gates=no_gates(), seed=7,
    )  # fmt: skip
    r = w.runner()
    r.tick()
    assert w.rollout(rid).phase == "deploying"
    assert len(w.publisher.ids("deploy")) == 2  # 10 % of 20
    r.tick()  # nothing new
    assert len(w.publisher.ids("deploy")) == 2
    answer_all(w)
    r.tick()
    assert w.rollout(rid).phase == "baking"
    w.now += timedelta(seconds=61)
    r.tick()
    assert w.rollout(rid).stage == 1
    assert len(w.publisher.ids("deploy")) == 10
    answer_all(w)
    r.tick()
    w.now += timedelta(seconds=61)
    r.tick()
    answer_all(w)
    r.tick()
    w.now += timedelta(seconds=61)
    r.tick()
    row = w.rollout(rid)
    assert row.phase == "completed", row.reason
    ids = w.publisher.ids("deploy")
    assert len(ids) == len(set(ids)) == 20
    assert {d.phase for d in w.devices(rid).values()} == {"committed"}
    outcomes = [d.outcome for d in w.decisions(rid)]
    assert outcomes == ["created", "advance", "advance", "advance", "complete"]
    with Session(w.engine) as session:
        desired = {d.desired_bundle_sha256 for d in session.exec(select(Device))}
    assert desired == {w.bundle_sha}


def test_failing_gate_rolls_back_every_device_that_took_it(world: World) -> None:
    w = world
    devs = fleet_of(w, 10)
    rid = w.create(
        stages=(StageSpec(percent=30, bake_s=60), StageSpec(percent=100)),
        gates=GateConfig(min_inferences=100, max_latency_p95_ratio=1.5), seed=1,
    )  # fmt: skip
    r = w.runner()
    r.tick()
    canary = [c.device_id for c in w.publisher.sent]
    assert len(canary) == 3
    answer_all(w)
    r.tick()
    # canary is twice as slow as the control cohort still on the old bundle, well after its
    # commit (the gates skip what a device reports while its new model warms up)
    w.now += timedelta(seconds=30)
    for d in devs:
        if d in canary:
            w.telemetry(d, w.bundle_sha, seq=1, latency_ms=20.0)
        else:
            w.telemetry(d, OLD, seq=1, latency_ms=10.0)
    w.now += timedelta(seconds=31)
    r.tick()
    row = w.rollout(rid)
    assert row.phase == "rolling_back", row.reason
    assert "latency_p95_ratio" in row.reason
    rollbacks = [c for c in w.publisher.sent if c.kind == "rollback"]
    assert sorted(c.device_id for c in rollbacks) == sorted(canary)
    assert {c.target_bundle_sha256 for c in rollbacks} == {OLD}
    decision = next(d for d in w.decisions(rid) if d.outcome == "rollback")
    gates = {g["name"]: g for g in decision.figures["gates"]}
    assert gates["latency_p95_ratio"]["status"] == "fail"
    assert gates["latency_p95_ratio"]["canary"] == pytest.approx(20.0, rel=0.05)
    assert gates["drift"]["status"] == "not_available"
    # two report ROLLED_BACK; the third only shows it in its heartbeat
    for c in rollbacks[:2]:
        w.answer(c, InstallState.ROLLED_BACK)
    r.tick()
    assert w.rollout(rid).phase == "rolling_back"
    w.heartbeat(rollbacks[2].device_id, OLD)
    r.tick()
    assert w.rollout(rid).phase == "rolled_back"
    phases = Counter(d.phase for d in w.devices(rid).values())
    assert phases == {"rolled_back": 3, "planned": 7}


def test_switch_window_cold_starts_do_not_fail_the_latency_gate(world: World) -> None:
    w = world
    devs = fleet_of(w, 10)
    rid = w.create(
        stages=(StageSpec(percent=30, bake_s=60), StageSpec(percent=100, bake_s=60)),
        gates=GateConfig(min_inferences=100, max_drift_score=None), seed=1,
    )  # fmt: skip
    r = w.runner()
    r.tick()
    canary = [c.device_id for c in w.publisher.sent]
    w.now += timedelta(seconds=1)
    for c in w.publisher.sent:
        w.answer(c, InstallState.SWITCHED)
    w.now += timedelta(seconds=3)
    # each canary's switch window holds its cold, 10x slower inferences (health check)
    for d in canary:
        w.telemetry(d, w.bundle_sha, seq=1, latency_ms=100.0, window_s=3)
    answer_all(w)  # committed at T0+4 (device clock)
    r.tick()
    assert w.rollout(rid).phase == "baking"
    for seq in (2, 3, 4):
        w.now += timedelta(seconds=10)
        for d in devs:
            w.telemetry(d, w.bundle_sha if d in canary else OLD, seq=seq, latency_ms=10.0)
    w.now += timedelta(seconds=31)
    r.tick()
    row = w.rollout(rid)
    assert row.phase == "deploying" and row.stage == 1, row.reason
    decision = next(d for d in w.decisions(rid) if d.outcome == "advance")
    gates = {g["name"]: g for g in decision.figures["gates"]}
    assert gates["latency_p95_ratio"]["status"] == "pass"
    assert gates["latency_p95_ratio"]["canary"] == pytest.approx(10.0, rel=0.05)
    # the window [T0+4, T0+14] began before commit + warm-up (5 s): cold, left out too
    assert decision.figures["canary"]["cold_windows"] == 2 * len(canary)
    assert decision.figures["canary"]["inferences"] == 200 * len(canary)


def test_install_failures_roll_back_before_the_stage_settles(world: World) -> None:
    w = world
    fleet_of(w, 20)
    rid = w.create(
        stages=(StageSpec(percent=50, bake_s=60), StageSpec(percent=100)),
        gates=GateConfig(max_install_failure_rate=0.1), seed=3,
    )  # fmt: skip
    r = w.runner()
    r.tick()
    sent = list(w.publisher.sent)
    assert len(sent) == 10
    w.answer(sent[0], InstallState.FAILED, reason=ReasonCode.DOWNLOAD_FAILED)
    r.tick()
    assert w.rollout(rid).phase == "deploying"  # 1 of 10 is not > 10 %
    w.answer(sent[1], InstallState.REVERTED, reason=ReasonCode.HEALTH_FAILED)
    r.tick()
    row = w.rollout(rid)
    assert row.phase == "rolling_back" and "installs failed" in row.reason
    # the two that reported failure still run the old bundle: no rollback for them
    targets = {c.device_id for c in w.publisher.sent if c.kind == "rollback"}
    assert targets == {c.device_id for c in sent[2:]}


def test_timeouts_retry_online_devices_and_wait_for_offline_ones(world: World) -> None:
    w = world
    devs = fleet_of(w, 3)
    rid = w.create(
        stages=(StageSpec(percent=100, bake_s=0),), seed=1,
        gates=no_gates().model_copy(update={"max_install_failure_rate": 0.5}),
        command_timeout_s=30, max_retries=1, stage_timeout_s=600,
    )  # fmt: skip
    r = w.runner()
    r.tick()
    assert len(w.publisher.sent) == 3
    # dev-000 answers; dev-001 stays online and silent; dev-002 goes offline
    first = {c.device_id: c for c in w.publisher.sent}
    w.answer(first[devs[0]], InstallState.COMMITTED)
    w.now += timedelta(seconds=31)
    w.heartbeat(devs[1], OLD)
    r.tick()
    rd = w.devices(rid)
    assert rd[devs[1]].phase == "sent" and rd[devs[1]].attempt == 2  # retried
    assert rd[devs[2]].phase == "offline" and rd[devs[2]].attempt == 1  # waits, not failed
    w.now += timedelta(seconds=31)
    w.heartbeat(devs[1], OLD)
    r.tick()
    rd = w.devices(rid)
    assert rd[devs[1]].phase == "failed" and "no answer" in rd[devs[1]].reason
    assert rd[devs[2]].phase == "offline"
    # dev-002 comes back: sent again, answers, the stage settles
    w.heartbeat(devs[2], OLD)
    r.tick()
    retry = [c for c in w.publisher.sent if c.device_id == devs[2]]
    assert len(retry) == 2 and retry[0].command_id != retry[1].command_id
    w.answer(retry[1], InstallState.COMMITTED)
    r.tick()
    r.tick()
    row = w.rollout(rid)
    assert row.phase == "completed", row.reason  # 1 failed of 3 is within the 50 % allowed
    per_device = Counter(c.device_id for c in w.publisher.sent if c.kind == "deploy")
    assert per_device == {devs[0]: 1, devs[1]: 2, devs[2]: 2}


def test_operator_pause_approve_abort(world: World) -> None:
    w = world
    fleet_of(w, 4)
    rid = w.create(
        stages=(StageSpec(percent=50, bake_s=0, require_approval=True), StageSpec(percent=100)),
        gates=no_gates(), seed=2,
    )  # fmt: skip
    r = w.runner()
    r.tick()
    answer_all(w)
    r.tick()
    r.tick()
    row = w.rollout(rid)
    assert row.phase == "paused" and row.pause_kind == "approval"
    with pytest.raises(Conflict):
        w.request(rid, "pause")
    w.request(rid, "approve", actor="alice", reason="looks good")
    r.tick()
    assert w.rollout(rid).stage == 1
    assert len(w.publisher.ids("deploy")) == 4
    w.request(rid, "abort", actor="bob")
    r.tick()
    row = w.rollout(rid)
    assert row.phase == "rolling_back" and "aborted by bob" in row.reason
    answer_all(w, InstallState.ROLLED_BACK, kind="rollback")
    r.tick()
    assert w.rollout(rid).phase == "aborted"
    with pytest.raises(Conflict):
        w.request(rid, "approve")
    approve = [d for d in w.decisions(rid) if d.outcome == "approve"]
    assert "alice" in approve[0].reason


def test_bad_requests_are_refused_and_nothing_is_stored(world: World) -> None:
    w = world
    fleet_of(w, 3)
    with pytest.raises(InvalidRequest, match="not in the registry"), Session(w.engine) as s:
        create_rollout(s, w.settings, w.trust, RolloutCreate(bundle_sha256="f" * 64))
    with pytest.raises(InvalidRequest, match="target set is empty"):
        w.create(target=TargetSpec(tags=("nope",)))
    with pytest.raises(Conflict, match="profile"):
        w.create(target=TargetSpec(profile="jetson-orin"))
    with pytest.raises(ValueError, match="last stage"):
        RolloutCreate(bundle_sha256=w.bundle_sha, stages=(StageSpec(percent=50),))
    # a trust root that no longer lists the release key rejects the stored bundle
    (w.tmp / "other").mkdir()
    other = make_keys(w.tmp / "other")
    with (
        pytest.raises(FleetError, match="no longer verifies") as refused,
        Session(w.engine) as s,
    ):
        create_rollout(s, w.settings, other.trust, RolloutCreate(bundle_sha256=w.bundle_sha))
    assert refused.value.status_code == 422
    first = w.create(target=TargetSpec(device_ids=("dev-000", "dev-001")))
    with pytest.raises(Conflict, match="already in an active rollout") as overlap:
        w.create()
    assert overlap.value.extra["rollout_ids"] == [first]
    with Session(w.engine) as s:
        assert len(s.exec(select(Rollout)).all()) == 1
        assert len(s.exec(select(RolloutDevice)).all()) == 2


def test_one_lease_holder_steps_a_rollout(world: World) -> None:
    w = world
    fleet_of(w, 10)
    rid = w.create(stages=(StageSpec(percent=100, bake_s=0),), gates=no_gates(), seed=5)
    a, b = w.runner(owner="proc-a"), w.runner(owner="proc-b")
    a.tick()
    b.tick()  # lease held by a: b must not step (nor send anything twice)
    ids = w.publisher.ids()
    assert len(ids) == len(set(ids)) == 10
    assert w.rollout(rid).lease_owner == "proc-a"
    # a dies; once its lease expires b takes over and finishes the job
    answer_all(w)
    w.now += timedelta(seconds=w.settings.rollout_lease_s + 1)
    b.tick()
    assert w.rollout(rid).lease_owner == "proc-b"
    b.tick()
    assert w.rollout(rid).phase == "completed"
    assert len(w.publisher.ids()) == 10


def test_broker_down_keeps_commands_in_the_outbox(world: World) -> None:
    w = world
    fleet_of(w, 4)
    rid = w.create(stages=(StageSpec(percent=100, bake_s=0),), gates=no_gates(), seed=5)
    w.publisher.down = True
    r = w.runner()
    r.tick()
    assert w.publisher.sent == []
    assert w.rollout(rid).phase == "deploying"
    with Session(w.engine) as s:
        assert (
            len(s.exec(select(CommandOutbox).where(col(CommandOutbox.sent_at).is_(None))).all())
            == 4
        )
    w.publisher.down = False
    r.tick()
    assert len(set(w.publisher.ids())) == 4


def test_group_rollback_and_reconcile(world: World) -> None:
    w = world
    devs = fleet_of(w, 3, tags=("lab",))
    with Session(w.engine) as s:
        rows = rollback_devices(s, tag="lab", target_bundle_sha256=w.bundle_sha, reason="t")
        s.commit()
        assert {r.device_id for r in rows} == set(devs)
    r = w.runner()
    r.tick()
    assert sorted(c.device_id for c in w.publisher.sent) == devs
    # a device whose desired bundle differs from what it reports gets a repair, rate-limited
    settings = w.settings.model_copy(update={"reconcile_interval_s": 100.0})
    w.settings = settings
    r = w.runner()
    w.publisher.sent.clear()
    w.heartbeat(devs[0], OLD)
    r.tick()
    repairs = [c for c in w.publisher.sent if c.device_id == devs[0]]
    assert len(repairs) == 1 and repairs[0].kind == "deploy"
    r.tick()
    assert len([c for c in w.publisher.sent if c.device_id == devs[0]]) == 1
    w.now += timedelta(seconds=101)
    w.heartbeat(devs[0], OLD)
    r.tick()
    assert len([c for c in w.publisher.sent if c.device_id == devs[0]]) == 2
