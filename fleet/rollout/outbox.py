"""Send what the outbox holds: claim unsent rows, publish each (QoS 1, PUBACK), mark sent.

A row is claimed for ``claim_s`` before it is published, so two fleet processes do not send
the same rows at once; a process that dies after publishing and before marking leaves the
claim to expire, and the row is published again later: the same bytes, the same command id,
which the device treats as the same command. `Command` rows (the device's command history)
are written when a command is first marked sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, insert, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.deployment import CommandPublisher
from fleet.errors import BrokerUnavailable
from fleet.models import Command, utcnow
from fleet.rollout.crash import CrashPoints
from fleet.rollout.store import chunks
from fleet.rollout.table import CommandOutbox
from protocol.errors import ProtocolError
from protocol.messages import DeployCommand, RollbackCommand, decode_command

__all__ = ["OutboxDispatcher"]

log = logging.getLogger(__name__)

#: below this many rows, publish one at a time (and pass a checkpoint after each)
_SEQUENTIAL_MAX = 64


class OutboxDispatcher:
    def __init__(
        self,
        engine: Engine,
        publisher: CommandPublisher,
        *,
        owner: str,
        claim_s: float = 30.0,
        batch_max: int = 20_000,
        concurrency: int = 16,
        crash: CrashPoints | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._owner = owner
        self._claim_s = claim_s
        self._batch_max = batch_max
        self._concurrency = max(1, concurrency)
        self._crash = crash or CrashPoints(None)
        self._clock = clock

    def dispatch(self) -> int:
        """Publish every unsent command this process can claim; returns how many it sent."""
        total = 0
        while True:
            sent, claimed = self._one_batch()
            total += sent
            if claimed < self._batch_max or sent == 0:
                return total

    def _claim(self, session: Session, now: datetime) -> list[Any]:
        ids = sa_select(CommandOutbox.id).where(
            and_(
                col(CommandOutbox.sent_at).is_(None),
                or_(
                    col(CommandOutbox.claimed_until).is_(None),
                    col(CommandOutbox.claimed_until) < now,
                ),
            )
        )
        ids = ids.order_by(col(CommandOutbox.created_at), col(CommandOutbox.id)).limit(
            self._batch_max
        )
        if session.get_bind().dialect.name == "postgresql":
            ids = ids.with_for_update(skip_locked=True)
        candidates = [r[0] for r in session.execute(ids)]
        if not candidates:
            session.rollback()
            return []
        until = now + timedelta(seconds=self._claim_s)
        for part in chunks(candidates):
            # the claim re-checks the condition: a concurrent claimer wins or loses per row
            session.execute(
                update(CommandOutbox)
                .where(
                    and_(
                        col(CommandOutbox.id).in_(part),
                        col(CommandOutbox.sent_at).is_(None),
                        or_(
                            col(CommandOutbox.claimed_until).is_(None),
                            col(CommandOutbox.claimed_until) < now,
                        ),
                    )
                )
                .values(claimed_by=self._owner, claimed_until=until)
                .execution_options(synchronize_session=False)
            )
        session.commit()
        rows: list[Any] = []
        table = CommandOutbox.__table__  # type: ignore[attr-defined]
        for part in chunks(candidates):
            # plain rows, not ORM objects (cheaper by far at 10,000)
            rows.extend(
                session.connection().execute(
                    sa_select(table).where(
                        table.c.id.in_(part),
                        table.c.claimed_by == self._owner,
                        table.c.claimed_until == until,
                    )
                )
            )
        rows.sort(key=lambda r: (r.created_at, r.id))
        return rows

    def _publish(self, row: Any) -> bool:
        try:
            command = decode_command(row.payload.encode())
        except ProtocolError:
            log.exception("outbox row %s does not decode; dropping it", row.id)
            return True
        assert isinstance(command, DeployCommand | RollbackCommand)
        try:
            self._publisher.publish_command(command)
        except BrokerUnavailable as exc:
            log.warning("command %s to %s not sent: %s", row.id, row.device_id, exc.message)
            return False
        return True

    def _publish_many(self, many: Callable[..., Any], rows: list[Any]) -> list[bool]:
        """A publisher with ``publish_commands(commands) -> list[exception | None]`` pipelines
        a whole batch on one client (all published, then every PUBACK awaited)."""
        commands = []
        for row in rows:
            try:
                commands.append(decode_command(row.payload.encode()))
            except ProtocolError:
                log.exception("outbox row %s does not decode; dropping it", row.id)
                commands.append(None)
        results = many([c for c in commands if c is not None])
        it = iter(results)
        ok = []
        for c in commands:
            err = None if c is None else next(it)
            if err is not None:
                log.warning("command %s not sent: %s", c.command_id, err)  # type: ignore[union-attr]
            ok.append(err is None)
        return ok

    def _one_batch(self) -> tuple[int, int]:
        now = self._clock()
        with Session(self._engine) as session:
            rows = self._claim(session, now)
            if not rows:
                return 0, 0
            self._crash.hit("outbox claimed")
            many = getattr(self._publisher, "publish_commands", None)
            if many is not None and len(rows) > _SEQUENTIAL_MAX:
                ok = self._publish_many(many, rows)
                self._crash.hit("published batch")
            elif len(rows) <= _SEQUENTIAL_MAX:
                ok = []
                for row in rows:
                    ok.append(self._publish(row))
                    self._crash.hit("published one")
            else:
                with ThreadPoolExecutor(self._concurrency, thread_name_prefix="outbox") as pool:
                    ok = list(pool.map(self._publish, rows))
                self._crash.hit("published batch")
            sent = [r for r, good in zip(rows, ok, strict=True) if good]
            sent_at = self._clock()
            ids = [r.id for r in sent]
            known: set[str] = set()
            for part in chunks(ids):
                known.update(session.exec(select(Command.id).where(col(Command.id).in_(part))))
                session.execute(
                    update(CommandOutbox)
                    .where(col(CommandOutbox.id).in_(part))
                    .values(
                        sent_at=sent_at,
                        send_count=CommandOutbox.send_count + 1,
                        claimed_by=None,
                        claimed_until=None,
                    )
                    .execution_options(synchronize_session=False)
                )
            new = [
                {
                    "id": r.id,
                    "device_id": r.device_id,
                    "kind": r.kind,
                    "bundle_sha256": r.bundle_sha256,
                    "deployment_id": None,
                    "rollout_id": r.rollout_id,
                    "sent_at": sent_at,
                    "state": "sent",
                    "updated_at": sent_at,
                }
                for r in sent
                if r.id not in known
            ]
            for part in chunks(new):
                session.connection().execute(insert(Command.__table__), list(part))  # type: ignore[attr-defined]
            unsent = [r.id for r, good in zip(rows, ok, strict=True) if not good]
            for part in chunks(unsent):
                # give them back at once: the broker is down, the next round retries
                session.execute(
                    update(CommandOutbox)
                    .where(col(CommandOutbox.id).in_(part))
                    .values(claimed_by=None, claimed_until=None)
                    .execution_options(synchronize_session=False)
                )
            session.commit()
            self._crash.hit("outbox marked sent")
            if unsent:
                log.warning("%d commands wait in the outbox (broker unavailable)", len(unsent))
            return len(sent), len(rows)
