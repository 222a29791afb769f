"""Kill the fleet (SIGKILL) at many points of a rollout; after a restart it must finish it
without repeating or skipping a step.

Real processes: Mosquitto and `edgefleet fleet serve` (SQLite). The devices are simulated
by one small MQTT client in the test (not real agents: a rollout of 10 agents per kill point
would take minutes here): it registers 10 devices by heartbeat, answers every deploy command
it receives with a COMMITTED status event (every rollback with ROLLED_BACK), as the agent
does (idempotently: a command received twice is answered twice), and records every delivery.

The fleet dies at its Nth checkpoint (``EDGEFLEET_FLEET_CRASH_AT_CHECKPOINT``: before a step
commits, after it commits and before its commands go out, after each publish, after marking
them sent). A clean run counts the checkpoints; the kill points are spread over that count.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.client import FleetClient, FleetClientError
from protocol.messages import (
    DeployCommand,
    Heartbeat,
    InstallState,
    StatusEvent,
    decode_command,
    encode_message,
)
from protocol.topics import Channel, device_topic
from tests.broker import Broker
from tests.procs import ManagedProcess, ProcessGroup, free_port
from tests.unit.test_fleet_api import make_bundle, make_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
DEVICES = 10
KILL_POINTS = 10
OLD = "0" * 64


class SimulatedDevices:
    """One MQTT client playing ``ids``: heartbeats, and answers to every command."""

    def __init__(self, broker: Broker, ids: list[str]) -> None:
        self.ids = set(ids)
        self.active = dict.fromkeys(ids, OLD)
        self.deliveries: list[tuple[str, str, str]] = []  # (device, kind, command id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-{ids[0]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("edgefleet/v1/+/cmd", qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self._beat = threading.Thread(target=self._heartbeats, daemon=True)
        self._beat.start()

    def _publish(self, msg: Any, channel: Channel) -> None:
        self.client.publish(device_topic(msg.device_id, channel), encode_message(msg), qos=1)

    def _heartbeat(self, device_id: str) -> None:
        self._publish(
            Heartbeat(
                device_id=device_id, profile="x86-cpu", agent_version="sim", uptime_s=1.0,
                active_bundle_sha256=self.active[device_id],
            ),
            Channel.HEARTBEAT,
        )  # fmt: skip

    def _heartbeats(self) -> None:
        while not self._stop.wait(1.0):
            for d in sorted(self.ids):
                self._heartbeat(d)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        cmd = decode_command(bytes(msg.payload))
        if cmd.device_id not in self.ids:
            return
        with self._lock:
            self.deliveries.append((cmd.device_id, cmd.kind, cmd.command_id))
        if isinstance(cmd, DeployCommand):
            self.active[cmd.device_id] = cmd.bundle_sha256
            state, bundle = InstallState.COMMITTED, cmd.bundle_sha256
        else:
            self.active[cmd.device_id] = cmd.target_bundle_sha256 or OLD
            state, bundle = InstallState.ROLLED_BACK, None
        self._publish(
            StatusEvent(
                device_id=cmd.device_id, command_id=cmd.command_id, rollout_id=cmd.rollout_id,
                state=state, bundle_sha256=bundle, active_bundle_sha256=self.active[cmd.device_id],
            ),
            Channel.STATUS,
        )  # fmt: skip
        self._heartbeat(cmd.device_id)

    def close(self) -> None:
        self._stop.set()
        self._beat.join(5)
        self.client.loop_stop()
        self.client.disconnect()


def _start_fleet(
    procs: ProcessGroup, tmp: Path, broker: Broker, port: int, crash_at: int | None
) -> ManagedProcess:
    env = {
        "EDGEFLEET_FLEET_AUTH_ENABLED": "false",
        "EDGEFLEET_FLEET_ROLLOUT_TICK_S": "0.2",
        "EDGEFLEET_FLEET_ROLLOUT_LEASE_S": "2",
        "EDGEFLEET_FLEET_OFFLINE_AFTER_S": "30",
        "EDGEFLEET_FLEET_RECONCILE_INTERVAL_S": "0",
        # A killed process's MQTT session would otherwise live on at the broker (default
        # 300 s) and keep taking its share of `$share/fleet/...` messages, which nobody reads
        # (the restarted process has a new client id). See the report: fleet/mqtt.py.
        "EDGEFLEET_FLEET_MQTT_SESSION_EXPIRY_S": "0",
        "EDGEFLEET_FLEET_CRASH_AT_CHECKPOINT": str(crash_at or 10**9),
    }
    proc = procs.start(
        "fleet",
        [
            *EDGEFLEET, "fleet", "serve",
            "--trust-root", str(tmp / "keys" / "trust-root.json"),
            "--db", f"sqlite:///{tmp / 'fleet.db'}",
            "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
            "--bundle-dir", str(tmp / "bundles"),
            "--host", "127.0.0.1", "--port", str(port),
        ],
        extra_env=env,
    )  # fmt: skip
    procs.wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60, process=proc)
    client = FleetClient(f"http://127.0.0.1:{port}", timeout_s=10)
    procs.wait_until(
        lambda: client._call("GET", "/healthz").get("mqtt") == "connected",
        what="the fleet's MQTT connection",
        timeout_s=30,
    )
    return proc


def _phase(client: FleetClient, rid: str) -> str | None:
    try:
        return str(client._call("GET", f"/api/v1/rollouts/{rid}")["phase"])
    except FleetClientError:
        return None


def _run(
    tmp: Path, procs: ProcessGroup, broker: Broker, tag: str, crash_at: int | None
) -> dict[str, Any]:
    """One rollout; the fleet dies at ``crash_at`` and is restarted. Returns what happened."""
    tmp.mkdir(parents=True)
    (tmp / "keys").mkdir()
    keys = make_keys(tmp / "keys")
    bundle = make_bundle(tmp / "b.efb", keys.release)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fleet = _start_fleet(procs, tmp, broker, port, crash_at)
    client = FleetClient(url, timeout_s=10)
    ids = [f"kill-{tag}-{i:02d}" for i in range(DEVICES)]
    sim = SimulatedDevices(broker, ids)
    restarts = 0
    try:
        sha = client.upload(bundle)["sha256"]
        procs.wait_until(
            lambda: len([d for d in client.devices() if d["id"] in sim.ids]) == DEVICES,
            what="the simulated devices to register",
            timeout_s=30,
        )
        body = {
            "bundle_sha256": sha,
            "target": {"device_ids": ids},
            "stages": [
                {"percent": 20, "bake_s": 0.3},
                {"percent": 50, "bake_s": 0.3},
                {"percent": 100, "bake_s": 0.3},
            ],
            "gates": {"min_inferences": 0, "max_latency_p95_ratio": None,
                      "max_error_rate_increase": None, "max_battery_drain_ratio": None},
            "seed": 42,
            # status events the dead process had taken from the broker but not yet written
            # are lost with it (see the report); a timed-out command is sent again
            "command_timeout_s": 3,
        }  # fmt: skip
        rid = client._call("POST", "/api/v1/rollouts", body=body)["id"]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if not fleet.alive:
                # killed at its crash point: start it again, without one
                assert fleet.returncode == -9, fleet.tail()
                restarts += 1
                fleet = _start_fleet(procs, tmp, broker, port, None)
            if _phase(client, rid) == "completed":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"rollout {rid} did not complete; phase {_phase(client, rid)}\n"
                        f"{procs.describe()}")  # fmt: skip
        time.sleep(0.5)  # late duplicate deliveries, if any, arrive now
        checkpoints = fleet.log_text().count("checkpoint ")
    finally:
        sim.close()
        fleet.terminate()
    db = sqlite3.connect(tmp / "fleet.db")
    try:
        outbox = db.execute(
            "SELECT id, device_id, kind, stage, attempt, sent_at IS NOT NULL FROM commandoutbox"
        ).fetchall()
        decisions = [r[0] for r in db.execute("SELECT outcome FROM rolloutdecision ORDER BY id")]
        phases = Counter(r[0] for r in db.execute("SELECT phase FROM rolloutdevice"))
        stages = dict(db.execute("SELECT device_id, stage FROM rolloutdevice").fetchall())
    finally:
        db.close()
    return {
        "deliveries": list(sim.deliveries),
        "outbox": outbox,
        "decisions": decisions,
        "phases": phases,
        "stages": stages,
        "restarts": restarts,
        "checkpoints": checkpoints,
    }


def _check(result: dict[str, Any], *, retries_allowed: bool) -> None:
    outbox = result["outbox"]
    # exactly one command per (device, attempt); attempts run 1..k with no gap; all sent
    attempts: dict[str, list[int]] = defaultdict(list)
    for _, device, kind, _, attempt, sent in outbox:
        assert kind == "deploy" and sent
        attempts[device].append(attempt)
    assert len(attempts) == DEVICES
    for device, got in attempts.items():
        assert sorted(got) == list(range(1, len(got) + 1)), (device, got)
    if not retries_allowed:
        assert {len(v) for v in attempts.values()} == {1}, attempts
    # every delivery is a command the outbox holds for that device; a repeat of one id is a
    # re-send after a crash between publishing and recording it, never a new command
    by_id = {cid: device for cid, device, *_ in outbox}
    for device, _, cid in result["deliveries"]:
        assert by_id.get(cid) == device, f"{device} got a command the outbox does not hold"
    assert {d for d, _, _ in result["deliveries"]} == set(attempts)
    # each stage's devices are the seeded choice: 2, 3, 5
    assert sorted(Counter(result["stages"].values()).values()) == [2, 3, 5]
    # no step repeated or skipped: one decision per stage, in order
    assert result["decisions"] == ["created", "advance", "advance", "advance", "complete"]
    assert result["phases"] == {"committed": DEVICES}


def test_rollout_survives_sigkill_at_every_kind_of_step(
    tmp_path: Path, mosquitto: Broker, procs: ProcessGroup
) -> None:
    clean = _run(tmp_path / "clean", procs, mosquitto, "clean", None)
    _check(clean, retries_allowed=False)
    assert clean["restarts"] == 0
    total = clean["checkpoints"]
    assert total >= KILL_POINTS, f"only {total} checkpoints in a clean run"
    # spread over the first 80 %: the number of checkpoints varies a little from run to run
    # (steps that only record a heartbeat), and each point must be reached
    last = max(KILL_POINTS, int(total * 0.8))
    points = sorted({1 + round(i * (last - 1) / (KILL_POINTS - 1)) for i in range(KILL_POINTS)})
    summary = []
    for n in points:
        result = _run(tmp_path / f"kill-{n}", procs, mosquitto, f"k{n}", n)
        _check(result, retries_allowed=True)
        resent = sum(c - 1 for c in Counter(cid for *_, cid in result["deliveries"]).values())
        retried = sum(1 for *_, attempt, _ in result["outbox"] if attempt > 1)
        summary.append(
            {"kill_at": n, "restarts": result["restarts"], "same_id_resent": resent,
             "retries": retried}
        )  # fmt: skip
    # every kill point really killed the fleet (it ran past each one at least once)
    assert all(s["restarts"] == 1 for s in summary), summary
    print(json.dumps({"clean_checkpoints": total, "runs": summary}))
    shutil.rmtree(tmp_path / "clean", ignore_errors=True)
