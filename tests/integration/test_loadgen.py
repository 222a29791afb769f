"""The load generator against the real broker and the real fleet process.

50 simulated devices send telemetry for a few seconds: the fleet stores every window the
broker acknowledged exactly once; a deploy to some of them comes back as status events.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.keys_cli import init_keys
from edgefleet.loadgen import WindowTemplate, device_ids
from protocol.messages import TelemetryWindow, decode_message
from tests.broker import Broker
from tests.procs import ProcessGroup, free_port

pytestmark = pytest.mark.integration

EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
SHA = "ab" * 32


def test_template_renders_valid_windows() -> None:
    template = WindowTemplate(features=8, rows=30)
    raw = template.render(
        device_id="dev-7", seq=3, stream_id="s1", window_start=100.0, window_end=102.0,
        bundle_sha256=SHA, model_name="digits", model_version=2,
    )  # fmt: skip
    msg = decode_message(raw, expect=TelemetryWindow)
    assert (msg.device_id, msg.seq, msg.stream_id, msg.model_version) == ("dev-7", 3, "s1", 2)
    assert msg.bundle_sha256 == SHA and len(msg.sketches()) == 8
    assert msg.inference_count == 30 and msg.latency_ms is not None
    assert msg.latency_ms.count == 30
    assert (msg.window_end - msg.window_start).total_seconds() == 2.0


def _count(db: Path, sql: str, *args: Any) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return int(conn.execute(sql, args).fetchone()[0])


def _wait(predicate: Any, what: str, timeout_s: float, procs: ProcessGroup) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except sqlite3.OperationalError as exc:  # tables not created yet
            last = str(exc)
        if last is True or (last and not isinstance(last, str)):
            return last
        time.sleep(0.3)
    pytest.fail(
        f"timed out after {timeout_s}s waiting for {what}; last: {last}\n{procs.describe()}"
    )


def test_loadgen_windows_are_stored_once_and_deploys_are_answered(
    tmp_path: Path, mosquitto: Broker, procs: ProcessGroup
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    db = tmp_path / "fleet.db"
    port = free_port()
    fleet = procs.start(
        "fleet",
        [
            *EDGEFLEET, "fleet", "serve",
            "--trust-root", str(keys / "trust-root.json"), "--db", f"sqlite:///{db}",
            "--mqtt-host", mosquitto.host, "--mqtt-port", str(mosquitto.port),
            "--bundle-dir", str(tmp_path / "bundles"), "--host", "127.0.0.1", "--port", str(port),
        ],
    )  # fmt: skip
    procs.wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60, process=fleet)

    def fleet_connected() -> bool:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return bool(json.loads(r.read()).get("mqtt") == "connected")

    _wait(fleet_connected, "the fleet's MQTT connection", 30, procs)

    prefix = f"lg{time.monotonic_ns() % 10**8}-"
    devices = device_ids(prefix, 50)
    load = procs.start(
        "loadgen",
        [
            sys.executable, "-m", "edgefleet.loadgen", "--devices", "50",
            "--rate-per-device", "2", "--duration-s", "5", "--features", "16",
            "--rows-per-window", "20", "--mqtt-host", mosquitto.host,
            "--mqtt-port", str(mosquitto.port), "--prefix", prefix, "--heartbeat-s", "2",
            "--commit-delay-s", "0.5", "--linger-s", "15", "--json",
        ],
    )  # fmt: skip

    # every device announced itself with a heartbeat (profile known): deploy to five
    def registered() -> bool:
        n = _count(db, "SELECT count(*) FROM device WHERE id LIKE ? AND profile = 'x86-cpu'",
                   prefix + "%")  # fmt: skip
        return n == 50

    _wait(registered, "50 devices to register", 60, procs)
    targets = devices[:5]
    commands = {}
    for device in targets:
        cmd = _send_deploy(mosquitto, device)
        commands[device] = cmd

    status = load.wait(timeout_s=120)
    assert status == 0, load.tail()
    report = json.loads(load.log_text().strip().splitlines()[-1])
    sent = report["telemetry_sent"]
    assert sent == report["telemetry_planned"] == 500 and report["unacked"] == 0

    def all_stored() -> bool:
        return _count(db, "SELECT count(*) FROM telemetryrecord WHERE device_id LIKE ?",
                      prefix + "%") >= sent  # fmt: skip

    _wait(all_stored, f"{sent} windows in the database", 120, procs)
    time.sleep(1.0)  # anything extra (a duplicate stored twice) would show up by now
    assert _count(db, "SELECT count(*) FROM telemetryrecord WHERE device_id LIKE ?",
                  prefix + "%") == sent  # fmt: skip
    per_key = _count(
        db,
        "SELECT count(*) FROM (SELECT device_id, stream_id, seq FROM telemetryrecord "
        "WHERE device_id LIKE ? GROUP BY device_id, stream_id, seq HAVING count(*) > 1)",
        prefix + "%",
    )
    assert per_key == 0
    assert _count(db, "SELECT count(DISTINCT device_id) FROM telemetryrecord "
                  "WHERE device_id LIKE ?", prefix + "%") == 50  # fmt: skip

    # the deploy answers were ingested as status events: received, then committed
    for device, command_id in commands.items():
        states = _states(db, device, command_id)
        assert states == ["received", "committed"], (device, states)
    assert report["commands_received"] == 5 and report["status_sent"] == 10


def _states(db: Path, device: str, command_id: str) -> list[str]:
    with sqlite3.connect(db, timeout=10) as conn:
        rows = conn.execute(
            "SELECT state FROM deviceevent WHERE device_id = ? AND command_id = ? ORDER BY id",
            (device, command_id),
        ).fetchall()
    return [r[0] for r in rows]


def _send_deploy(broker: Broker, device: str) -> str:
    """Publish a deploy command as the fleet would (the test plays the operator)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.messages import DeployCommand, encode_message
    from protocol.topics import Channel, device_topic

    cmd = DeployCommand(
        device_id=device, bundle_sha256=SHA, bundle_size=1000,
        bundle_url="http://127.0.0.1:1/none", model_name="digits", model_version=2,
    )  # fmt: skip
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-op-{time.monotonic_ns()}",
        protocol=mqtt.MQTTv5,
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(
            device_topic(device, Channel.COMMAND), encode_message(cmd), qos=1
        ).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    return cmd.command_id


def test_loadgen_one_connection_per_device(mosquitto: Broker, procs: ProcessGroup) -> None:
    """--connections-per-process 0: every device is its own MQTT client (client id = device
    id, last will = offline presence); each window is acknowledged and delivered once."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    prefix = f"pd{time.monotonic_ns() % 10**8}-"
    got: list[str] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"w-{prefix}",
                          protocol=mqtt.MQTTv5)  # fmt: skip
    watcher.on_message = lambda _c, _u, m: (
        got.append(m.topic) if m.topic.startswith(f"edgefleet/v1/{prefix}") else None
    )
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe("edgefleet/v1/+/telemetry", 1)
    watcher.loop_start()
    try:
        time.sleep(0.5)
        load = procs.start(
            "loadgen",
            [
                sys.executable, "-m", "edgefleet.loadgen", "--devices", "30",
                "--rate-per-device", "2", "--duration-s", "2", "--features", "8",
                "--connections-per-process", "0", "--mqtt-host", mosquitto.host,
                "--mqtt-port", str(mosquitto.port), "--prefix", prefix, "--json",
            ],
        )  # fmt: skip
        assert load.wait(timeout_s=60) == 0, load.tail()
        report = json.loads(load.log_text().strip().splitlines()[-1])
        assert report["connections"] == 30
        assert report["telemetry_sent"] == report["telemetry_planned"] == 120
        assert report["heartbeats_sent"] >= 30 and report["presence_sent"] == 30
        assert report["unacked"] == 0 and report["disconnects"] == 0
        _wait(lambda: len(got) >= 120, "120 windows at the watcher", 20, procs)
        time.sleep(0.3)
        assert len(got) == 120
        assert {t.split("/")[2] for t in got} == set(device_ids(prefix, 30))
    finally:
        watcher.loop_stop()
        watcher.disconnect()
