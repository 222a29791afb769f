"""The state directory: what survives a crash or a reboot.

Layout::

    <state_dir>/
      agent.json          device id, first start, agent version
      active.json         active / previous / pending model, and the bundles this device ran
      trust/root.json     the trust root (copied from --trust-root at first start)
      slots/a, slots/b    extracted bundles (each with manifest.json and slot.json)
      downloads/          <sha256>.part + .have while a bundle is being fetched (resumable)
      install.json        the deploy command being installed (a restart resumes it)
      bench.json          the latest `edgefleet agent bench` result
      outbox.sqlite       telemetry windows waiting for the broker's acknowledgement

``active.json`` is the one pointer: it names the slot that serves. While a new model is on
probation (switched, not committed) it also holds ``pending`` with what to restore, so a
restart after a crash in that window reverts to the last committed model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import agent as _agent_pkg
from agent.errors import StateError
from agent.fsio import atomic_write, fsync_dir
from agent.slot import SlotStore
from protocol.errors import ProtocolError
from protocol.trust import TrustRoot

__all__ = [
    "ActiveState",
    "HistoryEntry",
    "ModelRef",
    "PendingSwitch",
    "ShadowRef",
    "StateDir",
    "atomic_write",
]

log = logging.getLogger(__name__)

_HISTORY_MAX: Final = 100


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRef:
    """A bundle in a slot."""

    slot: str
    bundle_sha256: str
    model_name: str
    model_version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingSwitch:
    """A switch not yet committed: what to restore if the agent dies before committing."""

    command_id: str | None
    rollout_id: str | None
    switched_at: str
    restore_active: ModelRef | None
    restore_previous: ModelRef | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowRef:
    """A shadow candidate: the slot holding it, and the share of inputs it sees."""

    model: ModelRef
    sample_rate: float
    command_id: str | None = None
    rollout_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    bundle_sha256: str
    model_name: str
    model_version: int
    committed_at: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ActiveState:
    """The content of active.json."""

    active: ModelRef | None = None
    previous: ModelRef | None = None
    pending: PendingSwitch | None = None
    history: tuple[HistoryEntry, ...] = field(default_factory=tuple)
    #: a shadow candidate installed beside the active model (runs on sampled inputs only)
    shadow: ShadowRef | None = None

    def with_history(self, ref: ModelRef) -> ActiveState:
        entry = HistoryEntry(
            bundle_sha256=ref.bundle_sha256,
            model_name=ref.model_name,
            model_version=ref.model_version,
            committed_at=_now_iso(),
        )
        return replace(self, history=(*self.history, entry)[-_HISTORY_MAX:])

    def to_bytes(self) -> bytes:
        return json.dumps({"schema_version": 1, **asdict(self)}, indent=1, sort_keys=True).encode()

    @staticmethod
    def from_bytes(raw: bytes) -> ActiveState:
        obj = json.loads(raw)

        def ref(d: dict[str, Any] | None) -> ModelRef | None:
            return None if d is None else ModelRef(**d)

        pending = obj.get("pending")
        shadow = obj.get("shadow")
        return ActiveState(
            shadow=None
            if shadow is None
            else ShadowRef(
                model=ModelRef(**shadow["model"]),
                sample_rate=float(shadow["sample_rate"]),
                command_id=shadow.get("command_id"),
                rollout_id=shadow.get("rollout_id"),
            ),
            active=ref(obj.get("active")),
            previous=ref(obj.get("previous")),
            pending=None
            if pending is None
            else PendingSwitch(
                command_id=pending.get("command_id"),
                rollout_id=pending.get("rollout_id"),
                switched_at=pending["switched_at"],
                restore_active=ref(pending.get("restore_active")),
                restore_previous=ref(pending.get("restore_previous")),
            ),
            history=tuple(HistoryEntry(**h) for h in obj.get("history", ())),
        )


class StateDir:
    """The agent's state directory. Open it with `StateDir.open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.slots = SlotStore(self.root / "slots")
        self.active_path = self.root / "active.json"
        self.trust_path = self.root / "trust" / "root.json"
        self.agent_path = self.root / "agent.json"
        self.outbox_path = self.root / "outbox.sqlite"
        self.downloads = self.root / "downloads"
        self.install_path = self.root / "install.json"
        self.bench_path = self.root / "bench.json"

    @classmethod
    def open(cls, root: Path, *, device_id: str, trust_root: Path | None) -> StateDir:
        """Create or reopen the state directory for this device, installing the trust root."""
        sd = cls(root)
        try:
            sd.root.mkdir(parents=True, exist_ok=True)
            sd.downloads.mkdir(exist_ok=True)
            (sd.root / "trust").mkdir(exist_ok=True)
            sd.slots.prepare()
            sd._check_agent_json(device_id)
            sd._install_trust_root(trust_root)
        except OSError as exc:
            raise StateError(f"state dir {sd.root}: {exc}") from exc
        return sd

    def _check_agent_json(self, device_id: str) -> None:
        if self.agent_path.exists():
            try:
                info = json.loads(self.agent_path.read_bytes())
            except ValueError as exc:
                raise StateError(f"{self.agent_path} is corrupt: {exc}") from exc
            if info.get("device_id") != device_id:
                raise StateError(
                    f"state dir {self.root} belongs to device {info.get('device_id')!r}, not "
                    f"{device_id!r}; use another --state-dir or the right --device-id"
                )
            if info.get("agent_version") == _agent_pkg.__version__:
                return
            info["agent_version"] = _agent_pkg.__version__
        else:
            info = {
                "device_id": device_id,
                "created_at": _now_iso(),
                "agent_version": _agent_pkg.__version__,
            }
        atomic_write(self.agent_path, json.dumps(info, indent=1, sort_keys=True).encode())

    def _install_trust_root(self, given: Path | None) -> None:
        if given is None:
            if not self.trust_path.exists():
                raise StateError(
                    f"no trust root in {self.trust_path}; start once with --trust-root ROOT.json"
                )
            return
        try:
            new = TrustRoot.load(given)
        except ProtocolError as exc:
            raise StateError(f"--trust-root: {exc}") from exc
        if not self.trust_path.exists():
            atomic_write(self.trust_path, new.raw)
            log.info("installed trust root version %d from %s", new.version, given)
            return
        current = self.load_trust()
        if current.raw == new.raw or new.version < current.version:
            return  # already installed, or an older root on the command line: keep ours
        try:
            current.verify_successor(new.raw)
        except ProtocolError as exc:
            raise StateError(
                f"--trust-root {given} (version {new.version}) is not a valid successor of the "
                f"installed root (version {current.version}): {exc}"
            ) from exc
        atomic_write(self.trust_path, new.raw)
        log.info("rotated trust root to version %d", new.version)

    def install_trust_chain(self, raws: Sequence[bytes]) -> TrustRoot:
        """Walk newer roots from the installed one (TUF's root update); install the newest.

        Raises ProtocolError (and keeps the installed root) if any link fails to verify.
        """
        current = self.load_trust()
        new = current.update_chain(raws)
        if new.version != current.version:
            atomic_write(self.trust_path, new.raw)
            log.info("trust root rotated from version %d to %d", current.version, new.version)
        return new

    def load_trust(self) -> TrustRoot:
        """The installed trust root."""
        try:
            return TrustRoot.load(self.trust_path)
        except ProtocolError as exc:
            raise StateError(f"installed trust root is unusable: {exc}") from exc

    def read_active(self) -> ActiveState:
        """active.json, or an empty state on first start."""
        try:
            raw = self.active_path.read_bytes()
        except FileNotFoundError:
            return ActiveState()
        try:
            return ActiveState.from_bytes(raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(f"{self.active_path} is corrupt ({exc})") from exc

    def write_active(self, state: ActiveState) -> None:
        """Replace active.json atomically."""
        atomic_write(self.active_path, state.to_bytes())

    def clean_downloads(self) -> None:
        """Drop download leftovers that cannot be resumed (a .part without its .have)."""
        for p in self.downloads.iterdir():
            if (
                p.name.startswith(".")
                or (p.suffix == ".part" and not p.with_suffix(".have").exists())
                or (p.suffix == ".have" and not p.with_suffix(".part").exists())
            ):  # an interrupted atomic write, or half of a resumable pair
                p.unlink(missing_ok=True)
        fsync_dir(self.downloads)

    # -- the install in progress (so a restart resumes or reports it) ----------------------
    def read_install(self) -> dict[str, Any] | None:
        """The interrupted install's record ({"command": ..., "attempts": n}), if any."""
        try:
            obj = json.loads(self.install_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is corrupt; ignoring it", self.install_path)
            self.install_path.unlink(missing_ok=True)
            return None
        return obj if isinstance(obj, dict) and "command" in obj else None

    def write_install(self, command_json: str, attempts: int) -> None:
        atomic_write(
            self.install_path,
            json.dumps({"command": command_json, "attempts": attempts}).encode(),
        )

    def clear_install(self) -> None:
        if self.install_path.exists():
            self.install_path.unlink(missing_ok=True)
            fsync_dir(self.root)
