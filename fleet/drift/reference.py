"""The reference a model version is judged against: its bundle's baseline sketches.

Read from the stored bundle file (the `Bundle` row has the path; it was verified at upload)
and cached by bundle sha256. Baseline sketches are exact (k = rows): they are compared with
k=200 tiles (comparison works across k), never merged with them.
"""

from __future__ import annotations

import contextlib
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from sqlmodel import Session, col, select

from fleet.drift.models import CONFIDENCE_FEATURE
from fleet.drift.tiles import Bank
from fleet.errors import NotFound
from fleet.models import Bundle
from protocol.errors import ProtocolError
from protocol.features import Baseline
from protocol.sketch import FeatureSketch

__all__ = ["BASELINE_PATH", "ReferenceCache", "baseline_bank", "read_baseline"]

BASELINE_PATH = "baseline/sketches.json"
#: a baseline file larger than this is refused (exact sketches of 4,096 rows x 64 features
#: are ~1-2 MB of JSON)
MAX_BASELINE_BYTES = 64 * 1024 * 1024


def read_baseline(path: Path) -> Baseline | None:
    """The bundle's baseline, or None if it has none."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            try:
                member = tar.getmember(BASELINE_PATH)
            except KeyError:
                return None
            if not member.isreg() or member.size > MAX_BASELINE_BYTES:
                return None
            f = tar.extractfile(member)
            if f is None:
                return None
            raw = f.read()
    except (tarfile.TarError, OSError) as exc:
        raise NotFound(f"bundle file {path} cannot be read: {exc}") from exc
    try:
        return Baseline.model_validate_json(raw)
    except ValidationError as exc:
        raise NotFound(f"bundle {path} has an unreadable baseline: {exc}") from exc


def baseline_bank(baseline: Baseline) -> Bank:
    """The baseline as a bank (input sketches, confidence, class histogram)."""
    sketches: dict[str, FeatureSketch] = {}
    for name, wire in baseline.sketches.items():
        try:
            sketches[name] = FeatureSketch.from_wire(wire)
        except ProtocolError:
            continue  # a broken baseline feature is reported as "incompatible" downstream
    if baseline.confidence is not None:
        with contextlib.suppress(ProtocolError):
            sketches[CONFIDENCE_FEATURE] = FeatureSketch.from_wire(baseline.confidence)
    classes = np.asarray(baseline.output_class_counts, dtype=np.int64)
    return Bank(sketches=sketches, classes=classes if classes.size else None, windows=0)


@dataclass(slots=True)
class ReferenceCache:
    """Baseline banks by bundle sha256 (bundles are immutable)."""

    _cache: dict[str, Bank | None]
    _lock: threading.Lock

    @staticmethod
    def create() -> ReferenceCache:
        return ReferenceCache(_cache={}, _lock=threading.Lock())

    def for_version(self, session: Session, name: str, version: int) -> tuple[Bank, str]:
        """(baseline bank, bundle sha256) of a model version; NotFound if none is stored."""
        bundles = session.exec(
            select(Bundle)
            .where(Bundle.model_name == name, Bundle.model_version == version)
            .order_by(col(Bundle.uploaded_at).desc())
        ).all()
        for b in bundles:
            with self._lock:
                if b.sha256 not in self._cache:
                    baseline = read_baseline(Path(b.path)) if Path(b.path).exists() else None
                    self._cache[b.sha256] = baseline_bank(baseline) if baseline else None
                bank = self._cache[b.sha256]
            if bank is not None:
                return bank, b.sha256
        raise NotFound(
            f"no stored bundle of {name} v{version} carries a baseline ({BASELINE_PATH}); "
            "upload one, or compare against a past window"
        )
