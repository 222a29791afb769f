"""The thin real path, end to end, with real processes: keys -> compile -> fleet -> agents.

Mosquitto, the fleet service and two agents run as separate processes; the bundle is made
by the real `edgefleet compile` command; telemetry flows back through the broker.

Secure as in production (docs/security.md): the broker runs the configuration that
`edgefleet fleet broker-config` writes (no anonymous access, per-device ACL), the fleet logs
in with its service account, each agent with the credentials `edgefleet fleet enroll` made
for it, and every API call carries a bearer token (the first admin's made with
`edgefleet fleet token create --db`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.keys_cli import init_keys
from fleet.broker_config import write_broker_config
from fleet.client import FleetClient, FleetClientError
from tests.broker import Broker, find_mosquitto
from tests.procs import ProcessGroup, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"
EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]


def _compile(tmp: Path, keys: Path) -> tuple[Path, str]:
    out = subprocess.run(
        [
            *EDGEFLEET,
            "compile",
            str(DIGITS / "model.onnx"),
            "--profile",
            "x86-cpu",
            "--calibration",
            str(DIGITS / "calibration.npz"),
            "--heldout",
            str(DIGITS / "heldout.npz"),
            "--key",
            str(keys / "release.key"),
            "--out",
            str(tmp / "dist"),
            "--model-name",
            "digits",
            "--model-version",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    path, sha = out.stdout.strip().splitlines()[-1].split()
    return Path(path), sha


def _secure_broker(procs: ProcessGroup, directory: Path) -> tuple[Broker, dict[str, str]]:
    """Mosquitto on the fleet's own secure configuration; returns it and the service login."""
    port = free_port()
    me = pwd.getpwuid(os.getuid()).pw_name  # tmp dirs are private: keep the broker as us
    files, service = write_broker_config(directory, port=port, extra_lines=[f"user {me}"])
    argv = [find_mosquitto(), "-c", str(files.conf)]
    if stdbuf := shutil.which("stdbuf"):
        argv = [stdbuf, "-oL", *argv]
    process = procs.start("mosquitto", argv, cwd=directory)
    procs.wait_for_port(port, timeout_s=10, process=process)
    broker = Broker(host="127.0.0.1", port=port, process=process, config_path=files.conf)
    return broker, service


def _publish_raw(broker: Broker, topic: str, payload: bytes, creds: dict[str, str]) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-raw-{time.monotonic_ns()}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(creds["username"], creds["password"])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()


def _wait(predicate: Any, what: str, timeout_s: float, procs: ProcessGroup) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        for p in procs.processes:
            assert p.alive, f"{p.name} died while waiting for {what}:\n{p.tail()}"
        time.sleep(0.3)
    pytest.fail(
        f"timed out after {timeout_s}s waiting for {what}; last: {last}\n{procs.describe()}"
    )


def test_model_reaches_devices_and_telemetry_comes_back(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    bundle, sha = _compile(tmp_path, keys)
    mosquitto, service = _secure_broker(procs, tmp_path / "broker")

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    admin = subprocess.run(
        [*EDGEFLEET, "fleet", "token", "create", "--role", "admin", "--name", "spine-admin",
         "--db", db_url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip

    port = free_port()
    fleet_url = f"http://127.0.0.1:{port}"
    fleet = procs.start(
        "fleet",
        [
            *EDGEFLEET, "fleet", "serve",
            "--trust-root", str(keys / "trust-root.json"),
            "--db", db_url,
            "--mqtt-host", mosquitto.host, "--mqtt-port", str(mosquitto.port),
            "--bundle-dir", str(tmp_path / "bundles"),
            "--host", "127.0.0.1", "--port", str(port),
        ],
        extra_env={
            "EDGEFLEET_FLEET_MQTT_USERNAME": service["username"],
            "EDGEFLEET_FLEET_MQTT_PASSWORD": service["password"],
            "EDGEFLEET_FLEET_BROKER_DIR": str(tmp_path / "broker"),
        },
    )  # fmt: skip
    client = FleetClient(fleet_url, timeout_s=10, token=admin)

    def mqtt_connected() -> bool:
        try:
            return client._call("GET", "/healthz").get("mqtt") == "connected"
        except FleetClientError:
            return False

    procs.wait_for_http(f"{fleet_url}/healthz", timeout_s=30, process=fleet)
    _wait(mqtt_connected, "the fleet's MQTT connection", 20, procs)
    with pytest.raises(FleetClientError) as no_token:
        FleetClient(fleet_url, timeout_s=10, token="eft_wrong").devices()
    assert no_token.value.status == 401

    run_id = f"{time.monotonic_ns() % 10**8}"
    devices = [f"spine-{run_id}-a", f"spine-{run_id}-b"]
    cli_env = {**os.environ, "EDGEFLEET_TOKEN": admin}
    creds: dict[str, dict[str, str]] = {}
    for dev in devices:
        out = tmp_path / f"{dev}.credentials.json"
        subprocess.run(
            [*EDGEFLEET, "fleet", "enroll", "--device", dev, "--profile", "x86-cpu",
             "--out", str(out), "--fleet", fleet_url],
            capture_output=True, text=True, timeout=60, check=True, env=cli_env,
        )  # fmt: skip
        assert out.stat().st_mode & 0o777 == 0o600
        creds[dev] = json.loads(out.read_text())
        procs.start(
            dev,
            [
                *EDGEFLEET, "agent", "run",
                "--state-dir", str(tmp_path / dev),
                "--device-id", dev,
                "--profile", "x86-cpu",
                "--trust-root", str(keys / "trust-root.json"),
                "--mqtt-host", mosquitto.host, "--mqtt-port", str(mosquitto.port),
                "--credentials", str(out),
                "--telemetry-window-s", "1", "--heartbeat-s", "1",
                "--workload", str(DIGITS / "heldout.npz"), "--rate", "20",
            ],
        )  # fmt: skip

    # A tampered bundle is refused at upload and nothing is stored.
    tampered = tmp_path / "tampered.efb"
    raw = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:  # one byte inside the model itself
        member = tar.getmember("model/model.onnx")
        raw[member.offset_data + member.size // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))
    with pytest.raises(FleetClientError) as refused:
        client.upload(tampered)
    assert refused.value.status == 422

    uploaded = client.upload(bundle)
    assert uploaded["sha256"] == sha

    def registered() -> bool:
        by_id = {d["id"]: d for d in client.devices()}
        return all(by_id.get(d, {}).get("profile") == "x86-cpu" for d in devices)

    _wait(registered, "both agents to register by heartbeat", 30, procs)
    deployment = client.deploy(sha, device_ids=devices)
    assert {c["device_id"] for c in deployment["commands"]} == set(devices)

    def serving() -> list[dict[str, Any]] | None:
        rows = [d for d in client.devices() if d["id"] in devices]
        ok = [
            d
            for d in rows
            if d["reported_bundle_sha256"] == sha
            and d["model_version"] == 1
            and (d["inference_count"] or 0) > 0
            and d["latency_p95_ms"] is not None
            and d["online"]
        ]
        return rows if len(ok) == len(devices) else None

    rows = _wait(serving, "both devices to run v1 and report telemetry", 90, procs)
    for row in rows:
        assert 0 < row["latency_p95_ms"] < 1000

    def committed() -> list[str] | None:
        detail = client._call("GET", f"/api/v1/devices/{devices[0]}")
        states = [e["state"] for e in detail["events"]]
        return states if "committed" in states else None

    states = _wait(committed, "the install to commit after its health window", 60, procs)
    assert {"verifying", "self_test", "switched", "health_check"} <= set(states)

    # Bad input on the wire: malformed bytes on a device topic, and a message claiming to
    # come from another device. Both are counted as rejected; nothing crashes.
    before = client._call("GET", "/api/v1/stats")["rejected"]
    # (sent with device a's own credentials: a compromised device, inside its ACL)
    own = creds[devices[0]]
    _publish_raw(mosquitto, f"edgefleet/v1/{devices[0]}/telemetry", b"{not json", own)
    spoof = json.dumps({"kind": "presence", "device_id": devices[1], "online": False}).encode()
    _publish_raw(mosquitto, f"edgefleet/v1/{devices[0]}/presence", spoof, own)
    _publish_raw(mosquitto, f"edgefleet/v1/{devices[0]}/cmd", b"\x00garbage", own)

    def rejected_twice() -> bool:
        after = client._call("GET", "/api/v1/stats")["rejected"]
        return sum(after.values()) >= sum(before.values()) + 2

    _wait(rejected_twice, "the fleet to count both bad messages", 20, procs)
    time.sleep(1.5)
    for p in procs.processes:
        assert p.alive, f"{p.name} died after bad input:\n{p.tail()}"
    assert all(d["online"] for d in client.devices() if d["id"] in devices)

    # The operator's view from the CLI.
    out = subprocess.run(
        [*EDGEFLEET, "devices", "--fleet", fleet_url, "--json"],
        capture_output=True, text=True, timeout=60, check=True, env=cli_env,
    )  # fmt: skip
    listed = {d["id"]: d for d in json.loads(out.stdout)}
    assert all(listed[d]["model_version"] == 1 for d in devices)
