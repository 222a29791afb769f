"""The two model slots (``slots/a``, ``slots/b``) and the staging area a bundle lands in.

A new bundle is extracted into ``slots/.incoming`` and only moved into the inactive slot
once it loaded and passed its self-test, so a refused or broken bundle never destroys the
rollback target that the inactive slot holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from agent.errors import StateError
from agent.fsio import atomic_write, fsync_dir
from protocol.errors import ProtocolError
from protocol.manifest import BundleManifest, parse_manifest

__all__ = ["SLOT_NAMES", "SlotRecord", "SlotStore"]

SLOT_NAMES: Final = ("a", "b")
_INCOMING: Final = ".incoming"
_TRASH: Final = ".trash"
_RECORD: Final = "slot.json"
_MANIFEST: Final = "manifest.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotRecord:
    """What one slot holds: a verified bundle's identity (written after verification)."""

    bundle_sha256: str
    bundle_size: int
    model_name: str
    model_version: int
    installed_at: str


class SlotStore:
    """Files of the slots directory; every rename is followed by an fsync of the directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def prepare(self) -> None:
        """Create the slot directories and drop leftovers of an interrupted install."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in SLOT_NAMES:
            (self.root / name).mkdir(exist_ok=True)
        for leftover in (_INCOMING, _TRASH):
            shutil.rmtree(self.root / leftover, ignore_errors=True)
        fsync_dir(self.root)

    def path(self, name: str) -> Path:
        if name not in SLOT_NAMES:
            raise StateError(f"unknown slot {name!r}; slots are {SLOT_NAMES}")
        return self.root / name

    @staticmethod
    def other(name: str | None) -> str:
        """The slot that is not ``name`` (slot 'a' when nothing is active)."""
        return "b" if name == "a" else "a"

    def record(self, name: str) -> SlotRecord | None:
        """The slot's record, or None when the slot is empty or incomplete."""
        try:
            raw = json.loads((self.path(name) / _RECORD).read_bytes())
            return SlotRecord(**raw)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise StateError(f"slot {name}: {_RECORD} is corrupt ({exc}); remove the slot") from exc

    def manifest(self, name: str) -> BundleManifest:
        """The manifest of the bundle in a slot (verified when the bundle was installed)."""
        try:
            return parse_manifest((self.path(name) / _MANIFEST).read_bytes())
        except (OSError, ProtocolError) as exc:
            raise StateError(f"slot {name}: cannot read its manifest: {exc}") from exc

    def find(self, bundle_sha256: str) -> str | None:
        """The slot holding this bundle, if any."""
        for name in SLOT_NAMES:
            rec = self.record(name)
            if rec is not None and rec.bundle_sha256 == bundle_sha256:
                return name
        return None

    def staging(self) -> Path:
        """An empty staging directory to extract a bundle into."""
        incoming = self.root / _INCOMING
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        return incoming

    def discard_staging(self) -> None:
        shutil.rmtree(self.root / _INCOMING, ignore_errors=True)

    def verify_files(self, name: str) -> str | None:
        """Re-hash a slot's files against its manifest: None if intact, else what is wrong.

        Catches bytes changed on disk after install (flash wear, a bad write, tampering), so
        a damaged model is never served, however well it still loads.
        """
        root = self.path(name)
        for entry in self.manifest(name).files:
            path = root / entry.path
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while block := f.read(1024 * 1024):
                        h.update(block)
            except OSError as exc:
                return f"slot {name}: {entry.path} unreadable ({exc.strerror or exc})"
            if h.hexdigest() != entry.sha256:
                return (
                    f"slot {name}: {entry.path} has sha256 {h.hexdigest()[:16]}..., its manifest "
                    f"says {entry.sha256[:16]}... (changed on disk after install)"
                )
        return None

    def promote(
        self,
        name: str,
        record: SlotRecord,
        manifest_raw: bytes,
        *,
        between: Callable[[], None] | None = None,
    ) -> Path:
        """Move the staged bundle into slot ``name``, replacing what it held.

        ``between`` runs after the old content left and before the new one arrived (a
        crash-test hook: the slot is briefly empty, and a restart must cope).
        """
        incoming = self.root / _INCOMING
        atomic_write(incoming / _MANIFEST, manifest_raw)
        atomic_write(incoming / _RECORD, json.dumps(asdict(record), sort_keys=True).encode())
        target = self.path(name)
        trash = self.root / _TRASH
        shutil.rmtree(trash, ignore_errors=True)
        if target.exists():
            os.replace(target, trash)
        if between is not None:
            between()
        os.replace(incoming, target)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return target
