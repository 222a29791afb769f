"""Device identity against a real Mosquitto 2.0 with the fleet's own configuration.

The broker runs the files `fleet.broker_config` writes (no anonymous access, password file,
per-device ACL); devices are enrolled and revoked through `fleet.enroll`, which rewrites the
password file and reloads the broker with SIGHUP.
"""

from __future__ import annotations

import os
import pwd
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session

from fleet import audit, auth, trust_store  # noqa: F401 - register their tables
from fleet.broker_config import BrokerFiles, TlsFiles, write_broker_config
from fleet.db import create_db, make_engine
from fleet.enroll import CertificateAuthority, EnrollRequest, enroll_device, revoke_device
from fleet.errors import InvalidRequest
from tests.broker import find_mosquitto
from tests.procs import ManagedProcess, ProcessGroup, free_port

pytestmark = pytest.mark.integration


@dataclass
class Client:
    """A paho client that records what it got and how its connection went."""

    client: mqtt.Client
    got: list[tuple[str, bytes]] = field(default_factory=list)
    connect_rc: list[str] = field(default_factory=list)
    disconnects: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(10), f"no SUBACK for {topics}"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class SecureBroker:
    files: BrokerFiles
    port: int
    process: ManagedProcess
    service: dict[str, str]
    settings: Any
    engine: Any
    clients: list[Client] = field(default_factory=list)
    tls_port: int | None = None

    def connect(
        self, username: str | None, password: str | None, *, client_id: str | None = None,
        tls: tuple[Path, Path, Path] | None = None, reconnect: bool = False,
    ) -> Client:  # fmt: skip
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{username}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        rec = Client(c)
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            ca, cert, key = tls
            c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))

        def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            rec.connect_rc.append(str(rc))
            rec.ready.set()

        def on_disconnect(*_a: Any) -> None:
            rec.disconnects += 1
            rec.ready.set()

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = lambda _c, _u, m: rec.got.append((m.topic, bytes(m.payload)))
        c.reconnect_delay_set(min_delay=1, max_delay=1)
        port = self.tls_port if tls is not None else self.port
        c.connect("127.0.0.1", port)
        c.loop_start()
        rec.ready.wait(10)
        if not reconnect and not c.is_connected():
            c.loop_stop()
        self.clients.append(rec)
        return rec

    def session(self) -> Session:
        return Session(self.engine)


def _wait(pred: Any, what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def broker(procs: ProcessGroup, tmp_path: Path) -> Iterator[SecureBroker]:
    port, tls_port = free_port(), free_port()
    directory = tmp_path / "broker"
    ca = CertificateAuthority(directory / "ca")
    cert, key, _ = ca.issue("127.0.0.1", server_names=("127.0.0.1", "localhost"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.crt").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    os.chmod(directory / "server.key", 0o600)
    tls = TlsFiles(
        port=tls_port,
        cafile=ca.cert_path,
        certfile=directory / "server.crt",
        keyfile=directory / "server.key",
    )
    # the test's tmp dir is private to this user: keep Mosquitto running as us
    me = pwd.getpwuid(os.getuid()).pw_name
    files, service = write_broker_config(directory, port=port, tls=tls, extra_lines=[f"user {me}"])
    argv = [find_mosquitto(), "-c", str(files.conf)]
    if stdbuf := shutil.which("stdbuf"):
        argv = [stdbuf, "-oL", *argv]
    process = procs.start("mosquitto", argv, cwd=directory)
    procs.wait_for_port(port, timeout_s=10, process=process)
    procs.wait_for_port(tls_port, timeout_s=10, process=process)
    _wait(files.pid_file.exists, "mosquitto's pid file")
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_db(engine)
    settings = SimpleNamespace(
        broker_dir=directory, broker_pid_file=None, mqtt_host="127.0.0.1", mqtt_port=port
    )
    b = SecureBroker(files, port, process, service, settings, engine, tls_port=tls_port)
    try:
        yield b
    finally:
        for c in b.clients:
            c.close()
        engine.dispose()


def _enroll(b: SecureBroker, device_id: str, *, certificate: bool = False) -> Any:
    with b.session() as s:
        return enroll_device(
            s,
            b.settings,
            EnrollRequest(device_id=device_id, profile="x86-cpu", certificate=certificate),
            actor="test",
        )


def _log_has(b: SecureBroker, text: str) -> bool:
    return text in b.process.log_path.read_text(errors="replace")


def test_device_is_confined_to_its_own_topics(broker: SecureBroker) -> None:
    a, b = _enroll(broker, "dev-a"), _enroll(broker, "dev-b")
    _wait(lambda: _log_has(broker, "Reloading config"), "the broker to reload")
    fleet = broker.connect(broker.service["username"], broker.service["password"])
    assert fleet.connected, fleet.connect_rc
    fleet.subscribe("$share/fleet/edgefleet/v1/+/status")
    dev_a = broker.connect("dev-a", a.password)
    dev_b = broker.connect("dev-b", b.password)
    assert dev_a.connected and dev_b.connected
    # A tries to read B's commands, and everything else
    dev_a.subscribe("edgefleet/v1/dev-b/cmd", "edgefleet/v1/#", "#")
    dev_b.subscribe("edgefleet/v1/dev-b/cmd")
    fleet.publish("edgefleet/v1/dev-b/cmd", b"for-b")
    # A tries to speak as B, then speaks as itself
    dev_a.publish("edgefleet/v1/dev-b/status", b"spoofed-by-a")
    dev_a.publish("edgefleet/v1/dev-a/status", b"from-a")
    _wait(lambda: ("edgefleet/v1/dev-a/status", b"from-a") in fleet.got, "A's own status")
    _wait(lambda: ("edgefleet/v1/dev-b/cmd", b"for-b") in dev_b.got, "B's command")
    time.sleep(0.5)  # give a leak the chance to arrive
    assert all(topic.startswith("edgefleet/v1/dev-a/") for topic, _ in dev_a.got), dev_a.got
    assert ("edgefleet/v1/dev-b/status", b"spoofed-by-a") not in fleet.got
    # A cannot command B either
    dev_a.publish("edgefleet/v1/dev-b/cmd", b"a-commands-b")
    time.sleep(0.5)
    assert ("edgefleet/v1/dev-b/cmd", b"a-commands-b") not in dev_b.got


def test_no_anonymous_no_wrong_password_no_wildcard_identities(broker: SecureBroker) -> None:
    creds = _enroll(broker, "dev-c")
    _wait(lambda: _log_has(broker, "Reloading config"), "the broker to reload")
    assert not broker.connect(None, None).connected
    assert not broker.connect("dev-c", creds.password + "x").connected
    assert broker.connect("dev-c", creds.password).connected
    for bad in ("dev+", "dev#", "dev/x", "+", "#"):
        with pytest.raises(InvalidRequest, match=r"'\+', '#' or '/'"):
            _enroll(broker, bad)
    passwd = broker.files.passwd.read_text()
    assert {line.split(":")[0] for line in passwd.splitlines()} == {"edgefleet-fleet", "dev-c"}
    assert not broker.connect("+", creds.password).connected


def test_revoked_device_is_disconnected_on_reload(broker: SecureBroker) -> None:
    a, b = _enroll(broker, "dev-r"), _enroll(broker, "dev-s")
    _wait(lambda: _log_has(broker, "Reloading config"), "the broker to reload")
    dev_r = broker.connect("dev-r", a.password, client_id="dev-r", reconnect=True)
    dev_s = broker.connect("dev-s", b.password, client_id="dev-s")
    assert dev_r.connected and dev_s.connected
    with broker.session() as s:
        revoke_device(s, broker.settings, "dev-r", actor="test")
    # Mosquitto 2.0 re-checks live clients on SIGHUP: the revoked one is dropped ...
    _wait(lambda: dev_r.disconnects >= 1, "the revoked device to be disconnected")
    _wait(lambda: _log_has(broker, "Client dev-r disconnected"), "the broker to log it")
    # ... its reconnects (paho keeps trying) are refused ...
    time.sleep(2.5)
    assert not dev_r.connected
    assert not broker.connect("dev-r", a.password).connected
    # ... and the other device never noticed
    assert dev_s.connected and dev_s.disconnects == 0


def test_client_certificate_identity(broker: SecureBroker) -> None:
    enrolled = _enroll(broker, "cam-9", certificate=True)
    d = broker.files.directory
    (d / "cam-9.crt").write_text(enrolled.certificate_pem)
    (d / "cam-9.key").write_text(enrolled.private_key_pem)
    (d / "cam-9.ca").write_text(enrolled.ca_pem)
    fleet = broker.connect(broker.service["username"], broker.service["password"])
    fleet.subscribe("$share/fleet/edgefleet/v1/+/status")
    cam = broker.connect(None, None, tls=(d / "cam-9.ca", d / "cam-9.crt", d / "cam-9.key"))
    assert cam.connected, cam.connect_rc  # CN = cam-9 is its user name
    cam.publish("edgefleet/v1/cam-9/status", b"tls-ok")
    cam.publish("edgefleet/v1/dev-a/status", b"tls-spoof")
    _wait(lambda: ("edgefleet/v1/cam-9/status", b"tls-ok") in fleet.got, "the TLS device's status")
    time.sleep(0.5)
    assert ("edgefleet/v1/dev-a/status", b"tls-spoof") not in fleet.got
    # without a client certificate the TLS listener refuses the handshake
    bare = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare", protocol=mqtt.MQTTv5)
    bare.tls_set(ca_certs=str(d / "cam-9.ca"))
    with pytest.raises((ssl.SSLError, OSError)):
        bare.connect("127.0.0.1", broker.tls_port or 0)
        bare.loop_start()
        time.sleep(0.5)
        bare.loop_stop()
        if not bare.is_connected():
            raise OSError("refused")
