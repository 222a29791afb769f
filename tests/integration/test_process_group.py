"""ProcessGroup starts, waits for and stops real processes; the leak checks catch leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.procs import ProcessGroup, ProcessStartupError, free_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes once not running.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def test_close_stops_the_process_and_its_children(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    script = "sleep 300 & echo child=$!; wait"
    shell = group.start("shell", ["sh", "-c", script])
    group.wait_until(lambda: "child=" in shell.log_text(), what="the child's pid")
    child = int(shell.log_text().split("child=")[1].split()[0])

    group.close()

    assert not shell.alive
    assert _pid_gone(child)
    assert not shell.leftover()


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path, grace_s=0.5)
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready')\n"
        "time.sleep(300)\n"
    )
    stubborn = group.start("stubborn", [sys.executable, "-c", code])
    group.wait_until(lambda: "ready" in stubborn.log_text(), what="ready", process=stubborn)
    started = time.monotonic()
    group.close()
    assert stubborn.returncode == -9
    assert time.monotonic() - started < 10


def test_wait_for_port_fails_early_with_the_log_when_the_process_exits(
    procs: ProcessGroup,
) -> None:
    dying = procs.start("dying", ["sh", "-c", "echo boom: bad config >&2; exit 3"])
    with pytest.raises(ProcessStartupError) as failure:
        procs.wait_for_port(free_port(), timeout_s=30, process=dying)
    message = str(failure.value)
    assert "dying exited with 3" in message
    assert "boom: bad config" in message


def test_wait_for_port_times_out_with_a_clear_message(procs: ProcessGroup) -> None:
    with pytest.raises(ProcessStartupError, match=r"timed out after 0\.3 s waiting for TCP"):
        procs.wait_for_port(free_port(), timeout_s=0.3)


def test_wait_for_http_and_restart_keeps_both_logs(procs: ProcessGroup, tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    first = procs.start("web", argv, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    assert procs.wait_for_http(url, process=first, status=200) == 200
    assert procs.wait_for_http(url + "missing", process=first) == 404

    assert first.kill() == -9
    second = procs.start("web", argv, cwd=tmp_path)
    procs.wait_for_http(url, process=second, status=200)
    assert procs.get("web") is second
    assert first.log_path != second.log_path
    assert first.log_path.exists()


def test_leak_checks_fail_a_test_that_leaves_a_process(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    # A top-level conftest of the inner run loads ours as a plugin: fixtures, hooks, checks.
    (inner / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (inner / "test_leaky.py").write_text(
        textwrap.dedent(
            """
            import subprocess

            from tests.procs import ProcessGroup


            def test_leaves_a_raw_popen():
                subprocess.Popen(["sleep", "300"])


            def test_leaves_a_group_open(tmp_path):
                ProcessGroup(tmp_path).start("orphan", ["sleep", "300"])


            def test_clean(procs):
                procs.start("fine", ["sleep", "300"])
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning"],
        cwd=inner,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "3 passed, 2 errors" in output, output
    assert "the test left processes running (now killed)" in output
    assert "sleep 300" in output
    assert "orphan" in output
