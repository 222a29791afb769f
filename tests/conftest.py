"""Shared fixtures: a private Mosquitto broker, a process group, and leak checks.

Fixtures (see tests/procs.py and tests/broker.py for the objects they give):

- ``procs`` -> ``ProcessGroup``: start processes whose logs land in the test's tmp dir;
  everything in it is stopped (SIGTERM, 5 s, SIGKILL) when the test ends, and a failing
  test's report shows every log's tail.
- ``mosquitto`` -> ``Broker`` (session): one broker on a free loopback port, shared by all
  tests; give each test its own topics (and unique client ids).
- ``mosquitto_factory(extra_lines=(), *, allow_anonymous=True, name="mosquitto")`` -> ``Broker``:
  a broker of the test's own (custom config, or one to kill and restart).

Every test is checked afterwards for child processes it left behind, and so is the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from tests.broker import Broker, MosquittoNotFound, start_mosquitto
from tests.procs import (
    ManagedProcess,
    ProcessGroup,
    child_pids,
    describe_pids,
    live_processes,
)

# PostgreSQL fixtures (``postgres_cluster``, ``pg_url``): tests/pg.py
pytest_plugins = ["tests.pg"]

# Long-lived helpers that Python libraries start by themselves and stop at interpreter exit.
_IGNORED_HELPERS = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
)

# Groups still open, whose logs a failing test's report shows, with the fixture that owns
# each: a session group's logs are shown only for tests that use its fixture.
_OPEN_GROUPS: dict[ProcessGroup, str] = {}
# Groups that live for the whole session: their processes are not a test's leftovers.
_SESSION_GROUPS: list[ProcessGroup] = []


def _open_group(log_dir: Path, *, fixture: str, session: bool = False) -> ProcessGroup:
    group = ProcessGroup(log_dir)
    _OPEN_GROUPS[group] = fixture
    if session:
        _SESSION_GROUPS.append(group)
    return group


def _close_group(group: ProcessGroup) -> None:
    try:
        group.close()
    finally:
        _OPEN_GROUPS.pop(group, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed setup or call, add the tail of every running test process's log."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for group, fixture in _OPEN_GROUPS.items():
            if group.processes and fixture in item.fixturenames:  # type: ignore[attr-defined]
                report.sections.append((f"process logs ({group.log_dir})", group.describe()))
    return report


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """A ProcessGroup logging into ``tmp_path/procs``; all its processes stop after the test."""
    group = _open_group(tmp_path / "procs", fixture="procs")
    try:
        yield group
    finally:
        _close_group(group)


def _start_broker(group: ProcessGroup, workdir: Path, **kwargs: object) -> Broker:
    try:
        return start_mosquitto(group, workdir, **kwargs)  # type: ignore[arg-type]
    except MosquittoNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One private Mosquitto (MQTT 5, anonymous) for the whole session."""
    workdir = tmp_path_factory.mktemp("mosquitto")
    group = _open_group(workdir, fixture="mosquitto", session=True)
    try:
        yield _start_broker(group, workdir)
    finally:
        _close_group(group)


@pytest.fixture
def mosquitto_factory(procs: ProcessGroup, tmp_path: Path) -> Callable[..., Broker]:
    """Start brokers of the test's own; they stop with the test's ``procs`` group."""

    def start(
        extra_lines: Sequence[str] = (),
        *,
        allow_anonymous: bool = True,
        name: str = "mosquitto",
    ) -> Broker:
        return _start_broker(
            procs,
            tmp_path / "brokers",
            extra_lines=extra_lines,
            allow_anonymous=allow_anonymous,
            name=name,
        )

    return start


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _unexpected_children(baseline: set[int]) -> set[int]:
    return {
        pid
        for pid in child_pids() - baseline
        if not any(helper in _cmdline(pid) for helper in _IGNORED_HELPERS)
    }


def _kill_pids(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _session_processes() -> set[ManagedProcess]:
    return {p for group in _SESSION_GROUPS for p in group.processes}


def _fail_on_leftovers(managed: list[ManagedProcess], stray: set[int], who: str) -> None:
    """Kill leftover processes, then fail, naming each one."""
    if not managed and not stray:
        return
    lines = [f"  {p.name} (pid {p.pid}): {' '.join(p.argv)}" for p in managed]
    lines.extend(describe_pids(stray - {p.pid for p in managed}).splitlines())
    for process in managed:
        process.kill()
    _kill_pids(stray)
    pytest.fail(f"{who} processes running (now killed):\n" + "\n".join(lines), pytrace=False)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves a child process running after its fixtures are torn down."""
    before = child_pids()
    yield
    managed = [p for p in live_processes() if p not in _session_processes()]
    _fail_on_leftovers(managed, _unexpected_children(before), "the test left")


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes_at_exit() -> Iterator[None]:
    """At the end of the session, no process started by the tests may still run."""
    yield
    _fail_on_leftovers(live_processes(), _unexpected_children(set()), "the test session left")
