"""Tiles: device windows merged per (model, version, cohort, feature, time bucket).

Why a periodic tiler and not a hook in ingest: ingest writes a telemetry window in one
INSERT (the raw window JSON is kept); merging its 64 sketches into tile rows there would add
a read-modify-write of 64+ rows per window to the ingest transaction. The tiler instead
reads new telemetry rows by id (a cursor in `drift_cursor`) every tick, merges all windows
of one bucket in memory (raw values in one vectorised update, see `fleet.drift.wire`) and
writes each tile once per tick. Ingest pays nothing; tiles lag by at most one tick.

A window's time is ``min(window_end, received_at)`` (a device clock in the future cannot
push data into tomorrow's tile). Rows younger than ``grace_s`` wait for the next tick, so a
transaction that got a smaller id but committed later is still picked up (if it commits
within the grace period; a slower one is missed and logged as a gap in the cursor's ids).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet.drift.models import CLASSES_FEATURE, CONFIDENCE_FEATURE, DriftCursor, DriftTile
from fleet.drift.wire import PackBatch, SketchAccumulator
from fleet.models import TelemetryRecord, utcnow
from protocol.errors import SketchError
from protocol.sketch import FeatureSketch, SketchWire

__all__ = [
    "Bank",
    "TileStats",
    "bank_from_windows",
    "bucket_of",
    "claim_drift_lease",
    "read_tiles",
    "tile_new_telemetry",
]

log = logging.getLogger(__name__)
CURSOR = "telemetry"
MAX_CLASSES = 4096


@dataclass(slots=True)
class Bank:
    """Merged current data of one scope: numeric sketches and the class histogram."""

    sketches: dict[str, FeatureSketch] = field(default_factory=dict)
    classes: np.ndarray | None = None
    windows: int = 0

    @property
    def inputs(self) -> dict[str, FeatureSketch]:
        return {k: v for k, v in self.sketches.items() if not k.startswith("__")}


@dataclass(slots=True)
class _Builder:
    """Accumulates windows of one scope before one merge per feature."""

    accs: dict[str, SketchAccumulator] = field(default_factory=dict)
    packs: PackBatch = field(default_factory=PackBatch)
    classes: np.ndarray | None = None
    windows: int = 0
    rejected: int = 0

    def add_window(
        self, window: dict[str, Any], where: str = "a window", pack: bytes | None = None
    ) -> None:
        """One stored window: its JSON and, if it came in a frame, its pack's bytes."""
        self.windows += 1
        if pack or window.get("input_pack"):
            self.packs.add(pack or window["input_pack"], where)
        sketches = dict(window.get("input_sketches") or {})
        if window.get("confidence"):
            sketches[CONFIDENCE_FEATURE] = window["confidence"]
        for name, wire in sketches.items():
            acc = self.accs.get(name)
            if acc is None:
                acc = self.accs[name] = SketchAccumulator()
            if not isinstance(wire, dict) or not acc.add_wire(wire):
                self.rejected += 1
        counts = window.get("output_class_counts") or []
        if counts:
            arr = np.asarray(counts[:MAX_CLASSES], dtype=np.int64).clip(min=0)
            self.add_classes(arr)

    def add_classes(self, arr: np.ndarray) -> None:
        if self.classes is None:
            self.classes = arr.copy()
            return
        if arr.size > self.classes.size:
            self.classes = np.pad(self.classes, (0, arr.size - self.classes.size))
        self.classes[: arr.size] += arr

    def merge_packs(self) -> None:
        """Fold the collected packs into the accumulators (one vectorised pass)."""
        self.rejected += self.packs.rejected
        self.packs.rejected = 0
        self.rejected += self.packs.merge_into(self.accs)

    def bank(self) -> Bank:
        self.merge_packs()
        return Bank(
            sketches={k: a.sketch() for k, a in self.accs.items() if a.windows},
            classes=self.classes,
            windows=self.windows,
        )


def bank_from_windows(windows: Iterable[tuple[dict[str, Any], bytes | None]]) -> Bank:
    """Merge stored telemetry windows into one bank: (``TelemetryRecord.window`` JSON,
    ``TelemetryRecord.input_pack``) pairs."""
    b = _Builder()
    for window, pack in windows:
        b.add_window(window, pack=pack)
    return b.bank()


def bucket_of(t: datetime, tile_s: int) -> datetime:
    """The start of the tile that holds time ``t``."""
    epoch = int(t.timestamp())
    return datetime.fromtimestamp(epoch - epoch % tile_s, tz=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class TileStats:
    rows: int
    tiles_written: int
    rejected_sketches: int
    last_id: int


def claim_drift_lease(session: Session, owner: str, now: datetime, lease_s: float) -> bool:
    """Take (or extend) the drift lease if it is free, ours or expired; commits.

    The lease lives on the tiler's cursor row (created here, by whoever comes first).
    """
    if session.get(DriftCursor, CURSOR) is None:
        try:
            session.add(DriftCursor(name=CURSOR, last_id=0, updated_at=now))
            session.commit()
        except IntegrityError:  # another process created it first
            session.rollback()
    table = DriftCursor.__table__  # type: ignore[attr-defined]
    result = session.execute(
        update(DriftCursor)
        .where(
            col(DriftCursor.name) == CURSOR,
            or_(
                table.c.owner.is_(None),
                table.c.owner == owner,
                table.c.lease_expires_at < now,
            ),
        )
        .values(owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def tile_new_telemetry(
    session: Session,
    *,
    tile_s: int,
    grace_s: float = 5.0,
    batch_rows: int = 2000,
    now: datetime | None = None,
    reader: Session | None = None,
) -> TileStats:
    """Merge telemetry rows newer than the cursor into tiles; commits. One batch per call.

    ``reader``: a session for the reads that takes no write lock (SQLite: a deferred
    transaction on a WAL database). Rows are read and merged there, outside any write
    transaction, so ingest never waits for the merge; the write transaction on
    ``session`` is short. It locks the cursor row and writes only if the cursor has not
    moved since the read: another fleet process that tiled the same rows first wins, and
    this batch is dropped, never counted twice.
    """
    now = now or utcnow()
    src = reader or session
    start = src.get(DriftCursor, CURSOR)
    start_id = start.last_id if start is not None else 0
    rows = src.exec(
        select(  # type: ignore[call-overload]  # sqlmodel types up to 4 columns
            TelemetryRecord.id,
            TelemetryRecord.device_id,
            TelemetryRecord.model_name,
            TelemetryRecord.model_version,
            TelemetryRecord.window_end,
            TelemetryRecord.received_at,
            TelemetryRecord.window,
            TelemetryRecord.input_pack,
        )
        .where(
            col(TelemetryRecord.id) > start_id,
            col(TelemetryRecord.received_at) <= now - timedelta(seconds=grace_s),
        )
        .order_by(col(TelemetryRecord.id))
        .limit(batch_rows)
    ).all()
    if reader is not None:
        reader.rollback()  # end the read snapshot
    groups: dict[tuple[str, int, datetime], _Builder] = defaultdict(_Builder)
    last_id = start_id
    for row_id, device_id, name, version, end, received, window, pack in rows:
        last_id = max(last_id, int(row_id))
        if not name or version is None or not isinstance(window, dict):
            continue
        t = min(end, received) if received is not None else end
        where = f"telemetry row {row_id} from {device_id}"
        groups[(name, int(version), bucket_of(t, tile_s))].add_window(window, where, pack)
    merged: dict[tuple[str, int, datetime], dict[str, FeatureSketch]] = {}
    rejected = 0
    for key, builder in groups.items():
        for error in builder.packs.errors:
            log.warning("drift tiler skipped a sketch pack: %s", error)
        builder.merge_packs()
        rejected += builder.rejected
        merged[key] = {f: acc.sketch() for f, acc in builder.accs.items() if acc.windows}
    # the write: short, and only if nobody tiled these rows meanwhile
    cursor = session.get(DriftCursor, CURSOR, with_for_update=True)
    if (cursor.last_id if cursor is not None else 0) != start_id:
        session.rollback()
        log.info("drift tiler: another process tiled rows after id %d first", start_id)
        return TileStats(rows=0, tiles_written=0, rejected_sketches=0, last_id=start_id)
    cursor = cursor or DriftCursor(name=CURSOR, last_id=0)
    written = 0
    for (name, version, bucket), builder in groups.items():
        written += _write_tiles(
            session, name, version, bucket, tile_s, builder, merged[(name, version, bucket)], now
        )
    if rows:
        cursor.last_id = last_id
        cursor.updated_at = now
        session.add(cursor)
    session.commit()
    if rejected:
        log.warning("tiler skipped %d unusable sketches in %d rows", rejected, len(rows))
    return TileStats(
        rows=len(rows), tiles_written=written, rejected_sketches=rejected, last_id=last_id
    )


def _write_tiles(
    session: Session,
    name: str,
    version: int,
    bucket: datetime,
    tile_s: int,
    builder: _Builder,
    sketches: dict[str, FeatureSketch],
    now: datetime,
) -> int:
    existing = {
        t.feature: t
        for t in session.exec(
            select(DriftTile).where(
                DriftTile.model_name == name,
                DriftTile.model_version == version,
                DriftTile.cohort == "all",
                DriftTile.bucket_start == bucket,
            )
        )
    }
    n = 0
    for feature, merged in sketches.items():
        acc = builder.accs[feature]
        tile = existing.get(feature)
        if tile is not None and tile.sketch:
            try:
                old = FeatureSketch.from_wire(SketchWire.model_validate(tile.sketch))
                old.merge(merged)  # carries both NaN counts
                merged = old
            except (SketchError, ValueError):
                log.warning(
                    "tile %s/%s/%s unreadable; rebuilt from new data", name, feature, bucket
                )
        tile = tile or DriftTile(
            model_name=name,
            model_version=version,
            feature=feature,
            bucket_start=bucket,
            bucket_s=tile_s,
        )
        tile.sketch = merged.to_wire().model_dump(mode="json")
        tile.count, tile.nan_count = merged.count, merged.nan_count
        tile.windows += acc.windows
        tile.updated_at = now
        session.add(tile)
        n += 1
    if builder.classes is not None:
        tile = existing.get(CLASSES_FEATURE) or DriftTile(
            model_name=name,
            model_version=version,
            feature=CLASSES_FEATURE,
            kind="classes",
            bucket_start=bucket,
            bucket_s=tile_s,
        )
        old = np.asarray(tile.class_counts or [], dtype=np.int64)
        b = _Builder(classes=old if old.size else None)
        b.add_classes(builder.classes)
        assert b.classes is not None
        tile.class_counts = [int(x) for x in b.classes]
        tile.count = int(b.classes.sum())
        tile.windows += builder.windows
        tile.updated_at = now
        session.add(tile)
        n += 1
    return n


def read_tiles(
    session: Session, name: str, version: int, start: datetime, end: datetime, cohort: str = "all"
) -> Bank:
    """Merge every tile of one model version whose bucket starts in [start, end)."""
    tiles = session.exec(
        select(DriftTile).where(
            DriftTile.model_name == name,
            DriftTile.model_version == version,
            DriftTile.cohort == cohort,
            col(DriftTile.bucket_start) >= start,
            col(DriftTile.bucket_start) < end,
        )
    ).all()
    accs: dict[str, SketchAccumulator] = {}
    b = _Builder()
    windows: dict[str, int] = defaultdict(int)
    for t in tiles:
        windows[t.feature] += t.windows
        if t.kind == "classes":
            if t.class_counts:
                b.add_classes(np.asarray(t.class_counts, dtype=np.int64))
            continue
        if not t.sketch:
            continue
        try:
            s = FeatureSketch.from_wire(SketchWire.model_validate(t.sketch))
        except (SketchError, ValueError):
            continue
        accs.setdefault(t.feature, SketchAccumulator(k=s.k)).add_sketch(s)
    return Bank(
        sketches={k: a.sketch() for k, a in accs.items()},
        classes=b.classes,
        # device windows merged (the best-covered feature's count)
        windows=max(windows.values(), default=0),
    )
