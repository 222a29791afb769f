"""The audit log: every change to the fleet, append-only and hash-chained.

Each row stores ``hash = sha256(prev_hash + canonical(row))`` where ``canonical`` is the
canonical JSON of its fields (seq, at, actor, action, target, bundle_sha256, before,
after). Changing, inserting or deleting any row in the middle breaks every later hash, and
`verify_chain` (``edgefleet fleet audit verify``) names the first bad row. Cutting rows off
the end is not visible from the chain alone: keep the head hash `verify_chain` prints
somewhere else (a ticket, a log shipper) and compare.

Rows are numbered 1, 2, 3... (``seq`` is the primary key), so two writers can never both
append after the same row: one of them fails instead of forking the chain. On SQLite every
transaction is BEGIN IMMEDIATE (fleet/db.py), on PostgreSQL `record` takes a transaction-
scoped advisory lock, so writers queue instead of failing. The database also refuses
UPDATE and DELETE on the table (triggers), so the log is append-only below the application.

Call `record` inside the transaction that makes the change, before its commit: the change
and its audit row then commit together or not at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query
from sqlalchemy import DDL, JSON, BigInteger, event, text
from sqlmodel import Field, Session, SQLModel, col, func, select

from fleet.db import SessionDep
from fleet.models import UTCDateTime, utcnow
from protocol.canonical import canonical_bytes

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "AuditReport",
    "audit_router",
    "entry_hash",
    "record",
    "verify_chain",
]

GENESIS_HASH: Final = "0" * 64
#: pg_advisory_xact_lock key: "EFAUDIT" in ASCII, an arbitrary constant of our own
_PG_LOCK_KEY: Final = 0x45464155444954


class AuditEntry(SQLModel, table=True):
    """One change: who (a token's name), what, when, before and after, bundle hash."""

    __tablename__ = "audit_log"
    seq: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    at: datetime = Field(sa_type=UTCDateTime)
    actor: str = Field(max_length=64)
    action: str = Field(max_length=64, index=True)
    target: str | None = Field(default=None, max_length=256)
    bundle_sha256: str | None = Field(default=None, max_length=64, index=True)
    before: Any = Field(default=None, sa_type=JSON)
    after: Any = Field(default=None, sa_type=JSON)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


# Append-only below the application: the database itself refuses UPDATE and DELETE.
for _op in ("UPDATE", "DELETE"):
    event.listen(
        AuditEntry.__table__,  # type: ignore[attr-defined]
        "after_create",
        DDL(
            f"CREATE TRIGGER audit_log_no_{_op.lower()} BEFORE {_op} ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
        ).execute_if(dialect="sqlite"),
    )
event.listen(
    AuditEntry.__table__,  # type: ignore[attr-defined]
    "after_create",
    DDL(
        "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$ LANGUAGE plpgsql; "
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    ).execute_if(dialect="postgresql"),
)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def entry_hash(prev_hash: str, entry: AuditEntry) -> str:
    """sha256(prev_hash + canonical JSON of the row's content), hex."""
    content = {
        "seq": entry.seq,
        "at": _iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "bundle_sha256": entry.bundle_sha256,
        "before": entry.before,
        "after": entry.after,
    }
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_bytes(content)).hexdigest()


def record(
    session: Session,
    actor: str,
    action: str,
    before: Any = None,
    after: Any = None,
    bundle_sha256: str | None = None,
    *,
    target: str | None = None,
) -> AuditEntry:
    """Append one row to the chain in ``session``'s transaction (the caller commits).

    ``before``/``after`` are JSON-able (dicts of the changed fields); ``action`` is a dotted
    verb such as ``bundle.upload``, ``deployment.create``, ``rollout.advance``.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.exec(text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=_PG_LOCK_KEY))  # type: ignore[call-overload]
    head = session.exec(
        select(AuditEntry.seq, AuditEntry.hash).order_by(col(AuditEntry.seq).desc()).limit(1)
    ).first()
    seq, prev = (head[0] + 1, head[1]) if head is not None else (1, GENESIS_HASH)
    # JSON round trip now, so the hashed content is exactly what the database returns later
    entry = AuditEntry(
        seq=seq,
        at=utcnow(),
        actor=actor[:64],
        action=action[:64],
        target=None if target is None else target[:256],
        bundle_sha256=bundle_sha256,
        before=_jsonable(before),
        after=_jsonable(after),
        prev_hash=prev,
        hash="",
    )
    entry.hash = entry_hash(prev, entry)
    session.add(entry)
    session.flush()
    return entry


def _jsonable(value: Any) -> Any:
    import json

    if value is None:
        return None
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    ok: bool
    rows: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str = ""


def _rows(session: Session, batch: int = 1000) -> Iterator[AuditEntry]:
    last = 0
    while True:
        rows = session.exec(
            select(AuditEntry)
            .where(AuditEntry.seq > last)
            .order_by(col(AuditEntry.seq))
            .limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify_chain(session: Session) -> AuditReport:
    """Walk the whole log and recompute every hash; report the first row that breaks."""
    prev, expected_seq, n = GENESIS_HASH, 1, 0
    for row in _rows(session):
        if row.seq != expected_seq:
            return AuditReport(
                ok=False, rows=n, head_hash=prev, first_bad_seq=expected_seq,
                problem=f"row {expected_seq} is missing (next row is {row.seq})",
            )  # fmt: skip
        if row.prev_hash != prev:
            return AuditReport(
                ok=False, rows=n, head_hash=prev, first_bad_seq=row.seq,
                problem=f"row {row.seq} does not point at row {row.seq - 1}'s hash",
            )  # fmt: skip
        if entry_hash(prev, row) != row.hash:
            return AuditReport(
                ok=False, rows=n, head_hash=prev, first_bad_seq=row.seq,
                problem=f"row {row.seq} was changed after it was written (hash mismatch)",
            )  # fmt: skip
        prev, expected_seq, n = row.hash, expected_seq + 1, n + 1
    return AuditReport(ok=True, rows=n, head_hash=prev)


def count(session: Session) -> int:
    """How many rows the log holds."""
    return int(session.exec(select(func.count()).select_from(AuditEntry)).one())


# -- routes (admin) -------------------------------------------------------------------------

audit_router = APIRouter(prefix="/api/v1/audit")


@audit_router.get("", response_model=list[AuditEntry])
def get_audit(
    session: SessionDep,
    after_seq: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Audit rows after ``after_seq``, oldest first (admin)."""
    return session.exec(
        select(AuditEntry)
        .where(AuditEntry.seq > after_seq)
        .order_by(col(AuditEntry.seq))
        .limit(limit)
    ).all()


@audit_router.get("/verify")
def get_audit_verify(session: SessionDep) -> dict[str, Any]:
    """Recompute the chain (admin): ok, rows, head hash, and the first bad row if any."""
    report = verify_chain(session)
    return {
        "ok": report.ok,
        "rows": report.rows,
        "head_hash": report.head_hash,
        "first_bad_seq": report.first_bad_seq,
        "problem": report.problem,
    }
