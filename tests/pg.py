"""A private PostgreSQL cluster for the tests: started once per session, a fresh database per
test. Registered by tests/conftest.py (``pytest_plugins``).

- ``postgres_cluster`` (session) -> `PostgresCluster`: ``initdb`` into a temporary directory,
  ``pg_ctl start`` on a free port, listening only on a Unix socket in that directory; stopped
  (``-m immediate``) and removed at the end of the session.
- ``pg_url`` -> a SQLAlchemy URL (``postgresql+psycopg://...``) of a new, empty database,
  dropped after the test.

The binaries come from ``$EDGEFLEET_PG_BIN_DIR`` (``.ci/run`` exports it), else the newest
``/usr/lib/postgresql/*/bin`` (Debian keeps them off PATH), else ``initdb`` on PATH. Missing
binaries skip the PostgreSQL tests with a reason, except in CI (``CI=true``), where they fail.
``initdb`` refuses to run as root: as root the cluster runs as the ``postgres`` user (through
``runuser``), in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import free_port

__all__ = ["PostgresCluster", "find_pg_bin_dir", "pg_url", "postgres_cluster"]

_PG_USER = "postgres"


def find_pg_bin_dir() -> Path | None:
    """Where initdb / pg_ctl live, or None."""
    env = os.environ.get("EDGEFLEET_PG_BIN_DIR")
    if env and (Path(env) / "initdb").is_file():
        return Path(env)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
    )
    for cand in reversed(candidates):
        if (cand / "initdb").is_file():
            return cand
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class PostgresCluster:
    bin_dir: Path
    base: Path
    port: int
    #: run server commands as this user (None: as ourselves)
    run_as: str | None

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base

    def _cmd(self, *argv: str) -> list[str]:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        return ["runuser", "-u", self.run_as, "--", *cmd] if self.run_as else cmd

    def _run(self, *argv: str, timeout_s: float = 120) -> None:
        out = subprocess.run(
            self._cmd(*argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if out.returncode != 0:
            log = (
                (self.base / "server.log").read_text()
                if (self.base / "server.log").exists()
                else ""
            )
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({out.returncode}):\n{out.stdout}{out.stderr}\n{log}"
            )

    def start(self) -> None:
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", _PG_USER, "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale", "C",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses='' -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-o", options,
            "-l", str(self.base / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL of ``dbname`` over the Unix socket."""
        return f"postgresql+psycopg://{_PG_USER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=_PG_USER, dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, name: str) -> str:
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL server for the session (Unix socket only)."""
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        _unavailable(
            "no initdb found (set EDGEFLEET_PG_BIN_DIR, or run scripts/ensure-postgres.sh)"
        )
        raise AssertionError("unreachable")
    run_as = None
    # not under pytest's tmp dir: its parents are private to us, and the server user
    # (postgres, when we are root) must reach its data directory and socket
    base = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(_PG_USER)
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            _unavailable("running as root and there is no 'postgres' user to run initdb as")
            raise AssertionError("unreachable") from None
        if shutil.which("runuser") is None:
            shutil.rmtree(base, ignore_errors=True)
            _unavailable("running as root and runuser is missing")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = _PG_USER
    cluster = PostgresCluster(bin_dir=bin_dir, base=base, port=free_port(), run_as=run_as)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL from {bin_dir}: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test; dropped afterwards."""
    name = (
        "t_"
        + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
        + "_"
        + os.urandom(3).hex()
    )
    url = postgres_cluster.create_database(name)
    try:
        yield url
    finally:
        postgres_cluster.drop_database(name)
