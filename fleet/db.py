"""Database engine and sessions: SQLite (one machine) or PostgreSQL via psycopg (at scale).

The schema is owned by Alembic migrations (fleet/migrations): `migrate` brings a database to
the newest revision (``edgefleet fleet migrate``; ``fleet serve`` runs it at start), and
`schema_diffs` says what the models hold that the database lacks. `create_db` (create_all)
stays for tests and tools that want a scratch database; a test checks that the migrations
produce the same schema (tests/integration/test_scaleout_schema.py).
"""

from __future__ import annotations

import importlib
import logging
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import Depends, Request
from sqlalchemy import MetaData, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, create_engine

from fleet.errors import FleetError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "TABLE_MODULES",
    "MigrationResult",
    "SchemaError",
    "SessionDep",
    "WalCheckpointer",
    "check_schema",
    "create_db",
    "current_revision",
    "get_session",
    "head_revision",
    "load_metadata",
    "make_engine",
    "migrate",
    "render_item",
    "schema_diffs",
]

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
#: a committing connection copies the WAL back into the database once the WAL holds this
#: many pages (SQLite's default is 1,000, 4 MB: under ingest, nearly every commit). The
#: fleet's `WalCheckpointer` does that copying from its own thread well before; this is
#: the bound when it lags or does not run (tools, tests).
SQLITE_AUTOCHECKPOINT_PAGES = 16_384


def _is_memory_sqlite(url: str) -> bool:
    return url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url


def make_engine(url: str, *, echo: bool = False, read_only: bool = False) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE
    (``read_only``: plain deferred BEGIN, for `reader_engine`)."""
    if not url.startswith("sqlite"):
        return create_engine(url, echo=echo, pool_pre_ping=True)
    kwargs: dict[str, Any] = {
        # uvicorn's threadpool and the ingest thread share the pool
        "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    }
    memory = _is_memory_sqlite(url)
    if memory:
        # one connection, or each new connection would see a fresh, empty database
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, echo=echo, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (below): pysqlite's own implicit BEGIN is
        # deferred, and a deferred read that later writes fails with SQLITE_BUSY at once,
        # without waiting, when another connection committed in between.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA wal_autocheckpoint={SQLITE_AUTOCHECKPOINT_PAGES}")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


class WalCheckpointer:
    """Copies a SQLite database's write-ahead log back into the database file from a
    thread of its own, every ``interval_s``.

    Left to SQLite, the committing connection does it (auto-checkpoint): under ingest that
    was the ingest thread, nearly every commit, ~25 us per 9 KB window it stored, while
    the MQTT thread waited for the GIL. A PASSIVE checkpoint never waits for readers or
    writers: it copies what it can and the next one continues. Several fleet processes on
    one database each run one; SQLite lets one checkpoint run at a time and the others
    return at once. Does nothing for PostgreSQL or an in-memory database.
    """

    def __init__(self, engine: Engine, *, interval_s: float = 0.25) -> None:
        url = engine.url
        self._path = (
            url.database
            if engine.dialect.name == "sqlite"
            and url.database
            and not _is_memory_sqlite(url.render_as_string())
            else None
        )
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: checkpoints that ran, and the last error (for tests and logs)
        self.runs = 0
        self.last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def start(self) -> None:
        if self._path is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        assert self._path is not None
        conn: sqlite3.Connection | None = None
        while not self._stop.wait(self._interval_s):
            try:
                if conn is None:
                    # mode=rw: never create a database file that is not there
                    uri = f"file:{urllib.parse.quote(self._path)}?mode=rw"
                    conn = sqlite3.connect(uri, uri=True, timeout=1.0)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.runs += 1
                self.last_error = None
            except sqlite3.Error as exc:  # busy, or the file is gone: try again later
                if self.last_error is None:
                    log.warning("WAL checkpoint of %s failed: %s", self._path, exc)
                self.last_error = str(exc)
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()


def reader_engine(engine: Engine) -> Engine:
    """An engine for long reads that must not hold SQLite's write lock (same database).

    Every transaction on a SQLite engine from `make_engine` begins IMMEDIATE (it holds the
    write lock from its first statement: a read that later writes cannot fail with
    SQLITE_BUSY). A background job that reads a lot and computes before it writes (the
    drift tiler) reads through this one instead: a deferred transaction on a WAL database
    reads a snapshot and never blocks ingest. Other databases (and in-memory SQLite, one
    connection) get ``engine`` itself.
    """
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name != "sqlite" or _is_memory_sqlite(url):
        return engine
    return make_engine(url, read_only=True)


def create_db(engine: Engine) -> None:
    """Create every table that does not exist yet (tests and scratch databases; a served
    database is brought up to date by `migrate`, which builds the same schema)."""
    from fleet import models  # noqa: F401 - registers the tables on SQLModel.metadata

    SQLModel.metadata.create_all(engine)


# -- migrations (Alembic) -------------------------------------------------------------------

#: every module that defines a table (``table=True``); `load_metadata` imports them all, so
#: autogenerate and `schema_diffs` see every table. A new module with tables goes here (a
#: test fails, naming the module, when one is missing).
TABLE_MODULES: Final = (
    "fleet.models",
    "fleet.rollout.table",
    "fleet.drift.models",
    "fleet.auth",
    "fleet.audit",
    "fleet.enroll",
    "fleet.trust_store",
    "fleet.quality.models",
)
#: pg_advisory_xact_lock key held while migrating: "EFMIGRAT" in ASCII, our own constant
MIGRATION_LOCK_KEY: Final = 0x45464D4947524154
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
#: tables the database may hold that the models do not describe
_FOREIGN_TABLES: Final = frozenset({"alembic_version"})


class SchemaError(FleetError):
    """The database's schema is not the one this fleet version needs."""

    code = "schema_out_of_date"


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationResult:
    """What `migrate` did: the revision before (None: empty or unversioned) and after."""

    before: str | None
    after: str | None
    #: the database had every table (create_all, before migrations) and was stamped head
    adopted: bool = False

    @property
    def changed(self) -> bool:
        return self.before != self.after


def load_metadata() -> MetaData:
    """SQLModel's metadata with every fleet table registered on it."""
    for name in TABLE_MODULES:
        importlib.import_module(name)
    return SQLModel.metadata


def render_item(type_: str, obj: Any, _autogen_context: Any) -> Any:
    """Alembic hook: write our column types as plain SQLAlchemy types in revisions, so a
    revision never imports the models (which change after it was written)."""
    if type_ != "type":
        return False
    from sqlmodel.sql.sqltypes import AutoString

    from fleet.models import UTCDateTime

    if isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision this code knows."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(_alembic_config()).get_heads()
    if len(heads) != 1:
        raise SchemaError(
            f"the migrations have {len(heads)} heads ({', '.join(heads)}); two revisions "
            "name the same parent: merge them (alembic merge) or re-parent the newer one"
        )
    return heads[0]


def current_revision(connection: Connection) -> str | None:
    """The revision the database was migrated to (None: empty or made by create_all)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def schema_diffs(connection: Connection, metadata: MetaData | None = None) -> list[str]:
    """What differs between the models (or ``metadata``) and the database, one readable line
    each (empty: the same schema): tables, columns, types, nullability, indexes, unique
    constraints and foreign keys."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "include_object": lambda obj, name, kind, _r, _c: (
                not (kind == "table" and name in _FOREIGN_TABLES)
            ),
        },
    )
    target = metadata if metadata is not None else load_metadata()
    return [_describe(d) for d in _flatten(compare_metadata(ctx, target))]


def _flatten(diffs: list[Any]) -> Iterator[Any]:
    for d in diffs:
        if isinstance(d, list):  # column modifications come grouped per column
            yield from d
        else:
            yield d


def _describe(diff: Any) -> str:
    kind = diff[0]
    if kind == "add_table":
        return (
            f"table {diff[1].name!r} is in the models but no migration creates it: add a "
            "revision (docs/scaling.md, Migrations)"
        )
    if kind == "remove_table":
        return f"table {diff[1].name!r} is in the database but not in the models"
    if kind in ("add_column", "remove_column"):
        where = "models" if kind == "add_column" else "database"
        other = "the database" if kind == "add_column" else "the models"
        return f"column {diff[2]}.{diff[3].name} is in the {where} but not in {other}"
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        obj = diff[1]
        table = getattr(getattr(obj, "table", None), "name", "?")
        where = "models" if kind.startswith("add") else "database"
        return f"{kind.split('_')[1]} {obj.name!r} on {table!r} is only in the {where}"
    if kind.startswith("modify_"):
        # ("modify_type", schema, table, column, info, old (database), new (models))
        return (
            f"column {diff[2]}.{diff[3]}: {kind[7:]} is {diff[5]!r} in the database, "
            f"{diff[6]!r} in the models"
        )
    return repr(diff)


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})


def migrate(target: str | Engine, *, revision: str = "head") -> MigrationResult:
    """Bring the database at ``target`` (URL or engine) to ``revision``, in one transaction.

    A database made by `create_db` before migrations existed is adopted (stamped head) when
    its schema equals the models'; otherwise it is refused with the differences.
    """
    from alembic import command

    engine = make_engine(target) if isinstance(target, str) else target
    try:
        with engine.connect() as conn, conn.begin():
            _lock(conn)  # processes starting together migrate one after the other
            before = current_revision(conn)
            cfg = _alembic_config(conn)
            names = set(inspect(conn).get_table_names()) - _FOREIGN_TABLES
            if before is None and names:
                diffs = schema_diffs(conn)
                if diffs:
                    raise SchemaError(
                        "the database has fleet tables but no migration history, and they "
                        "differ from this version's models: "
                        + "; ".join(diffs)
                        + " (back it up, then start from an empty database)"
                    )
                command.stamp(cfg, "head")
                return MigrationResult(before=None, after=current_revision(conn), adopted=True)
            command.upgrade(cfg, revision)
            return MigrationResult(before=before, after=current_revision(conn))
    finally:
        if isinstance(target, str):
            engine.dispose()


def check_schema(engine: Engine) -> str:
    """The database's revision if it is head; else SchemaError saying what to run."""
    head = head_revision()
    with engine.connect() as conn:
        have = current_revision(conn)
    if have != head:
        raise SchemaError(
            f"the database schema is at revision {have or 'none (empty or unversioned)'}, "
            f"this fleet needs {head}: run `edgefleet fleet migrate --db <url>` (or start "
            "`fleet serve` without --no-migrate)"
        )
    return have


def get_session(request: Request) -> Iterator[Session]:
    """FastAPI dependency: one session per request, on the app's engine."""
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
