"""Store-and-forward for telemetry windows: SQLite (WAL), bounded by bytes and age.

A window is committed to disk before it is handed to MQTT, and deleted only when the
broker's PUBACK for it arrives. Acks are queued by the transport's thread and applied by
the agent's loop (`pump`), which also records which message id carries which window: doing
both on one thread means an ack can never overtake its own bookkeeping, and the transport's
locks are never held while ours are (paho calls on_publish under its own mutex).

When the outbox is over its limits the oldest windows are dropped and the count is carried
in the next window's ``dropped_windows`` (a dropped window's own carried count is owed
again, so the sum over delivered windows always equals what was lost). Merging old windows
instead of dropping them is left for later.
"""

from __future__ import annotations

import collections
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.errors import OutboxError

__all__ = ["Outbox", "PublishFn"]

log = logging.getLogger(__name__)

#: hands one payload to the transport; returns its message id, or None if not sent
PublishFn = Callable[[bytes], int | None]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS window (
    seq INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    payload BLOB NOT NULL,
    -- the dropped_windows count this window carries; re-owed if it is dropped itself
    carried_dropped INTEGER NOT NULL DEFAULT 0
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
    ) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_inflight = max_inflight
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # message id -> seq
        self._acks: collections.deque[int] = collections.deque()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            # A new outbox starts a new stream: its seq restarts at 0, and the fleet keys
            # duplicates on (device, stream, seq), so a wiped outbox is not taken for a replay.
            if self._meta("stream_id", -1) < 0:
                self._set_meta("stream_id", secrets.randbits(62))
            self.stream_id = f"{self._meta('stream_id'):016x}"
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {path}: {exc}") from exc

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
    def add(self, build: Callable[[int, int], bytes]) -> int:
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
                        "INSERT INTO window(seq, created, payload, carried_dropped) "
                        "VALUES(?, ?, ?, ?)",
                        (seq, self._clock(), payload, dropped),
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
            for seq, payload in rows:
                if seq in busy or sent >= room:
                    continue
                mid = publish(bytes(payload))
                if mid is None:
                    break  # not connected: keep the rest on disk
                self._inflight[mid] = seq
                sent += 1
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

    def close(self) -> None:
        with self._lock:
            self._db.close()
