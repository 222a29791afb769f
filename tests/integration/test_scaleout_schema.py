"""The Alembic migrations build exactly the schema the models describe, on SQLite and on
PostgreSQL; `edgefleet fleet migrate` and `fleet serve --no-migrate` say what to do.

When one of these fails after you added or changed a table: write a revision (docs/scaling.md,
"Migrations"); the failure names each table or column the migrations lack.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from fleet.db import (
    TABLE_MODULES,
    create_db,
    current_revision,
    head_revision,
    load_metadata,
    make_engine,
    migrate,
    schema_diffs,
)

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return str(request.getfixturevalue("pg_url"))


def _engine(url: str) -> Engine:
    return make_engine(url)


def _table_modules_in_source() -> set[str]:
    """Every fleet module whose source defines a ``table=True`` class."""
    found = set()
    for path in (ROOT / "fleet").rglob("*.py"):
        if "migrations" in path.parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                kw.arg == "table" and isinstance(kw.value, ast.Constant) and kw.value.value
                for kw in node.keywords
            ):
                rel = path.relative_to(ROOT).with_suffix("")
                found.add(".".join(rel.parts))
    return found


def test_every_module_with_tables_is_listed_for_migrations() -> None:
    missing = _table_modules_in_source() - set(TABLE_MODULES)
    assert not missing, (
        f"{sorted(missing)} define tables but are not in fleet.db.TABLE_MODULES: add them "
        "there, so autogenerate and the schema check see their tables, then add a revision"
    )


def test_migrations_build_the_models_schema(empty_db: str) -> None:
    result = migrate(empty_db)
    assert (result.before, result.after) == (None, head_revision())
    engine = _engine(empty_db)
    try:
        with engine.connect() as conn:
            diffs = schema_diffs(conn)
            assert diffs == [], "the migrations do not build the models' schema:\n" + "\n".join(
                diffs
            )
            assert current_revision(conn) == head_revision()
        # a second run has nothing to do
        again = migrate(engine)
        assert not again.changed
    finally:
        engine.dispose()


def test_audit_log_is_append_only_after_migrating(empty_db: str) -> None:
    """The triggers autogenerate cannot see are in the revision too."""
    migrate(empty_db)
    engine = _engine(empty_db)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO audit_log (seq, at, actor, action, before, after, prev_hash, "
                    "hash) VALUES (1, :at, 'test', 'x', 'null', 'null', 'p', 'h')"
                ),
                {"at": "2026-01-01 00:00:00"},
            )
        for sql in ("UPDATE audit_log SET actor = 'evil'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(sql))
    finally:
        engine.dispose()


def test_a_table_without_a_migration_is_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    migrate(url)
    models = MetaData()
    for table in load_metadata().sorted_tables:
        table.to_metadata(models)
    Table("quality_score", models, Column("id", Integer, primary_key=True))
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            diffs = schema_diffs(conn, models)
    finally:
        engine.dispose()
    assert len(diffs) == 1
    assert "'quality_score'" in diffs[0] and "no migration creates it" in diffs[0]


def test_a_database_made_by_create_all_is_adopted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    engine = _engine(url)
    try:
        load_metadata()
        create_db(engine)
        result = migrate(engine)
        assert result.adopted and result.after == head_revision()
        assert not migrate(engine).changed
    finally:
        engine.dispose()


def test_processes_migrating_at_once_all_succeed(pg_url: str) -> None:
    """Fleet processes that start together each run `migrate`: the advisory lock queues them."""
    results: list[object] = []

    def one() -> None:
        try:
            results.append(migrate(pg_url))
        except Exception as exc:  # collected, asserted below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(not isinstance(r, Exception) for r in results), results
    assert sum(r.changed for r in results) == 1  # type: ignore[attr-defined]


def test_cli_migrate_and_serve_without_migrating(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    refused = subprocess.run(
        [*EDGEFLEET, "fleet", "serve", "--no-migrate", "--db", url,
         "--trust-root", str(tmp_path / "absent.json"), "--port", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "edgefleet fleet migrate" in refused.stderr
    done = subprocess.run(
        [*EDGEFLEET, "fleet", "migrate", "--db", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"to {head_revision()}" in done.stdout
    check = subprocess.run(
        [*EDGEFLEET, "fleet", "migrate", "--check", "--db", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
