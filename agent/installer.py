"""The install state machine: a small pure core (`InstallRun`, `classify`) and its shell.

    RECEIVED -> DOWNLOADING -> VERIFYING -> INSTALLING -> SELF_TEST -> SWITCHED
             -> HEALTH_CHECK -> COMMITTED
    ... or REJECTED (refused before touching anything), FAILED (gave up before switching),
    REVERTED (switched, then went back by itself), ROLLED_BACK (an explicit rollback).

Each transition is published as a StatusEvent. The running model is only replaced at
SWITCHED; before that a bundle lives in a staging directory, so a refused or broken bundle
touches neither the active slot nor the rollback target. active.json records the pending
switch in the same atomic write that switches, so a restart before COMMITTED reverts.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import numpy as np

from agent.backends import BackendFactory, create_backend
from agent.config import AgentConfig
from agent.crashpoint import CrashPoints
from agent.errors import AgentError, DownloadError, InferenceError, InstallError
from agent.fetch import Fetcher
from agent.health import HealthVerdict, judge_health
from agent.inference import InferenceService
from agent.model import LoadedModel, load_model
from agent.selftest import run_self_test
from agent.slot import SlotRecord
from agent.state import ActiveState, ModelRef, PendingSwitch, ShadowRef, StateDir
from protocol.bundle import BundleReader
from protocol.errors import (
    BundleFormatError,
    BundleIntegrityError,
    ExpiredError,
    ProtocolError,
    SignatureError,
    TrustRootError,
    WrongTargetError,
)
from protocol.messages import (
    DeployCommand,
    InstallState,
    ReasonCode,
    RollbackCommand,
    StatusEvent,
)

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "InstallInterrupted",
    "InstallRun",
    "Installer",
    "ShadowSink",
    "StatusSink",
    "classify",
]

log = logging.getLogger(__name__)

S = InstallState
StatusSink = Callable[[StatusEvent], None]
#: starts (model, sample rate) or stops (None, 0.0) the shadow runner
ShadowSink = Callable[[LoadedModel | None, float], None]

TRANSITIONS: Final[dict[InstallState, frozenset[InstallState]]] = {
    S.RECEIVED: frozenset(
        {
            S.DOWNLOADING,
            S.INSTALLING,  # the bundle already sits in a slot (it ran in shadow)
            S.REJECTED,
            S.FAILED,
            S.COMMITTED,
            S.ROLLED_BACK,
            S.SHADOWING,
        }
    ),
    S.DOWNLOADING: frozenset({S.DOWNLOADING, S.VERIFYING, S.REJECTED, S.FAILED}),
    S.VERIFYING: frozenset({S.INSTALLING, S.REJECTED, S.FAILED}),
    S.INSTALLING: frozenset({S.SELF_TEST, S.FAILED}),
    S.SELF_TEST: frozenset({S.SWITCHED, S.FAILED, S.ROLLED_BACK, S.SHADOWING}),
    S.SWITCHED: frozenset({S.HEALTH_CHECK, S.REVERTED}),
    S.HEALTH_CHECK: frozenset({S.COMMITTED, S.REVERTED}),
}
TERMINAL: Final = frozenset(
    {S.COMMITTED, S.REVERTED, S.REJECTED, S.FAILED, S.ROLLED_BACK, S.SHADOWING}
)


def classify(exc: BaseException) -> tuple[InstallState, ReasonCode]:
    """Pure: the terminal state and reason for an error that ended an install."""
    protocol_map: list[tuple[type[ProtocolError], ReasonCode]] = [
        (SignatureError, ReasonCode.BAD_SIGNATURE),
        (BundleIntegrityError, ReasonCode.BAD_HASH),
        (ExpiredError, ReasonCode.EXPIRED),
        (WrongTargetError, ReasonCode.WRONG_TARGET),
        (BundleFormatError, ReasonCode.BAD_FORMAT),
    ]
    for cls, reason in protocol_map:
        if isinstance(exc, cls):
            return S.REJECTED, reason
    if isinstance(exc, TrustRootError):
        return S.FAILED, ReasonCode.INTERNAL
    if isinstance(exc, ProtocolError):
        return S.REJECTED, ReasonCode.BAD_FORMAT
    if isinstance(exc, AgentError):
        refused = {
            ReasonCode.TOO_LARGE,
            ReasonCode.BAD_HASH,
            ReasonCode.OLD_VERSION,
            ReasonCode.BAD_COMMAND,
            ReasonCode.WRONG_TARGET,
            ReasonCode.NOTHING_TO_ROLL_BACK,
        }
        return (S.REJECTED if exc.reason in refused else S.FAILED), exc.reason
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return S.FAILED, ReasonCode.DISK_FULL
    return S.FAILED, ReasonCode.INTERNAL


class InstallRun:
    """Pure core: one command's walk through the states, producing its StatusEvents."""

    def __init__(
        self, *, device_id: str, command: DeployCommand | RollbackCommand, active: str | None
    ) -> None:
        self.device_id = device_id
        self.command = command
        self.state: InstallState | None = None
        self.active_sha = active
        if isinstance(command, DeployCommand):
            self.bundle_sha: str | None = command.bundle_sha256
            self.model_name: str | None = command.model_name
            self.model_version: int | None = command.model_version
        else:
            self.bundle_sha = command.target_bundle_sha256
            self.model_name = None
            self.model_version = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def advance(
        self,
        state: InstallState,
        *,
        reason: ReasonCode = ReasonCode.OK,
        detail: str = "",
        progress: float | None = None,
    ) -> StatusEvent:
        """Move to ``state`` (which must be allowed from the current one) and describe it."""
        if self.state is None:
            if state is not S.RECEIVED:
                raise ValueError(f"an install starts at RECEIVED, not {state}")
        elif state not in TRANSITIONS.get(self.state, frozenset()):
            raise ValueError(f"illegal install transition {self.state} -> {state}")
        self.state = state
        return StatusEvent(
            device_id=self.device_id,
            command_id=self.command.command_id,
            rollout_id=self.command.rollout_id,
            state=state,
            reason=reason,
            detail=detail[:2048],
            bundle_sha256=self.bundle_sha,
            model_name=self.model_name,
            model_version=self.model_version,
            active_bundle_sha256=self.active_sha,
            progress=progress,
        )


class InstallInterrupted(Exception):
    """The agent is shutting down in the middle of a health window (a restart reverts)."""


class Installer:
    """Runs deploy and rollback commands, one at a time, against the state directory."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        state: StateDir,
        service: InferenceService,
        fetcher: Fetcher,
        emit: StatusSink,
        backend_factory: BackendFactory = create_backend,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        crash: CrashPoints | None = None,
        on_shadow: ShadowSink | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.service = service
        self.fetcher = fetcher
        self.emit = emit
        self.backend_factory = backend_factory
        self.stop = stop or threading.Event()
        self.clock = clock
        self.sleep = sleep
        self.crash = crash or CrashPoints(config.crash_at)
        self.on_shadow = on_shadow
        self._lock = threading.Lock()  # one install or rollback at a time
        self._attempts: dict[str, int] = {}  # command id -> attempt number of a resumed install
        #: startup problems, by reason code value (corrupt slot, load failure, ...)
        self.startup_problems: list[str] = []

    # -- startup -----------------------------------------------------------------------------
    def startup(self) -> DeployCommand | None:
        """Recover from a crash, serve the best verified model; return an install to resume.

        - switched but not committed (pending): revert to the last committed model;
        - an install interrupted before switching (install.json): resumed, at most
          ``install_attempts_max`` times in all, then reported FAILED;
        - the active slot's files no longer match its manifest, or it does not load: serve
          the previous slot instead and say why.
        """
        with self._lock:
            st = self._validated(self.state.read_active())
            reverted = False
            if st.pending is not None:
                reverted = True
                p = st.pending
                log.warning(
                    "agent stopped before committing %s; reverting to %s",
                    st.active.bundle_sha256[:12] if st.active else None,
                    p.restore_active.bundle_sha256[:12] if p.restore_active else "no model",
                )
                failed = st.active
                st = ActiveState(
                    active=self._validated_ref(p.restore_active),
                    previous=self._validated_ref(p.restore_previous),
                    history=st.history,
                )
                self.state.write_active(st)
                if failed is not None and p.command_id is not None:
                    run = self._restart_run(
                        p.command_id, p.rollout_id, failed, st.active, state=S.HEALTH_CHECK
                    )
                    self.emit(
                        run.advance(
                            S.REVERTED,
                            reason=ReasonCode.HEALTH_FAILED,
                            detail="agent restarted before the health window committed",
                        )
                    )
            st = self._serve_at_startup(st)
            return self._resumable(st, reverted)

    def _restart_run(
        self,
        command_id: str,
        rollout_id: str | None,
        bundle: ModelRef,
        active: ModelRef | None,
        *,
        state: InstallState,
    ) -> InstallRun:
        run = InstallRun(
            device_id=self.config.device_id,
            command=DeployCommand(
                device_id=self.config.device_id,
                command_id=command_id,
                rollout_id=rollout_id,
                bundle_sha256=bundle.bundle_sha256,
                bundle_size=1,
                bundle_url="about:restart",
                model_name=bundle.model_name,
                model_version=bundle.model_version,
            ),
            active=active.bundle_sha256 if active else None,
        )
        run.state = state
        return run

    def _resumable(self, st: ActiveState, reverted: bool) -> DeployCommand | None:
        record = self.state.read_install()
        if record is None:
            return None
        self.state.clear_install()
        if reverted:
            return None  # the switch was reverted and reported: never retried by itself
        try:
            cmd = DeployCommand.model_validate_json(record["command"])
            attempts = int(record.get("attempts", 1))
        except (ValueError, TypeError):
            log.warning("unreadable interrupted install record; dropped")
            return None
        active = st.active.bundle_sha256 if st.active else None
        if attempts >= self.config.install_attempts_max:
            run = InstallRun(device_id=self.config.device_id, command=cmd, active=active)
            run.state = S.DOWNLOADING
            self.emit(
                run.advance(
                    S.FAILED,
                    reason=ReasonCode.INTERNAL,
                    detail=f"install interrupted {attempts} times (agent restarted); giving up",
                )
            )
            return None
        log.warning(
            "resuming the install of %s interrupted by a restart (attempt %d of %d)",
            cmd.bundle_sha256[:12],
            attempts + 1,
            self.config.install_attempts_max,
        )
        self._attempts[cmd.command_id] = attempts + 1
        return cmd

    def _validated_ref(self, ref: ModelRef | None) -> ModelRef | None:
        if ref is None:
            return None
        rec = self.state.slots.record(ref.slot)
        if rec is None or rec.bundle_sha256 != ref.bundle_sha256:
            log.warning("slot %s no longer holds bundle %s", ref.slot, ref.bundle_sha256[:12])
            return None
        return ref

    def _validated(self, st: ActiveState) -> ActiveState:
        shadow = st.shadow
        if shadow is not None and self._validated_ref(shadow.model) is None:
            shadow = None
        return dataclasses.replace(
            st,
            active=self._validated_ref(st.active),
            previous=self._validated_ref(st.previous),
            shadow=shadow,
        )

    def _serve_at_startup(self, st: ActiveState) -> ActiveState:
        failures: list[tuple[ModelRef, ReasonCode, str]] = []
        for ref in (st.active, st.previous):
            if ref is None:
                continue
            problem = self.state.slots.verify_files(ref.slot)
            if problem is not None:
                log.error("not serving bundle %s: %s", ref.bundle_sha256[:12], problem)
                failures.append((ref, ReasonCode.BAD_HASH, problem))
                continue
            try:
                model = self._load_slot(ref)
            except AgentError as exc:
                log.error(
                    "cannot serve bundle %s from slot %s: %s", ref.bundle_sha256[:12], ref.slot, exc
                )
                failures.append((ref, exc.reason, str(exc)))
                continue
            if ref is not st.active:
                log.warning("falling back to the previous bundle %s", ref.bundle_sha256[:12])
                st = ActiveState(active=ref, previous=None, history=st.history)
            self.state.write_active(st)
            self.service.swap(model)
            log.info(
                "serving %s v%d (%s)", ref.model_name, ref.model_version, model.backend.description
            )
            self._report_startup_failures(failures, ref)
            self._start_shadow_at_startup(st)
            return st
        if st.active is not None or st.previous is not None:
            st = ActiveState(history=st.history)
            self.state.write_active(st)
        self._report_startup_failures(failures, None)
        log.info("no model installed yet; waiting for a deploy command")
        return st

    def _report_startup_failures(
        self, failures: list[tuple[ModelRef, ReasonCode, str]], serving: ModelRef | None
    ) -> None:
        for ref, reason, detail in failures:
            self.startup_problems.append(reason.value)
            self.emit(
                StatusEvent(
                    device_id=self.config.device_id,
                    state=S.REVERTED,
                    reason=reason,
                    detail=f"at startup: {detail}"[:2048],
                    bundle_sha256=ref.bundle_sha256,
                    model_name=ref.model_name,
                    model_version=ref.model_version,
                    active_bundle_sha256=serving.bundle_sha256 if serving else None,
                )
            )

    def _start_shadow_at_startup(self, st: ActiveState) -> None:
        sh = st.shadow
        if sh is None or self.on_shadow is None:
            return
        if st.active is not None and sh.model.slot == st.active.slot:
            return
        if self.state.slots.verify_files(sh.model.slot) is not None:
            log.error("shadow candidate in slot %s is damaged; not running it", sh.model.slot)
            self.state.write_active(dataclasses.replace(st, shadow=None))
            return
        try:
            model = self._load_slot(sh.model)
        except AgentError as exc:
            log.error("shadow candidate does not load: %s", exc)
            self.state.write_active(dataclasses.replace(st, shadow=None))
            return
        self.on_shadow(model, sh.sample_rate)

    def _load_slot(self, ref: ModelRef) -> LoadedModel:
        manifest = self.state.slots.manifest(ref.slot)
        return load_model(
            self.state.slots.path(ref.slot),
            manifest,
            ref.bundle_sha256,
            self.config.profile,
            self.backend_factory,
        )

    def _stop_shadow(self, st: ActiveState) -> ActiveState:
        if st.shadow is None:
            return st
        if self.on_shadow is not None:
            self.on_shadow(None, 0.0)
        st = dataclasses.replace(st, shadow=None)
        self.state.write_active(st)
        return st

    # -- deploy ------------------------------------------------------------------------------
    def deploy(self, cmd: DeployCommand) -> StatusEvent:
        """Run a deploy command to a terminal state; returns the last event published."""
        with self._lock:
            st = self.state.read_active()
            run = InstallRun(
                device_id=self.config.device_id,
                command=cmd,
                active=st.active.bundle_sha256 if st.active else None,
            )
            # Recorded before it is acknowledged: a crash from here on is resumed or reported.
            attempts = self._attempts.pop(cmd.command_id, 1)
            self.state.write_install(cmd.model_dump_json(), attempts)
            self.emit(run.advance(S.RECEIVED))
            try:
                ev = self._deploy(run, cmd, st)
                self.state.clear_install()
                return ev
            except InstallInterrupted:
                log.warning("shutdown during an install; a restart resumes or reverts it")
                raise
            except Exception as exc:
                if run.done:
                    self.state.clear_install()
                    raise
                if self.stop.is_set():
                    # Stopping, not failing: install.json stays, a restart resumes it.
                    self.state.slots.discard_staging()
                    log.warning("install of %s interrupted by shutdown", cmd.bundle_sha256[:12])
                    raise InstallInterrupted() from exc
                if not isinstance(exc, AgentError | ProtocolError | OSError):
                    log.exception("install of %s crashed", cmd.bundle_sha256[:12])
                self.state.slots.discard_staging()
                state, reason = classify(exc)
                ev = run.advance(state, reason=reason, detail=str(exc))
                self.emit(ev)
                self.state.clear_install()
                return ev

    def _deploy(self, run: InstallRun, cmd: DeployCommand, st: ActiveState) -> StatusEvent:
        cfg = self.config
        active = st.active
        if active is not None and active.bundle_sha256 == cmd.bundle_sha256:
            if cmd.shadow:
                raise InstallError(
                    "cannot shadow the bundle that is already active", reason=ReasonCode.BAD_COMMAND
                )
            st = self._stop_shadow(st)
            ev = run.advance(S.COMMITTED, detail="bundle is already active")
            self.emit(ev)
            return ev
        if (
            cmd.shadow
            and st.shadow is not None
            and st.shadow.model.bundle_sha256 == cmd.bundle_sha256
        ):
            ev = run.advance(S.SHADOWING, detail="bundle is already running in shadow")
            self.emit(ev)
            return ev
        self._check_version(active, cmd.model_name, cmd.model_version)
        shadowed = st.shadow
        if (
            not cmd.shadow
            and shadowed is not None
            and shadowed.model.bundle_sha256 == cmd.bundle_sha256
            and self.state.slots.verify_files(shadowed.model.slot) is None
        ):
            return self._promote_shadow(run, cmd, st)
        st = self._stop_shadow(st)
        self.emit(run.advance(S.DOWNLOADING, progress=0.0))
        path = self.fetcher.fetch(
            cmd,
            self.state.downloads,
            lambda f: self.emit(run.advance(S.DOWNLOADING, progress=min(1.0, max(0.0, f)))),
        )
        self.emit(run.advance(S.VERIFYING))
        self.crash.hit("verifying")
        staging = self.state.slots.staging()
        try:
            verified = BundleReader(path, max_bytes=cfg.download_max_bytes).verify(
                self.state.load_trust(),
                profile=cfg.profile.name,
                device_id=cfg.device_id,
                device_tags=cfg.tags,
                extract_to=staging,
            )
        finally:
            path.unlink(missing_ok=True)
        m = verified.manifest
        if verified.sha256 != cmd.bundle_sha256:
            raise DownloadError("bundle file changed after download", reason=ReasonCode.BAD_HASH)
        if (m.model.name, m.model.version) != (cmd.model_name, cmd.model_version):
            raise InstallError(
                f"command names {cmd.model_name} v{cmd.model_version} but the bundle holds "
                f"{m.model.name} v{m.model.version}",
                reason=ReasonCode.BAD_COMMAND,
            )
        self._check_version(active, m.model.name, m.model.version)

        self.emit(run.advance(S.INSTALLING))
        self.crash.hit("installing")
        model = load_model(staging, m, verified.sha256, cfg.profile, self.backend_factory)
        self.emit(run.advance(S.SELF_TEST, detail=model.backend.description))
        self.crash.hit("self_test")
        result = run_self_test(model)
        if not result.passed:
            model.backend.close()
            raise InstallError(
                f"self-test failed: {result.detail}", reason=ReasonCode.SELF_TEST_FAILED
            )

        target = self.state.slots.other(active.slot if active else None)
        slot_dir = self.state.slots.promote(
            target,
            SlotRecord(
                bundle_sha256=verified.sha256,
                bundle_size=verified.size,
                model_name=m.model.name,
                model_version=m.model.version,
                installed_at=datetime.now(UTC).isoformat(),
            ),
            verified.manifest_raw,
            between=lambda: self.crash.hit("promote"),
        )
        model = dataclasses.replace(model, directory=slot_dir)
        new_ref = ModelRef(
            slot=target,
            bundle_sha256=verified.sha256,
            model_name=m.model.name,
            model_version=m.model.version,
        )
        # The slot we just filled held the rollback target, if any; it is gone now.
        previous = st.previous if st.previous and st.previous.slot != target else None
        if cmd.shadow:
            return self._begin_shadow(run, cmd, st, model, new_ref, previous, result.detail)
        return self._switch(run, cmd, st, model, new_ref, previous, result.detail)

    def _begin_shadow(
        self,
        run: InstallRun,
        cmd: DeployCommand,
        st: ActiveState,
        model: LoadedModel,
        new_ref: ModelRef,
        previous: ModelRef | None,
        detail: str,
    ) -> StatusEvent:
        self.state.write_active(
            dataclasses.replace(
                st,
                previous=previous,
                shadow=ShadowRef(
                    model=new_ref,
                    sample_rate=cmd.shadow_sample_rate,
                    command_id=cmd.command_id,
                    rollout_id=cmd.rollout_id,
                ),
            )
        )
        if self.on_shadow is not None:
            self.on_shadow(model, cmd.shadow_sample_rate)
        else:
            model.backend.close()
        ev = run.advance(
            S.SHADOWING,
            detail=f"running beside the active model on {cmd.shadow_sample_rate:.0%} of inputs; "
            + detail,
        )
        self.emit(ev)
        return ev

    def _promote_shadow(self, run: InstallRun, cmd: DeployCommand, st: ActiveState) -> StatusEvent:
        assert st.shadow is not None
        ref = st.shadow.model
        self.emit(run.advance(S.INSTALLING, detail="bundle already installed (shadow)"))
        st = self._stop_shadow(st)
        model = self._load_slot(ref)
        self.emit(run.advance(S.SELF_TEST, detail=model.backend.description))
        result = run_self_test(model)
        if not result.passed:
            model.backend.close()
            raise InstallError(
                f"self-test failed: {result.detail}", reason=ReasonCode.SELF_TEST_FAILED
            )
        previous = st.previous if st.previous and st.previous.slot != ref.slot else None
        return self._switch(run, cmd, st, model, ref, previous, result.detail)

    def _switch(
        self,
        run: InstallRun,
        cmd: DeployCommand,
        st: ActiveState,
        model: LoadedModel,
        new_ref: ModelRef,
        previous: ModelRef | None,
        detail: str,
    ) -> StatusEvent:
        active = st.active
        self.state.write_active(
            ActiveState(
                active=new_ref,
                previous=active,
                pending=PendingSwitch(
                    command_id=cmd.command_id,
                    rollout_id=cmd.rollout_id,
                    switched_at=datetime.now(UTC).isoformat(),
                    restore_active=active,
                    restore_previous=previous,
                ),
                history=st.history,
            )
        )
        old_model = self.service.swap(model, keep_old=True)
        run.active_sha = new_ref.bundle_sha256
        self.emit(run.advance(S.SWITCHED, detail=detail))
        self.crash.hit("switched")

        self.emit(run.advance(S.HEALTH_CHECK))
        verdict = self._health_window(model)
        if not verdict.healthy:
            self.state.write_active(
                ActiveState(active=active, previous=previous, history=st.history)
            )
            self.service.swap(old_model, keep_old=True)
            self.service.release(model)
            run.active_sha = active.bundle_sha256 if active else None
            ev = run.advance(S.REVERTED, reason=ReasonCode.HEALTH_FAILED, detail=verdict.detail)
            self.emit(ev)
            return ev
        self.crash.hit("commit")
        committed = ActiveState(active=new_ref, previous=active, history=st.history)
        self.state.write_active(committed.with_history(new_ref))
        self.crash.hit("committed")
        if old_model is not None:
            self.service.release(old_model)
        ev = run.advance(S.COMMITTED, detail=verdict.detail)
        self.emit(ev)
        return ev

    @staticmethod
    def _check_version(active: ModelRef | None, name: str, version: int) -> None:
        if active is not None and active.model_name == name and version <= active.model_version:
            raise InstallError(
                f"{name} v{version} is not newer than the installed v{active.model_version}; "
                "send a rollback command to go back",
                reason=ReasonCode.OLD_VERSION,
            )

    def _health_window(self, model: LoadedModel) -> HealthVerdict:
        cfg = self.config
        need = cfg.health_inferences
        deadline = self.clock() + cfg.health_timeout_s
        while self.service.health().calls < need and self.clock() < deadline:
            if self.stop.is_set():
                raise InstallInterrupted()
            self.sleep(0.05)
        missing = need - self.service.health().calls
        if missing > 0:
            samples = _probe_inputs(model)
            for i in range(missing):
                if self.stop.is_set():
                    raise InstallInterrupted()
                self.crash.hit("health")
                try:
                    self.service.probe({k: v[i % len(v)][None] for k, v in samples.items()})
                except InferenceError as exc:
                    log.warning("health probe failed: %s", exc)
        return judge_health(
            self.service.health(),
            budget_ms=cfg.latency_budget_ms or cfg.profile.limits.latency_budget_ms,
            min_calls=need,
        )

    # -- rollback ----------------------------------------------------------------------------
    def rollback(self, cmd: RollbackCommand) -> StatusEvent:
        """Switch back to the previous bundle (or the named one, if a slot still holds it)."""
        with self._lock:
            st = self._validated(self.state.read_active())
            active = st.active
            run = InstallRun(
                device_id=self.config.device_id,
                command=cmd,
                active=active.bundle_sha256 if active else None,
            )
            self.emit(run.advance(S.RECEIVED))
            try:
                return self._rollback(run, cmd, st)
            except Exception as exc:
                if run.done:
                    raise
                if not isinstance(exc, AgentError | ProtocolError | OSError):
                    log.exception("rollback crashed")
                state, reason = classify(exc)
                ev = run.advance(state, reason=reason, detail=str(exc))
                self.emit(ev)
                return ev

    def _rollback(self, run: InstallRun, cmd: RollbackCommand, st: ActiveState) -> StatusEvent:
        active = st.active
        wanted = cmd.target_bundle_sha256
        if wanted is not None and active is not None and active.bundle_sha256 == wanted:
            ev = run.advance(S.ROLLED_BACK, detail="bundle is already active")
            self.emit(ev)
            return ev
        target: ModelRef | None = st.previous
        if wanted is not None:
            slot = self.state.slots.find(wanted)
            rec = self.state.slots.record(slot) if slot is not None else None
            target = (
                None
                if slot is None or rec is None or (active is not None and slot == active.slot)
                else ModelRef(
                    slot=slot,
                    bundle_sha256=rec.bundle_sha256,
                    model_name=rec.model_name,
                    model_version=rec.model_version,
                )
            )
        if target is None:
            what = f"bundle {wanted[:12]}... is not in a slot" if wanted else "no previous bundle"
            raise InstallError(
                f"nothing to roll back to: {what}", reason=ReasonCode.NOTHING_TO_ROLL_BACK
            )
        run.bundle_sha, run.model_name = target.bundle_sha256, target.model_name
        run.model_version = target.model_version
        model = self._load_slot(target)
        result = run_self_test(model)
        if not result.passed:
            model.backend.close()
            raise InstallError(
                f"self-test of the rollback target failed: {result.detail}",
                reason=ReasonCode.SELF_TEST_FAILED,
            )
        new = ActiveState(active=target, previous=active, history=st.history)
        self.state.write_active(new.with_history(target))
        self.service.swap(model)
        run.active_sha = target.bundle_sha256
        ev = run.advance(
            S.ROLLED_BACK,
            detail=f"now serving {target.model_name} v{target.model_version}"
            + (f" ({cmd.reason})" if cmd.reason else ""),
        )
        self.emit(ev)
        return ev


def _probe_inputs(model: LoadedModel) -> dict[str, np.ndarray]:
    """Inputs for health probes: the golden inputs, else zeros of the input signature."""
    m = model.manifest
    if m.golden is not None:
        try:
            with np.load(model.directory / m.golden.path, allow_pickle=False) as npz:
                got = {s.name: npz[f"in:{s.name}"] for s in m.inputs if f"in:{s.name}" in npz}
            if len(got) == len(m.inputs):
                return got
        except (OSError, ValueError) as exc:
            log.warning("golden inputs unreadable for health probes: %s", exc)
    return {
        s.name: np.zeros(
            [1] + [d if isinstance(d, int) and d > 0 else 1 for d in s.shape[1:]], dtype=s.dtype
        )
        for s in m.inputs
    }
