"""Start real processes for integration tests, wait for them to serve, and never leak them.

Every process is started in its own session (so its whole process group can be signalled,
children included), with stdout and stderr going to one log file. Teardown sends SIGTERM to
the group, waits ``grace_s`` (5 s), then sends SIGKILL. Failure messages carry each log's tail.

    group = ProcessGroup(tmp_path / "procs")
    fleet = group.start("fleet", [sys.executable, "-m", "fleet", "--port", str(port)])
    group.wait_for_http(f"http://127.0.0.1:{port}/healthz", process=fleet)
    ...
    group.close()

In tests, use the ``procs`` fixture from ``tests/conftest.py`` instead of building one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "ManagedProcess",
    "ProcessGroup",
    "ProcessStartupError",
    "child_pids",
    "describe_pids",
    "free_port",
    "live_processes",
]

DEFAULT_GRACE_S = 5.0
DEFAULT_TAIL_LINES = 40
_POLL_S = 0.05

# Every process any group ever started in this test session; the session-end check walks it.
_STARTED: list[ManagedProcess] = []


class ProcessStartupError(RuntimeError):
    """A process exited early or did not start serving in time; the message has its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _proc_stat_fields(pid_dir: Path) -> list[str] | None:
    # "/proc/PID/stat" is "pid (comm) state ppid pgrp ...", and comm may hold spaces.
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _group_exists(pgid: int) -> bool:
    """True while a live (non-zombie) process is in process group ``pgid``."""
    if sys.platform.startswith("linux"):
        # Zombies count as members for killpg(); an init that reaps slowly (containers)
        # would make a dead group look alive, so read the states instead.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _proc_stat_fields(entry)
                if fields and len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else (a broker that dropped privileges)
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return "<no log file>"
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "<empty log>"


class ManagedProcess:
    """One started process: its Popen, its log file and ways to stop it."""

    def __init__(
        self,
        *,
        name: str,
        argv: Sequence[str],
        popen: subprocess.Popen[bytes],
        log_path: Path,
        grace_s: float,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.popen = popen
        self.log_path = log_path
        self.grace_s = grace_s

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.popen.returncode}"
        return f"<ManagedProcess {self.name} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        """The process id, which is also its process group id."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """True while the process itself has not exited."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status (negative signal number when killed), or None while running."""
        return self.popen.poll()

    def log_text(self) -> str:
        """The whole log so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = DEFAULT_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        return _tail(self.log_path, lines)

    def describe(self, lines: int = DEFAULT_TAIL_LINES) -> str:
        """A header with name, pid and state, then the log's tail."""
        state = "running" if self.alive else f"exited with {self.popen.returncode}"
        return (
            f"----- {self.name} (pid {self.pid}, {state}) log {self.log_path} -----\n"
            f"{self.tail(lines)}"
        )

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its status; TimeoutExpired if it does not."""
        return self.popen.wait(timeout=timeout_s)

    def terminate(self, grace_s: float | None = None) -> int:
        """SIGTERM the process group, wait ``grace_s``, then SIGKILL it; return the status."""
        grace = self.grace_s if grace_s is None else grace_s
        if self.alive:
            _signal_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        return self.kill()

    def kill(self) -> int:
        """SIGKILL the whole process group at once (a crash, as tests of recovery want)."""
        _signal_group(self.pid, signal.SIGKILL)
        status = self.popen.wait(timeout=30)
        # Members of the group that outlived the leader (re-parented to init) go too.
        deadline = time.monotonic() + 5.0
        while _group_exists(self.pid) and time.monotonic() < deadline:
            _signal_group(self.pid, signal.SIGKILL)
            time.sleep(_POLL_S)
        return status

    def leftover(self) -> bool:
        """True if the process, or any member of its process group, is still there."""
        return self.alive or _group_exists(self.pid)


class ProcessGroup:
    """Starts named processes with logs in ``log_dir`` and stops all of them on ``close()``."""

    def __init__(self, log_dir: Path, *, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.log_dir = Path(log_dir)
        self.grace_s = grace_s
        self.processes: list[ManagedProcess] = []
        self._closed = False

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` as ``name``; stdout and stderr go to ``log_dir/name.log``.

        ``env`` replaces the environment (default: this process's); ``extra_env`` is laid
        over it. Python children run unbuffered so their logs are current.
        """
        if self._closed:
            raise RuntimeError("this ProcessGroup is closed")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_path(name)
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        child_env.update(extra_env or {})
        args = [os.fspath(a) for a in argv]
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
            )
        process = ManagedProcess(
            name=name, argv=args, popen=popen, log_path=log_path, grace_s=self.grace_s
        )
        self.processes.append(process)
        _STARTED.append(process)
        return process

    def _log_path(self, name: str) -> Path:
        # A restarted process with the same name gets a new file, so no log is overwritten.
        path = self.log_dir / f"{name}.log"
        counter = 2
        while path.exists():
            path = self.log_dir / f"{name}.{counter}.log"
            counter += 1
        return path

    def get(self, name: str) -> ManagedProcess:
        """The most recently started process called ``name``."""
        for process in reversed(self.processes):
            if process.name == name:
                return process
        raise KeyError(name)

    def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        what: str,
        timeout_s: float = 10.0,
        process: ManagedProcess | None = None,
    ) -> None:
        """Poll ``predicate`` until true; fail early if ``process`` exits, late on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate():
                return
            if process is not None and not process.alive:
                raise ProcessStartupError(
                    f"{process.name} exited with {process.returncode} while waiting for "
                    f"{what}\n{self.describe()}"
                )
            if time.monotonic() >= deadline:
                raise ProcessStartupError(
                    f"timed out after {timeout_s:g} s waiting for {what}\n{self.describe()}"
                )
            time.sleep(_POLL_S)

    def wait_for_port(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout_s: float = 10.0,
        process: ManagedProcess | None = None,
    ) -> None:
        """Wait until a TCP connection to ``host:port`` succeeds."""

        def accepts() -> bool:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return True
            except OSError:
                return False

        self.wait_until(
            accepts, what=f"TCP {host}:{port} to accept", timeout_s=timeout_s, process=process
        )

    def wait_for_http(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        process: ManagedProcess | None = None,
        status: int | None = None,
    ) -> int:
        """Wait until ``url`` answers (with ``status``, if given); return the HTTP status."""
        seen: list[int] = []

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    code = int(response.status)
            except urllib.error.HTTPError as exc:
                code = exc.code
                exc.close()
            except (OSError, ValueError):
                return False
            seen.append(code)
            return status is None or code == status

        wanted = f" with status {status}" if status is not None else ""
        self.wait_until(
            answers, what=f"HTTP {url} to answer{wanted}", timeout_s=timeout_s, process=process
        )
        return seen[-1]

    def describe(self, lines: int = DEFAULT_TAIL_LINES) -> str:
        """Every process's state and log tail, for failure messages."""
        if not self.processes:
            return "(no processes started)"
        return "\n".join(p.describe(lines) for p in self.processes)

    def close(self) -> None:
        """Stop every process, newest first: SIGTERM, ``grace_s``, SIGKILL. Idempotent."""
        self._closed = True
        errors: list[str] = []
        for process in reversed(self.processes):
            try:
                process.terminate()
            except Exception as exc:  # keep stopping the others; report all at the end
                errors.append(f"{process.name}: {exc!r}")
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))


def live_processes() -> list[ManagedProcess]:
    """Processes started through any ProcessGroup that (or whose group members) still run."""
    return [p for p in _STARTED if p.leftover()]


def child_pids(parent: int | None = None) -> set[int]:
    """Pids of the live (non-zombie) direct children of ``parent`` (default: this process).

    Reads /proc, so it only sees anything on Linux; elsewhere it returns an empty set.
    """
    parent = os.getpid() if parent is None else parent
    if not sys.platform.startswith("linux"):
        return set()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat_fields(entry)
            if fields and len(fields) > 1 and fields[0] != "Z" and int(fields[1]) == parent:
                found.add(int(entry.name))
    return found


def describe_pids(pids: Iterable[int]) -> str:
    """One line per pid with its command line, for failure messages."""
    lines = []
    for pid in sorted(pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "(already gone)"
        lines.append(f"  pid {pid}: {cmd.strip()}")
    return "\n".join(lines)
