"""The rollout state machine: a pure function of (state, events, now) -> (state, actions).

No I/O, no clock, no randomness: the shell (`fleet.rollout.runner`) loads the state, turns
what the database says into events, calls `step`, and persists the new state together with
the actions in one transaction before executing any action (an outbox). Because commands
ids are derived from (rollout, kind, stage, device, attempt), an action executed twice after
a crash is the same command, and a step replayed from the same state gives the same result.

Rollout phases::

    PENDING -> DEPLOYING -> BAKING -> (next stage: DEPLOYING ...) -> COMPLETED
                   |           |-> PAUSED (approval / gate on_fail=pause / too little data /
                   |           |           operator) -- approve --> next stage (or resume)
                   |           |-> ROLLING_BACK -> ROLLED_BACK
                   '-----------'-> (abort) ROLLING_BACK -> ABORTED, or ABORTED at once (keep)

Device phases inside one rollout::

    PLANNED -> SENT -> COMMITTED | FAILED (reported, or out of retries)
                 '-> OFFLINE (timed out while offline; re-sent when it returns)
                        '-> UNREACHABLE (still offline at the stage deadline)
    (rollback) -> ROLLBACK_SENT -> ROLLED_BACK | ROLLBACK_FAILED
                      '-> ROLLBACK_OFFLINE (re-sent when it returns)
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from fleet.rollout.gate import (
    CohortStats,
    ExternalReading,
    GateStatus,
    GateVerdict,
    InstallCounts,
    QualityReading,
    evaluate_gates,
)
from fleet.rollout.spec import RolloutCreate

__all__ = [
    "ACTIVE_PHASES",
    "TERMINAL_PHASES",
    "Action",
    "DeviceEntry",
    "DevicePhase",
    "DeviceReport",
    "DeviceSeen",
    "Event",
    "OperatorRequest",
    "RecordDecision",
    "RolloutPhase",
    "RolloutState",
    "SendDeploy",
    "SendRollback",
    "StageMetrics",
    "Transition",
    "command_id_for",
    "step",
    "wants_metrics",
]


class RolloutPhase(StrEnum):
    PENDING = "pending"
    DEPLOYING = "deploying"
    BAKING = "baking"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


TERMINAL_PHASES = frozenset(
    {RolloutPhase.COMPLETED, RolloutPhase.ROLLED_BACK, RolloutPhase.ABORTED}
)
ACTIVE_PHASES = frozenset(set(RolloutPhase) - TERMINAL_PHASES)


class DevicePhase(StrEnum):
    PLANNED = "planned"
    SENT = "sent"
    OFFLINE = "offline"
    COMMITTED = "committed"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    ROLLBACK_SENT = "rollback_sent"
    ROLLBACK_OFFLINE = "rollback_offline"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"


DEPLOY_PENDING = frozenset({DevicePhase.SENT, DevicePhase.OFFLINE})
ROLLBACK_PENDING = frozenset({DevicePhase.ROLLBACK_SENT, DevicePhase.ROLLBACK_OFFLINE})
#: reported by the agent: the new version does not run (the old one still does)
_REFUSED = {"failed", "rejected", "reverted"}


def command_id_for(rollout_id: str, kind: str, stage: int, device_id: str, attempt: int) -> str:
    """Deterministic: the same (rollout, kind, stage, device, attempt) is the same command."""
    key = f"{rollout_id}/{kind}/{stage}/{device_id}/{attempt}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


# -- state ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceEntry:
    device_id: str
    stage: int
    #: place in the seeded deployment order
    position: int
    phase: DevicePhase = DevicePhase.PLANNED
    #: what the device ran when the rollout chose it: the rollback target
    previous_sha256: str | None = None
    #: sends of the current command kind (deploy, then rollback); part of the command id
    attempt: int = 0
    #: timeouts while the device was online (the retry budget)
    timeouts: int = 0
    deadline: datetime | None = None
    command_id: str | None = None
    online: bool = False
    reported_sha256: str | None = None
    #: the device itself said the install did not take (so it still runs the old version)
    reported_failure: bool = False
    reason: str = ""

    @property
    def may_run_new(self) -> bool:
        """It may run the new bundle now or later: a rollback must reach it."""
        if self.phase in (
            DevicePhase.SENT,
            DevicePhase.OFFLINE,
            DevicePhase.COMMITTED,
            DevicePhase.UNREACHABLE,
        ):
            return True
        return self.phase is DevicePhase.FAILED and not self.reported_failure


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutState:
    rollout_id: str
    bundle_sha256: str
    plan: RolloutCreate
    phase: RolloutPhase = RolloutPhase.PENDING
    #: current stage index; -1 before the first
    stage: int = -1
    stage_started_at: datetime | None = None
    bake_started_at: datetime | None = None
    #: why it is paused: approval | gate | sample | operator:<phase it was in>
    pause_kind: str = ""
    reason: str = ""
    rollback_started_at: datetime | None = None
    #: where ROLLING_BACK ends: rolled_back, or aborted
    rollback_final: RolloutPhase = RolloutPhase.ROLLED_BACK
    #: the last control cohort with data (the 100 % stage has none of its own)
    last_control: CohortStats | None = None
    devices: Mapping[str, DeviceEntry] = field(default_factory=dict)

    def stage_devices(self, stage: int) -> list[DeviceEntry]:
        return [d for d in self.devices.values() if d.stage == stage]


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceReport:
    """A status event the device sent for one of this rollout's commands."""

    device_id: str
    command_id: str
    #: "deploy" or "rollback": the kind of the command it answers
    kind: Literal["deploy", "rollback"]
    state: str
    reason: str = "ok"
    detail: str = ""
    active_sha256: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSeen:
    """What the registry says of the device now (presence + last heartbeat)."""

    device_id: str
    online: bool
    reported_sha256: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StageMetrics:
    """Telemetry of the stage's devices (canary) and the devices still on the old version."""

    stage: int
    canary: CohortStats
    control: CohortStats
    drift: ExternalReading | None = None
    shadow: ExternalReading | None = None
    quality: QualityReading | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorRequest:
    request_id: str
    action: Literal["approve", "pause", "abort", "rollback"]
    reason: str = ""
    actor: str = ""
    #: abort only: leave devices on the new version instead of rolling them back
    keep_devices: bool = False


Event = DeviceReport | DeviceSeen | StageMetrics | OperatorRequest


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendDeploy:
    device_id: str
    command_id: str
    stage: int
    attempt: int
    shadow: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SendRollback:
    device_id: str
    command_id: str
    stage: int
    attempt: int
    target_sha256: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordDecision:
    stage: int
    outcome: str
    reason: str
    figures: Mapping[str, Any] = field(default_factory=dict)


Action = SendDeploy | SendRollback | RecordDecision


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    state: RolloutState
    actions: tuple[Action, ...]
    #: ids of the devices whose entry differs from the input state (what to write back)
    changed: tuple[str, ...] = ()


def wants_metrics(state: RolloutState, now: datetime) -> bool:
    """True when `step` needs a `StageMetrics` for the current stage to decide."""
    if state.phase is not RolloutPhase.BAKING or state.bake_started_at is None:
        return False
    bake_s = state.plan.stages[state.stage].bake_s
    return now >= state.bake_started_at + timedelta(seconds=bake_s)


# -- the step -------------------------------------------------------------------------------


class _Step:
    """Mutable working copy for one step; `build` freezes it back."""

    def __init__(self, state: RolloutState, now: datetime) -> None:
        self.s = state
        self.now = now
        self.devices = dict(state.devices)
        self.actions: list[Action] = []
        self.plan = state.plan

    # helpers
    def set(self, **changes: Any) -> None:
        self.s = dataclasses.replace(self.s, **changes)

    def put(self, entry: DeviceEntry, **changes: Any) -> DeviceEntry:
        new = dataclasses.replace(entry, **changes)
        self.devices[entry.device_id] = new
        return new

    def decide(self, outcome: str, reason: str, figures: Mapping[str, Any] | None = None) -> None:
        self.actions.append(
            RecordDecision(
                stage=self.s.stage, outcome=outcome, reason=reason, figures=figures or {}
            )
        )

    def timeout(self) -> timedelta:
        return timedelta(seconds=self.plan.command_timeout_s)

    # -- sending ----------------------------------------------------------------------
    def send_deploy(self, entry: DeviceEntry) -> None:
        attempt = entry.attempt + 1
        cid = command_id_for(self.s.rollout_id, "deploy", entry.stage, entry.device_id, attempt)
        self.put(
            entry,
            phase=DevicePhase.SENT,
            attempt=attempt,
            command_id=cid,
            deadline=self.now + self.timeout(),
        )
        self.actions.append(
            SendDeploy(
                device_id=entry.device_id,
                command_id=cid,
                stage=entry.stage,
                attempt=attempt,
                shadow=self.plan.stages[entry.stage].shadow,
            )
        )

    def send_rollback(self, entry: DeviceEntry) -> None:
        attempt = entry.attempt + 1
        cid = command_id_for(self.s.rollout_id, "rollback", entry.stage, entry.device_id, attempt)
        self.put(
            entry,
            phase=DevicePhase.ROLLBACK_SENT,
            attempt=attempt,
            command_id=cid,
            deadline=self.now + self.timeout(),
        )
        self.actions.append(
            SendRollback(
                device_id=entry.device_id,
                command_id=cid,
                stage=entry.stage,
                attempt=attempt,
                target_sha256=entry.previous_sha256,
            )
        )

    # -- events -----------------------------------------------------------------------
    def seen(self, ev: DeviceSeen) -> None:
        entry = self.devices.get(ev.device_id)
        if entry is None:
            return
        entry = self.put(entry, online=ev.online, reported_sha256=ev.reported_sha256)
        if (
            entry.phase in ROLLBACK_PENDING
            and entry.previous_sha256 is not None
            and ev.reported_sha256 == entry.previous_sha256
        ):
            self.put(entry, phase=DevicePhase.ROLLED_BACK, deadline=None, reason="heartbeat")

    def report(self, ev: DeviceReport) -> None:
        entry = self.devices.get(ev.device_id)
        if entry is None:
            return
        if entry.phase in ROLLBACK_PENDING:
            back = entry.previous_sha256 is not None and ev.active_sha256 == entry.previous_sha256
            if (ev.kind == "rollback" and ev.state == "rolled_back") or back:
                self.put(entry, phase=DevicePhase.ROLLED_BACK, deadline=None, reason=ev.state)
            elif ev.kind == "rollback" and ev.state in ("failed", "rejected"):
                self.put(
                    entry,
                    phase=DevicePhase.ROLLBACK_FAILED,
                    deadline=None,
                    reason=f"{ev.state}: {ev.reason} {ev.detail}".strip(),
                )
            return
        if ev.kind != "deploy" or entry.phase in (DevicePhase.PLANNED, DevicePhase.ROLLED_BACK):
            return
        if ev.state == "committed" and entry.phase is not DevicePhase.COMMITTED:
            self.put(
                entry, phase=DevicePhase.COMMITTED, deadline=None, reason="", reported_failure=False
            )
        elif ev.state in _REFUSED and entry.phase in (*DEPLOY_PENDING, DevicePhase.UNREACHABLE):
            self.put(
                entry,
                phase=DevicePhase.FAILED,
                deadline=None,
                reported_failure=True,
                reason=f"{ev.state}: {ev.reason} {ev.detail}".strip()[:500],
            )

    def operator(self, ev: OperatorRequest) -> None:
        phase = self.s.phase
        who = f" by {ev.actor}" if ev.actor else ""
        why = f": {ev.reason}" if ev.reason else ""
        if ev.action == "approve":
            if phase is not RolloutPhase.PAUSED:
                self.decide("ignored", f"approve{who} ignored: the rollout is {phase.value}")
                return
            kind = self.s.pause_kind
            self.decide("approve", f"approved{who}{why} (paused for {kind})")
            if kind.startswith("operator:"):
                self.set(phase=RolloutPhase(kind.split(":", 1)[1]), pause_kind="", reason="")
            else:
                self.set(pause_kind="", reason="")
                self.next_stage()
        elif ev.action == "pause":
            if phase not in (RolloutPhase.DEPLOYING, RolloutPhase.BAKING, RolloutPhase.PENDING):
                self.decide("ignored", f"pause{who} ignored: the rollout is {phase.value}")
                return
            self.set(phase=RolloutPhase.PAUSED, pause_kind=f"operator:{phase.value}")
            self.decide("pause", f"paused{who}{why}")
        elif ev.action == "abort":
            if phase in TERMINAL_PHASES or phase is RolloutPhase.ROLLING_BACK:
                self.decide("ignored", f"abort{who} ignored: the rollout is {phase.value}")
                return
            if ev.keep_devices:
                self.set(phase=RolloutPhase.ABORTED, reason=f"aborted{who}{why}; devices kept")
                self.decide("abort", f"aborted{who}{why}; devices left as they are")
            else:
                self.start_rollback(f"aborted{who}{why}", final=RolloutPhase.ABORTED)
        elif ev.action == "rollback":
            if phase is RolloutPhase.ROLLING_BACK or phase in (
                RolloutPhase.ROLLED_BACK,
                RolloutPhase.ABORTED,
            ):
                self.decide("ignored", f"rollback{who} ignored: the rollout is {phase.value}")
                return
            self.start_rollback(f"rollback requested{who}{why}", final=RolloutPhase.ROLLED_BACK)

    # -- phase logic --------------------------------------------------------------------
    def start_stage(self, index: int) -> None:
        self.set(
            stage=index,
            phase=RolloutPhase.DEPLOYING,
            stage_started_at=self.now,
            bake_started_at=None,
        )
        planned = sorted(
            (d for d in self.devices.values() if d.stage == index),
            key=lambda d: d.position,
        )
        for entry in planned:
            if entry.phase is DevicePhase.PLANNED:
                self.send_deploy(entry)

    def next_stage(self) -> None:
        if self.s.stage + 1 >= len(self.plan.stages):
            self.set(phase=RolloutPhase.COMPLETED, reason="every stage passed")
            self.decide("complete", "every stage passed; the rollout is complete")
            return
        self.start_stage(self.s.stage + 1)

    def start_rollback(
        self, reason: str, *, final: RolloutPhase, figures: Mapping[str, Any] | None = None
    ) -> None:
        self.set(
            phase=RolloutPhase.ROLLING_BACK,
            rollback_started_at=self.now,
            rollback_final=final,
            reason=reason,
            pause_kind="",
        )
        self.decide("rollback", reason, figures)
        targets = sorted(
            (d for d in self.devices.values() if d.may_run_new),
            key=lambda d: (d.stage, d.position),
        )
        for entry in targets:
            self.send_rollback(self.put(entry, attempt=0, timeouts=0))

    def pause(self, kind: str, reason: str, figures: Mapping[str, Any] | None = None) -> None:
        self.set(phase=RolloutPhase.PAUSED, pause_kind=kind, reason=reason)
        self.decide("pause", reason, figures)

    def device_timeouts(self) -> None:
        stage_deadline = None
        if self.s.stage_started_at is not None:
            stage_deadline = self.s.stage_started_at + timedelta(seconds=self.plan.stage_timeout_s)
        for entry in sorted(self.devices.values(), key=lambda d: (d.stage, d.position)):
            if entry.phase is DevicePhase.SENT and entry.deadline and self.now >= entry.deadline:
                if not entry.online:
                    self.put(entry, phase=DevicePhase.OFFLINE, deadline=None)
                elif entry.timeouts + 1 > self.plan.max_retries:
                    self.put(
                        entry,
                        phase=DevicePhase.FAILED,
                        timeouts=entry.timeouts + 1,
                        deadline=None,
                        reason=f"no answer to {entry.attempt} attempt(s)",
                    )
                else:
                    self.send_deploy(self.put(entry, timeouts=entry.timeouts + 1))
            elif entry.phase is DevicePhase.OFFLINE:
                if (
                    entry.stage == self.s.stage
                    and stage_deadline is not None
                    and self.now >= stage_deadline
                ):
                    self.put(entry, phase=DevicePhase.UNREACHABLE, reason="offline past deadline")
                elif entry.online:
                    self.send_deploy(entry)

    def rollback_timeouts(self) -> None:
        for entry in sorted(self.devices.values(), key=lambda d: (d.stage, d.position)):
            if (
                entry.phase is DevicePhase.ROLLBACK_SENT
                and entry.deadline
                and self.now >= entry.deadline
            ):
                if not entry.online:
                    self.put(entry, phase=DevicePhase.ROLLBACK_OFFLINE, deadline=None)
                elif entry.timeouts + 1 > self.plan.max_retries:
                    self.put(
                        entry,
                        phase=DevicePhase.ROLLBACK_FAILED,
                        timeouts=entry.timeouts + 1,
                        deadline=None,
                        reason=f"no answer to {entry.attempt} rollback attempt(s)",
                    )
                else:
                    self.send_rollback(self.put(entry, timeouts=entry.timeouts + 1))
            elif entry.phase is DevicePhase.ROLLBACK_OFFLINE and entry.online:
                self.send_rollback(entry)

    def install_counts(self) -> InstallCounts:
        mine = [d for d in self.devices.values() if d.stage == self.s.stage]
        return InstallCounts(
            stage_devices=len(mine),
            committed=sum(d.phase is DevicePhase.COMMITTED for d in mine),
            failed=sum(d.phase is DevicePhase.FAILED for d in mine),
        )

    def deploying(self) -> bool:
        """Returns True when the phase changed (run the loop again)."""
        gates = self.plan.gates_for(self.s.stage)
        counts = self.install_counts()
        if counts.stage_devices == 0:
            # e.g. a tag canary whose tag no target device carries: nothing to judge
            self.decide("skip", f"stage {self.s.stage} has no devices; skipped")
            self.next_stage()
            return True
        limit = gates.max_install_failure_rate
        # failed / stage size is a lower bound of the final rate: act before the rest settle
        if limit is not None and counts.failed and counts.failed / counts.stage_devices > limit:
            figures = {
                "install": dataclasses.asdict(counts),
                "limit": limit,
                "rate_lower_bound": counts.failed / counts.stage_devices,
            }
            why = (
                f"stage {self.s.stage}: {counts.failed} of {counts.stage_devices} installs "
                f"failed (> {limit:.1%} whatever the rest do)"
            )
            if gates.on_fail == "pause":
                self.pause("gate", why, figures)
            else:
                self.start_rollback(why, final=RolloutPhase.ROLLED_BACK, figures=figures)
            return True
        pending = [
            d
            for d in self.devices.values()
            if d.stage == self.s.stage and d.phase in DEPLOY_PENDING
        ]
        if pending:
            return False
        self.set(phase=RolloutPhase.BAKING, bake_started_at=self.now)
        return True

    def baking(self, metrics: StageMetrics | None) -> bool:
        if not wants_metrics(self.s, self.now) or metrics is None:
            return False
        stage = self.plan.stages[self.s.stage]
        gates = self.plan.gates_for(self.s.stage)
        control = metrics.control
        control_source = f"stage {self.s.stage} control cohort"
        if control.devices == 0 and self.s.last_control is not None:
            control, control_source = self.s.last_control, "last control cohort with data"
        elif control.devices > 0:
            self.set(last_control=control)
        counts = self.install_counts()
        verdict = evaluate_gates(
            gates,
            install=counts,
            canary=metrics.canary,
            control=control if control.devices > 0 else None,
            drift=metrics.drift,
            shadow=metrics.shadow,
            shadow_stage=stage.shadow,
            quality=metrics.quality,
        )
        figures = _figures(verdict, counts, metrics.canary, control, control_source)
        install_failed = any(
            r.name == "install_failure_rate" and r.status is GateStatus.FAIL
            for r in verdict.results
        )
        if install_failed or (verdict.sample_ok and verdict.failed):
            names = ", ".join(f"{r.name} ({r.detail})" for r in verdict.failed)
            why = f"stage {self.s.stage} failed its gates: {names}"
            if gates.on_fail == "pause":
                self.pause("gate", why, figures)
            else:
                self.start_rollback(why, final=RolloutPhase.ROLLED_BACK, figures=figures)
            return True
        if not verdict.sample_ok:
            assert self.s.bake_started_at is not None
            give_up = self.s.bake_started_at + timedelta(
                seconds=stage.bake_s + self.plan.sample_timeout_s
            )
            if self.now >= give_up:
                self.pause(
                    "sample",
                    f"stage {self.s.stage}: too little data to judge ({verdict.sample_detail})",
                    figures,
                )
                return True
            return False
        if stage.require_approval and self.s.stage + 1 < len(self.plan.stages):
            self.pause("approval", f"stage {self.s.stage} passed; waiting for approval", figures)
            return True
        self.decide("advance", f"stage {self.s.stage} passed its gates", figures)
        self.next_stage()
        return True

    def rolling_back(self) -> bool:
        pending = [d for d in self.devices.values() if d.phase in ROLLBACK_PENDING]
        started = self.s.rollback_started_at or self.now
        expired = self.now >= started + timedelta(seconds=self.plan.rollback_timeout_s)
        if pending and not expired:
            return False
        for entry in pending:
            self.put(
                entry,
                phase=DevicePhase.ROLLBACK_FAILED,
                deadline=None,
                reason="offline until the rollback deadline",
            )
        final = self.s.rollback_final
        counts = _count_phases(self.devices.values())
        self.set(phase=final)
        self.decide(
            final.value,
            f"rollback finished: {counts.get('rolled_back', 0)} devices back, "
            f"{counts.get('rollback_failed', 0)} failed",
            {"devices": counts},
        )
        return True

    def advance(self, metrics: StageMetrics | None) -> None:
        for _ in range(4 * len(self.plan.stages) + 8):  # each pass changes phase or stops
            phase = self.s.phase
            if phase in (RolloutPhase.DEPLOYING, RolloutPhase.BAKING, RolloutPhase.PAUSED):
                self.device_timeouts()
            if phase is RolloutPhase.PENDING:
                self.start_stage(0)
                continue
            if phase is RolloutPhase.DEPLOYING:
                if not self.deploying():
                    return
                continue
            if phase is RolloutPhase.BAKING:
                if not self.baking(metrics if metrics and metrics.stage == self.s.stage else None):
                    return
                metrics = None  # used up: the next stage needs its own
                continue
            if phase is RolloutPhase.ROLLING_BACK:
                self.rollback_timeouts()
                if not self.rolling_back():
                    return
                continue
            return  # PAUSED or terminal

    def build(self) -> Transition:
        state = dataclasses.replace(self.s, devices=self.devices)
        old = self.s_in.devices
        changed = tuple(k for k, v in self.devices.items() if old.get(k) != v)
        return Transition(state=state, actions=tuple(self.actions), changed=changed)

    s_in: RolloutState


def _count_phases(entries: Iterable[DeviceEntry]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        out[e.phase.value] = out.get(e.phase.value, 0) + 1
    return out


def _figures(
    verdict: GateVerdict,
    counts: InstallCounts,
    canary: CohortStats,
    control: CohortStats,
    control_source: str,
) -> dict[str, Any]:
    return {
        "sample_ok": verdict.sample_ok,
        "sample": verdict.sample_detail,
        "install": dataclasses.asdict(counts),
        "canary": canary.to_json(),
        "control": control.to_json(),
        "control_source": control_source,
        "gates": [r.to_json() for r in verdict.results],
    }


def step(state: RolloutState, events: Sequence[Event], now: datetime) -> Transition:
    """Apply ``events`` at time ``now``; returns the new state and the actions to execute."""
    work = _Step(state, now)
    work.s_in = state
    if state.phase in TERMINAL_PHASES and state.phase is not RolloutPhase.COMPLETED:
        # a finished rollback or abort only still records what devices report
        for ev in events:
            if isinstance(ev, DeviceSeen):
                work.seen(ev)
            elif isinstance(ev, DeviceReport):
                work.report(ev)
        return work.build()
    for ev in events:
        if isinstance(ev, DeviceSeen):
            work.seen(ev)
    for ev in events:
        if isinstance(ev, DeviceReport):
            work.report(ev)
    for ev in events:
        if isinstance(ev, OperatorRequest):
            work.operator(ev)
    metrics = None
    for ev in events:
        if isinstance(ev, StageMetrics):
            metrics = ev
    work.advance(metrics)
    return work.build()
