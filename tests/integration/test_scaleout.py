"""Two fleet processes on one PostgreSQL database behind one Mosquitto: they share ingest
through ``$share/fleet/...``, and a rollout is decided exactly once even when the process
holding its lease is SIGKILLed in the middle.

Real processes: Mosquitto, two ``edgefleet fleet serve`` (each migrates the database at
start, at the same time), and ``edgefleet loadgen`` playing the devices (heartbeats,
telemetry, and answers to deploy commands: RECEIVED, then COMMITTED). An observer client
records every command the broker delivers.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

from fleet.client import FleetClient, FleetClientError
from protocol.messages import decode_command
from tests.broker import Broker
from tests.procs import ManagedProcess, ProcessGroup, free_port
from tests.unit.test_fleet_api import make_bundle, make_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
DEVICES = 30
PREFIX = "so-"


class CommandObserver:
    """Records every command the broker delivers: (device, command id)."""

    def __init__(self, broker: Broker) -> None:
        self.deliveries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="scaleout-observer", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("edgefleet/v1/+/cmd", qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        cmd = decode_command(bytes(msg.payload))
        with self._lock:
            self.deliveries.append((cmd.device_id, cmd.command_id))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _start_fleet(
    procs: ProcessGroup, tmp: Path, broker: Broker, db: str, name: str, port: int
) -> ManagedProcess:
    env = {
        "EDGEFLEET_FLEET_AUTH_ENABLED": "false",
        "EDGEFLEET_FLEET_ROLLOUT_TICK_S": "0.2",
        "EDGEFLEET_FLEET_ROLLOUT_LEASE_S": "2",
        "EDGEFLEET_FLEET_OFFLINE_AFTER_S": "60",
        "EDGEFLEET_FLEET_RECONCILE_INTERVAL_S": "0",
        # a killed process's broker session must not keep its share of $share messages
        "EDGEFLEET_FLEET_MQTT_SESSION_EXPIRY_S": "0",
    }
    return procs.start(
        name,
        [
            *EDGEFLEET, "fleet", "serve",
            "--trust-root", str(tmp / "keys" / "trust-root.json"),
            "--db", db,
            "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
            "--bundle-dir", str(tmp / "bundles"),
            "--host", "127.0.0.1", "--port", str(port),
        ],
        extra_env=env,
    )  # fmt: skip


def _ingested(port: int) -> float:
    """This process's stored telemetry windows, from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    m = re.search(r"^edgefleet_fleet_telemetry_windows_ingested_total (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def test_two_fleets_share_ingest_and_a_rollout_survives_killing_its_lease_holder(
    tmp_path: Path, pg_url: str, mosquitto_factory: Any, procs: ProcessGroup
) -> None:
    broker = mosquitto_factory()
    (tmp_path / "keys").mkdir()
    keys = make_keys(tmp_path / "keys")
    bundle = make_bundle(tmp_path / "b.efb", keys.release)
    ports = [free_port(), free_port()]
    # both start (and migrate the empty database) at once
    fleets = {
        f"fleet{i}": _start_fleet(procs, tmp_path, broker, pg_url, f"fleet{i}", port)
        for i, port in enumerate(ports)
    }
    clients = [FleetClient(f"http://127.0.0.1:{p}", timeout_s=10) for p in ports]
    for proc, port, client in zip(fleets.values(), ports, clients, strict=True):
        procs.wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=90, process=proc)
        procs.wait_until(
            lambda c=client: c._call("GET", "/healthz").get("mqtt") == "connected",
            what="a fleet's MQTT connection",
            timeout_s=30,
        )
    observer = CommandObserver(broker)
    procs.start(
        "loadgen",
        [
            *EDGEFLEET, "loadgen", "--devices", str(DEVICES), "--prefix", PREFIX,
            "--rate-per-device", "0.5", "--duration-s", "600", "--features", "8",
            "--heartbeat-s", "3", "--commit-delay-s", "0.5",
            "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
        ],
    )  # fmt: skip
    engine = create_engine(pg_url)
    try:
        sha = clients[0].upload(bundle)["sha256"]
        ids = [f"{PREFIX}{i:05d}" for i in range(DEVICES)]
        procs.wait_until(
            lambda: len([d for d in clients[1].devices() if d["id"] in ids]) == DEVICES,
            what="the simulated devices to register",
            timeout_s=60,
        )
        # $share: each process stores a part of the telemetry
        procs.wait_until(
            lambda: all(_ingested(p) > 0 for p in ports),
            what="both fleet processes to store telemetry",
            timeout_s=60,
        )
        body = {
            "bundle_sha256": sha,
            "target": {"device_ids": ids},
            "stages": [
                {"percent": 10, "bake_s": 0.5},
                {"percent": 50, "bake_s": 3},
                {"percent": 100, "bake_s": 0.5},
            ],
            "gates": {"min_inferences": 0, "max_latency_p95_ratio": None,
                      "max_error_rate_increase": None, "max_battery_drain_ratio": None},
            "seed": 7,
            "command_timeout_s": 5,
        }  # fmt: skip
        rid = clients[0]._call("POST", "/api/v1/rollouts", body=body)["id"]

        def lease() -> tuple[int, str | None]:
            with engine.connect() as conn:
                stage, owner = conn.execute(
                    text("SELECT stage, lease_owner FROM rollout WHERE id = :r"), {"r": rid}
                ).one()
            return stage, owner

        # in the middle: stage 1 (of 0..2) has started, its bake is running
        procs.wait_until(
            lambda: lease()[0] >= 1 and lease()[1] is not None,
            what="the rollout's second stage",
            timeout_s=60,
        )
        owner = lease()[1]
        assert owner is not None
        owner_pid = int(owner.split("-")[-2])  # host-pid-random (fleet.rollout.runner)
        victim = next(name for name, p in fleets.items() if p.pid == owner_pid)
        survivor = next(name for name in fleets if name != victim)
        fleets[victim].kill()
        killed_at = time.time()
        alive = clients[list(fleets).index(survivor)]
        deadline = time.monotonic() + 120
        phase = None
        while time.monotonic() < deadline:
            try:
                phase = alive._call("GET", f"/api/v1/rollouts/{rid}")["phase"]
            except FleetClientError:
                phase = None
            if phase == "completed":
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"rollout {rid} did not complete after the kill: {phase}\n"
                        f"{procs.describe()}")  # fmt: skip
        # ingest keeps flowing through the survivor: windows from every device after the kill
        since = killed_at + 2
        procs.wait_until(
            lambda: _devices_with_windows_after(engine, since) == DEVICES,
            what="telemetry from every device after the kill",
            timeout_s=60,
        )
        time.sleep(0.5)  # late duplicate deliveries, if any, arrive now
        with engine.connect() as conn:
            outbox = conn.execute(
                text(
                    "SELECT id, device_id, kind, attempt, sent_at IS NOT NULL, send_count "
                    "FROM commandoutbox WHERE rollout_id = :r"
                ),
                {"r": rid},
            ).all()
            decisions = [
                r[0]
                for r in conn.execute(
                    text("SELECT outcome FROM rolloutdecision WHERE rollout_id = :r ORDER BY id"),
                    {"r": rid},
                )
            ]
            phases = Counter(
                r[0]
                for r in conn.execute(
                    text("SELECT phase FROM rolloutdevice WHERE rollout_id = :r"), {"r": rid}
                )
            )
            windows, distinct = conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT (device_id, stream_id, seq)) "
                    "FROM telemetryrecord"
                )
            ).one()
            gaps = conn.execute(
                text(
                    "SELECT coalesce(sum(max_seq - min_seq + 1 - n), 0) FROM (SELECT "
                    "max(seq) AS max_seq, min(seq) AS min_seq, count(*) AS n "
                    "FROM telemetryrecord GROUP BY device_id, stream_id) AS s"
                )
            ).scalar_one()
    finally:
        observer.close()
        engine.dispose()

    # the rollout was decided once: one decision per step, in order, by whoever held the lease
    assert decisions == ["created", "advance", "advance", "advance", "complete"], decisions
    assert phases == {"committed": DEVICES}, phases
    # one outbox row per (device, attempt), attempts 1..k without a gap, every row sent
    attempts: dict[str, list[int]] = defaultdict(list)
    for _id, device, kind, attempt, sent, send_count in outbox:
        assert kind == "deploy" and sent and send_count >= 1, (_id, device, send_count)
        attempts[device].append(attempt)
    assert set(attempts) == set(ids)
    for device, got in attempts.items():
        assert sorted(got) == list(range(1, len(got) + 1)), (device, got)
    # every command delivered is an outbox row of that device; a repeated id is a re-send
    # of the same command (published by the victim, not marked sent before it died)
    by_id = {row[0]: row[1] for row in outbox}
    delivered = Counter(cid for _, cid in observer.deliveries)
    for device, cid in observer.deliveries:
        assert by_id.get(cid) == device, f"{device} got {cid}, which the outbox does not hold"
    assert set(delivered) == set(by_id), "an outbox row marked sent was never delivered"
    # windows are stored once each (the unique key holds; nothing counted twice)
    assert windows == distinct
    print(json.dumps({
        "victim": victim, "devices": DEVICES, "outbox_rows": len(outbox),
        "retries": sum(1 for r in outbox if r[3] > 1),
        "resent_after_kill": sum(r[5] - 1 for r in outbox),
        "same_id_redelivered": sum(n - 1 for n in delivered.values()),
        "windows": windows, "windows_lost_in_seq_gaps": int(gaps),
    }))  # fmt: skip


def _devices_with_windows_after(engine: Any, since: float) -> int:
    from datetime import UTC, datetime

    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(DISTINCT device_id) FROM telemetryrecord WHERE received_at > :t"
                ),
                {"t": datetime.fromtimestamp(since, UTC)},
            ).scalar_one()
        )
