"""Mosquitto's configuration for a secure fleet: identities, ACL, persistence, reload.

The fleet owns three files in one broker directory and Mosquitto reads them:

    mosquitto.conf   listeners, ``allow_anonymous false``, persistence, file paths
    passwd           ``user:$7$...`` lines: the service account(s) + every enrolled device
    acl              devices: ``pattern readwrite edgefleet/v1/%u/#`` and nothing else;
                     the fleet's service account: ``edgefleet/v1/#`` (shared subscriptions)

``service.passwd`` holds the service account's hash (written once by ``broker-config``);
``passwd`` is rebuilt from it plus the device table whenever a device is enrolled or
revoked, and Mosquitto is told to reload with SIGHUP (`reload_broker`). Passwords are hashed
the way ``mosquitto_passwd`` does in Mosquitto 2.0 (``$7$``: PBKDF2-HMAC-SHA512, base64 salt
and digest), so the broker never sees a clear password on disk and the fleet needs no
Mosquitto binary to write the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from protocol.topics import PREFIX

__all__ = [
    "DEFAULT_SERVICE_USER",
    "BrokerFiles",
    "TlsFiles",
    "generate_password",
    "mosquitto_hash",
    "reload_broker",
    "render_acl",
    "render_mosquitto_conf",
    "verify_mosquitto_hash",
    "write_broker_config",
    "write_password_file",
]

log = logging.getLogger(__name__)

DEFAULT_SERVICE_USER = "edgefleet-fleet"
#: Mosquitto 2.0's own default. The passwords are 256-bit random tokens, so stretching
#: adds nothing against guessing; a low count keeps a reconnect storm cheap for the broker.
PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12
_DIGEST_BYTES = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """A TLS listener that requires client certificates (CN = device id = user name)."""

    port: int
    cafile: Path
    certfile: Path
    keyfile: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerFiles:
    """Where the broker's files live inside its directory."""

    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def passwd(self) -> Path:
        return self.directory / "passwd"

    @property
    def service_passwd(self) -> Path:
        return self.directory / "service.passwd"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def pid_file(self) -> Path:
        return self.directory / "mosquitto.pid"

    @property
    def persistence_dir(self) -> Path:
        return self.directory / "data"

    @property
    def service_credentials(self) -> Path:
        return self.directory / "fleet-mqtt.json"


def generate_password() -> str:
    """A 256-bit random password, URL-safe text."""
    return secrets.token_urlsafe(32)


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """``$7$<iterations>$<salt b64>$<digest b64>``, as ``mosquitto_passwd`` writes it."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_mosquitto_hash(password: str, hashed: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash (for tests and `fleet` self-checks)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac(
            "sha512", password.encode("utf-8"), base64.b64decode(salt), int(iterations)
        )
        return hmac.compare_digest(got, base64.b64decode(digest))
    except ValueError:
        return False


def render_acl(service_users: Iterable[str] = (DEFAULT_SERVICE_USER,)) -> str:
    """The ACL: each service account gets the whole tree; every other user only its own."""
    lines = [
        "# Written by the EdgeFleet fleet (fleet/broker_config.py); do not edit by hand.",
        "# Service accounts: the fleet reads every device's channels through $share",
        "# subscriptions and writes every device's commands.",
    ]
    for user in service_users:
        lines += [f"user {user}", f"topic readwrite {PREFIX}/#", ""]
    lines += [
        "# Every device (user name = device id): its own subtree, nothing else.",
        f"pattern readwrite {PREFIX}/%u/#",
    ]
    return "\n".join(lines) + "\n"


def render_mosquitto_conf(
    files: BrokerFiles,
    *,
    port: int,
    host: str = "127.0.0.1",
    tls: TlsFiles | None = None,
    max_packet_bytes: int = 4 * 1024 * 1024,
    extra_lines: Iterable[str] = (),
) -> str:
    """mosquitto.conf: no anonymous access, password file + ACL, persistence on."""
    lines = [
        "# Written by `edgefleet fleet broker-config`. Reload after changes: kill -HUP <pid>.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files.passwd}",
        f"acl_file {files.acl}",
        # QoS 1 commands queued for offline devices survive a broker restart
        "persistence true",
        f"persistence_location {files.persistence_dir}/",
        "autosave_interval 60",
        f"pid_file {files.pid_file}",
        f"max_packet_size {max_packet_bytes}",
        "log_dest stdout",
        "connection_messages true",
        "",
        f"listener {port} {host}",
    ]
    if tls is not None:
        lines += [
            "",
            f"listener {tls.port} {host}",
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            "require_certificate true",
            # the certificate's CN becomes the user name, so the same ACL pattern applies
            "use_identity_as_username true",
        ]
    lines.extend(extra_lines)
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_password_file(files: BrokerFiles, device_hashes: Mapping[str, str]) -> None:
    """Rebuild ``passwd`` = service accounts + the given devices (id -> ``$7$`` hash)."""
    try:
        service = files.service_passwd.read_text(encoding="utf-8")
    except FileNotFoundError:
        service = ""
    service_users = {line.split(":", 1)[0] for line in service.splitlines() if ":" in line}
    lines = [line for line in service.splitlines() if line.strip()]
    for device_id in sorted(device_hashes):
        if device_id in service_users:
            continue  # never let a device entry replace a service account
        lines.append(f"{device_id}:{device_hashes[device_id]}")
    # 0640: Mosquitto rereads it on SIGHUP as its own (dropped) user; put that user in the
    # file's group, or run the broker as the fleet's user. The lines are PBKDF2 hashes of
    # 256-bit random passwords, so group-readable does not make them guessable.
    _atomic_write(files.passwd, ("\n".join(lines) + "\n").encode(), 0o640)


def write_broker_config(
    directory: Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    service_user: str = DEFAULT_SERVICE_USER,
    tls: TlsFiles | None = None,
    device_hashes: Mapping[str, str] | None = None,
    extra_lines: Iterable[str] = (),
) -> tuple[BrokerFiles, dict[str, str]]:
    """Write a complete broker directory; returns its files and the service credentials.

    An existing service account (``fleet-mqtt.json``) is kept, so rerunning does not lock
    out a running fleet; the credentials file is mode 0600.
    """
    files = BrokerFiles(directory=Path(directory))
    files.directory.mkdir(parents=True, exist_ok=True)
    files.persistence_dir.mkdir(exist_ok=True)
    creds: dict[str, str] | None = None
    if files.service_credentials.exists() and files.service_passwd.exists():
        creds = json.loads(files.service_credentials.read_bytes())
        if not isinstance(creds, dict) or creds.get("username") != service_user:
            creds = None
    if creds is None:
        creds = {"username": service_user, "password": generate_password()}
        _atomic_write(files.service_credentials, json.dumps(creds, indent=1).encode())
        _atomic_write(
            files.service_passwd,
            f"{service_user}:{mosquitto_hash(creds['password'])}\n".encode(),
        )
    _atomic_write(files.acl, render_acl([service_user]).encode(), 0o644)
    write_password_file(files, device_hashes or {})
    conf = render_mosquitto_conf(files, port=port, host=host, tls=tls, extra_lines=extra_lines)
    _atomic_write(files.conf, conf.encode(), 0o644)
    return files, creds


#: a last SIGHUP this long after the last reload request (see `reload_broker`)
TRAILING_RELOAD_S = 1.0
_trailing: dict[int, threading.Timer] = {}
_trailing_lock = threading.Lock()


def reload_broker(pid_file: Path | None = None, *, pid: int | None = None) -> bool:
    """Send Mosquitto SIGHUP so it rereads the password file and ACL; False if not running.

    Measured with Mosquitto 2.0.11 (tests/integration/test_broker_acl.py): on SIGHUP it
    rereads both files and re-checks every connected client, disconnecting those whose
    user is gone from the password file; their reconnects are refused. Other clients stay
    connected. The signal is asynchronous: the reload happens a moment after this returns.

    Mosquitto clears its reload flag after it has reread the files, so a SIGHUP that
    arrives during a reload is lost: enrolling 12 devices 10 ms apart left the last one
    "not authorised" until something else reloaded the broker (the demo, once). So each
    call also (re)arms one more SIGHUP `TRAILING_RELOAD_S` after the last call of a burst,
    when the password file has stopped changing.
    """
    sent = _sighup(pid_file, pid)
    if sent is None:
        return False
    with _trailing_lock:
        old = _trailing.pop(sent, None)
        if old is not None:
            old.cancel()
        timer = threading.Timer(TRAILING_RELOAD_S, _trailing_sighup, args=(sent,))
        timer.daemon = True
        _trailing[sent] = timer
        timer.start()
    return True


def _trailing_sighup(pid: int) -> None:
    with _trailing_lock:
        _trailing.pop(pid, None)
    _sighup(None, pid)


def _sighup(pid_file: Path | None, pid: int | None) -> int | None:
    """SIGHUP the broker; its pid, or None (logged) if it could not be signalled."""
    if pid is None:
        if pid_file is None:
            return None
        try:
            pid = int(Path(pid_file).read_text().strip())
        except (OSError, ValueError):
            log.warning("cannot read the broker pid from %s; broker not reloaded", pid_file)
            return None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        log.warning("broker pid %d is not running; not reloaded", pid)
        return None
    except PermissionError:
        log.warning("no permission to signal broker pid %d; not reloaded", pid)
        return None
    log.info("sent SIGHUP to the broker (pid %d): password file and ACL reload", pid)
    return pid
