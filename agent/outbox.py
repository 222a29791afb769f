"""Store-and-forward for telemetry windows: SQLite (WAL), bounded by bytes and age.

A window is committed to disk before it is handed to MQTT, and deleted only when the
broker's PUBACK for it arrives. Acks are queued by the transport's thread and applied by
the agent's loop (`pump`), which also records which message id carries which window: doing
both on one thread means an ack can never overtake its own bookkeeping, and the transport's
locks are never held while ours are (paho calls on_publish under its own mutex).

When the outbox is over its byte limit, windows that were never handed to the broker are
MERGED pairwise (same model; the pair with the fewest windows already merged into it, oldest
first), so a long outage costs time resolution, not data: sketches merge, counts add, and
``merged_windows`` says how many windows one message stands for. Only when nothing can be
merged (or a window is older than ``max_age_s``) are the oldest windows dropped; the count
is carried in the next window's ``dropped_windows`` (a dropped window's own carried count is
owed again, so the sum over delivered windows always equals what was lost). A window that
was already sent once is never merged: the fleet may hold it, and a merge under its seq
would be dropped there as a duplicate.

An outbox file that SQLite cannot read (garbage, truncated) is moved aside as
``outbox.sqlite.corrupt-<unix time>`` and a new one started; ``corrupt_recovered`` counts it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.errors import OutboxError

__all__ = ["MergeFn", "Outbox", "PublishFn"]

log = logging.getLogger(__name__)

#: hands one payload to the transport; returns its message id, or None if not sent
PublishFn = Callable[[bytes], int | None]
#: merges two stored payloads (older, newer) into one, or None when they cannot merge
MergeFn = Callable[[bytes, bytes], bytes | None]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS window (
    seq INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    payload BLOB NOT NULL,
    -- the dropped_windows count this window carries; re-owed if it is dropped itself
    carried_dropped INTEGER NOT NULL DEFAULT 0,
    -- 1 once handed to the broker: never merged after that
    sent INTEGER NOT NULL DEFAULT 0,
    -- windows this row stands for, and what must match to merge two rows (the model)
    merged INTEGER NOT NULL DEFAULT 1,
    mkey TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    """Windows waiting for an acknowledgement, oldest first."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        max_inflight: int = 16,
        clock: Callable[[], float] = time.time,
        merge: MergeFn | None = None,
    ) -> None:
        self.path = Path(path)
        self.merge = merge
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_inflight = max_inflight
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # message id -> seq
        self._acks: collections.deque[int] = collections.deque()
        self.moved_aside: Path | None = None
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if not self.path.exists():
                raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
            self.moved_aside = self._move_aside(exc)
            try:
                self._db = self._open()
                self._set_meta("corrupt_recovered", self._meta("corrupt_recovered") + 1)
            except sqlite3.Error as exc2:
                raise OutboxError(f"cannot open a new outbox {path}: {exc2}") from exc2
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
        self.stream_id = f"{self._meta('stream_id'):016x}"

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            cols = {r[1] for r in db.execute("PRAGMA table_info(window)")}
            for col, decl in (
                ("sent", "INTEGER NOT NULL DEFAULT 0"),
                ("merged", "INTEGER NOT NULL DEFAULT 1"),
                ("mkey", "TEXT"),
            ):
                if col not in cols:  # an outbox written by an older agent
                    db.execute(f"ALTER TABLE window ADD COLUMN {col} {decl}")
            db.execute("SELECT COUNT(*) FROM window").fetchone()
        except BaseException:
            db.close()
            raise
        self._db = db
        # A new outbox starts a new stream: its seq restarts at 0, and the fleet keys
        # duplicates on (device, stream, seq), so a wiped outbox is not taken for a replay.
        if self._meta("stream_id", -1) < 0:
            self._set_meta("stream_id", secrets.randbits(62))
        return db

    def _move_aside(self, exc: Exception) -> Path:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._clock())}")
        log.error("outbox %s is unreadable (%s); moved aside to %s", self.path, exc, aside.name)
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                with contextlib.suppress(OSError):
                    os.replace(side, aside.with_name(aside.name + suffix))
        return aside

    # -- meta ------------------------------------------------------------------------------
    def _meta(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    # -- writing ---------------------------------------------------------------------------
    def add(self, build: Callable[[int, int], bytes], *, merge_key: str | None = None) -> int:
        """Store one window: ``build(seq, dropped_windows)`` makes its bytes. Returns seq.

        The sequence number is persisted in the same transaction, so it increases across
        restarts and a crash never reuses one.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    top = self._db.execute("SELECT MAX(seq) FROM window").fetchone()[0]
                    seq = max(self._meta("next_seq"), (top or -1) + 1)
                    dropped = self._meta("dropped_pending")
                    payload = build(seq, dropped)
                    self._db.execute(
                        "INSERT INTO window(seq, created, payload, carried_dropped, mkey) "
                        "VALUES(?, ?, ?, ?, ?)",
                        (seq, self._clock(), payload, dropped, merge_key),
                    )
                    self._set_meta("next_seq", seq + 1)
                    self._set_meta("dropped_pending", 0)
                    self._enforce_limits(keep=seq)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot store telemetry window: {exc}") from exc
            return seq

    def _enforce_limits(self, *, keep: int) -> None:
        cutoff = self._clock() - self.max_age_s
        doomed = [
            r[0]
            for r in self._db.execute(
                "SELECT seq FROM window WHERE created < ? AND seq != ? ORDER BY seq", (cutoff, keep)
            )
        ]
        total = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM window WHERE created >= ? OR seq = ?",
            (cutoff, keep),
        ).fetchone()[0]
        if total > self.max_bytes and self.merge is not None:
            total = self._merge_until(total, exclude=set(doomed))
        if total > self.max_bytes:
            for seq, size in self._db.execute(
                "SELECT seq, LENGTH(payload) FROM window WHERE (created >= ? OR seq = ?) "
                "AND seq != ? ORDER BY seq",
                (cutoff, keep, keep),
            ).fetchall():
                if total <= self.max_bytes:
                    break
                doomed.append(seq)
                total -= size
        if doomed:
            owed = sum(
                self._db.execute("SELECT carried_dropped FROM window WHERE seq=?", (s,)).fetchone()[
                    0
                ]
                for s in doomed
            )
            self._db.executemany("DELETE FROM window WHERE seq=?", [(s,) for s in doomed])
            pending = self._meta("dropped_pending") + len(doomed) + owed
            self._set_meta("dropped_pending", pending)
            self._set_meta("dropped_total", self._meta("dropped_total") + len(doomed))
            gone = set(doomed)
            self._inflight = {m: s for m, s in self._inflight.items() if s not in gone}
            log.warning("outbox over its limits: dropped %d oldest windows", len(doomed))

    def _merge_until(self, total: int, *, exclude: set[int]) -> int:
        """Merge never-sent windows pairwise until under the byte limit; the new total."""
        assert self.merge is not None
        failed: set[tuple[int, int]] = set()
        while total > self.max_bytes:
            rows = [
                r
                for r in self._db.execute(
                    "SELECT seq, merged, mkey, LENGTH(payload) FROM window "
                    "WHERE sent = 0 AND mkey IS NOT NULL ORDER BY seq"
                ).fetchall()
                if r[0] not in exclude
            ]
            best: tuple[int, int, int] | None = None  # (weight, i, j)
            for i in range(len(rows) - 1):
                a, b = rows[i], rows[i + 1]
                if a[2] != b[2] or (a[0], b[0]) in failed:
                    continue
                weight = a[1] + b[1]
                if best is None or weight < best[0]:
                    best = (weight, i, i + 1)
            if best is None:
                return total
            a, b = rows[best[1]], rows[best[2]]
            pa, ca = self._db.execute(
                "SELECT payload, carried_dropped FROM window WHERE seq=?", (a[0],)
            ).fetchone()
            pb, cb = self._db.execute(
                "SELECT payload, carried_dropped FROM window WHERE seq=?", (b[0],)
            ).fetchone()
            out = self.merge(bytes(pa), bytes(pb))
            if out is None:
                failed.add((a[0], b[0]))
                continue
            self._db.execute(
                "UPDATE window SET payload=?, merged=?, carried_dropped=? WHERE seq=?",
                (out, a[1] + b[1], ca + cb, a[0]),
            )
            self._db.execute("DELETE FROM window WHERE seq=?", (b[0],))
            self._set_meta("merged_total", self._meta("merged_total") + 1)
            total += len(out) - a[3] - b[3]
        return total

    # -- sending ---------------------------------------------------------------------------
    def acked(self, message_id: int) -> None:
        """Called from the transport's thread when a PUBACK arrives (cheap, lock-free)."""
        self._acks.append(message_id)

    def connection_lost(self) -> None:
        """Forget what was in flight: after a reconnect everything unacked is sent again."""
        with self._lock:
            self._inflight.clear()

    def pump(self, publish: PublishFn) -> int:
        """Apply queued acks, then send waiting windows in seq order. Returns how many sent."""
        with self._lock:
            try:
                self._apply_acks()
                room = self.max_inflight - len(self._inflight)
                if room <= 0:
                    return 0
                busy = set(self._inflight.values())
                rows = self._db.execute(
                    "SELECT seq, payload FROM window ORDER BY seq LIMIT ?", (room + len(busy),)
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read outbox: {exc}") from exc
            sent = 0
            newly: list[tuple[int]] = []
            for seq, payload in rows:
                if seq in busy or sent >= room:
                    continue
                mid = publish(bytes(payload))
                if mid is None:
                    break  # not connected: keep the rest on disk
                self._inflight[mid] = seq
                newly.append((seq,))
                sent += 1
            if newly:
                try:
                    self._db.executemany("UPDATE window SET sent=1 WHERE seq=?", newly)
                except sqlite3.Error as exc:
                    raise OutboxError(f"cannot update outbox: {exc}") from exc
            return sent

    def _apply_acks(self) -> None:
        done = []
        while self._acks:
            seq = self._inflight.pop(self._acks.popleft(), None)
            if seq is not None:
                done.append((seq,))
        if done:
            self._db.executemany("DELETE FROM window WHERE seq=?", done)

    def in_flight(self) -> int:
        """Windows handed to the transport and not yet acknowledged (after applying acks)."""
        with self._lock:
            try:
                self._apply_acks()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot update outbox: {exc}") from exc
            return len(self._inflight)

    # -- reading ---------------------------------------------------------------------------
    def seqs(self) -> list[int]:
        """Sequence numbers still waiting for an acknowledgement, in order."""
        with self._lock:
            self._apply_acks()
            return [r[0] for r in self._db.execute("SELECT seq FROM window ORDER BY seq")]

    @property
    def dropped_total(self) -> int:
        with self._lock:
            return self._meta("dropped_total")

    @property
    def dropped_owed(self) -> int:
        """Drops not yet reported in a stored window (the next window will carry them)."""
        with self._lock:
            return self._meta("dropped_pending")

    @property
    def merged_total(self) -> int:
        """Pairwise merges done because the outbox was full (since it was created)."""
        with self._lock:
            return self._meta("merged_total")

    @property
    def corrupt_recovered(self) -> int:
        """How many times an unreadable outbox file was moved aside and replaced."""
        with self._lock:
            return self._meta("corrupt_recovered")

    def close(self) -> None:
        with self._lock:
            self._db.close()
