"""A private Mosquitto broker for tests: its config text, and starting it in a ProcessGroup.

The config comes from ``mosquitto_config()`` so that later work (passwords, ACLs, TLS,
persistence) adds lines or keyword arguments there instead of editing fixtures.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.procs import ManagedProcess, ProcessGroup, free_port

__all__ = [
    "Broker",
    "MosquittoNotFound",
    "find_mosquitto",
    "mosquitto_config",
    "start_mosquitto",
]

DEFAULT_MAX_PACKET_BYTES = 4 * 1024 * 1024
STARTUP_TIMEOUT_S = 10.0
_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class MosquittoNotFound(RuntimeError):
    """No mosquitto binary on PATH or in the usual sbin directories."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Broker:
    """A running test broker: where to connect, and its process, config and log."""

    host: str
    port: int
    process: ManagedProcess
    config_path: Path

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's log file (its stdout and stderr)."""
        return self.process.log_path


def find_mosquitto() -> str:
    """Path of the mosquitto binary; MosquittoNotFound (saying what to run) if absent."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotFound(
        "mosquitto is not installed (not on PATH, nor in /usr/sbin): run `make mosquitto` "
        "(or `sudo apt-get install mosquitto mosquitto-clients`; `brew install mosquitto`)"
    )


def mosquitto_config(
    port: int,
    extra_lines: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    allow_anonymous: bool = True,
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
) -> str:
    """The text of a mosquitto.conf for one private loopback listener.

    ``extra_lines`` are appended as they are (``password_file ...``, ``acl_file ...``).
    """
    lines = [
        f"listener {port} {host}",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "persistence false",
        # Mosquitto drops from root to the `mosquitto` user, which cannot write the tests'
        # private tmp dirs (mode 0700); naming the current user keeps it as it is ("root"
        # means: do not switch; for non-root users the option is ignored).
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"max_packet_size {max_packet_bytes}",
    ]
    lines.extend(extra_lines)
    return "\n".join(lines) + "\n"


def start_mosquitto(
    group: ProcessGroup,
    workdir: Path,
    *,
    extra_lines: Sequence[str] = (),
    allow_anonymous: bool = True,
    port: int | None = None,
    name: str = "mosquitto",
) -> Broker:
    """Write a config into ``workdir``, start mosquitto in ``group``, wait for its port."""
    binary = find_mosquitto()
    port = free_port() if port is None else port
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.conf"
    config_path.write_text(
        mosquitto_config(port, extra_lines, allow_anonymous=allow_anonymous), encoding="utf-8"
    )
    argv = [binary, "-c", str(config_path)]
    # Mosquitto block-buffers its stdout log into a file; line-buffer it so that the log a
    # failing test shows is current. stdbuf (coreutils) execs, so the pid stays mosquitto's.
    stdbuf = shutil.which("stdbuf")
    if stdbuf:
        argv = [stdbuf, "-oL", *argv]
    process = group.start(name, argv, cwd=workdir)
    group.wait_for_port(port, timeout_s=STARTUP_TIMEOUT_S, process=process)
    return Broker(host="127.0.0.1", port=port, process=process, config_path=config_path)
