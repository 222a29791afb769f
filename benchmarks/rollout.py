"""Rollout decision latency: from the end of a stage's bake to every command of the next
stage acknowledged by the broker, with 10,000 devices, beside the raw publish baseline.

    .venv/bin/python benchmarks/rollout.py [--quick] [--devices N] [--db URL] [--rounds R]

Each round: a fresh Mosquitto and a fresh database (SQLite file, or ``--db`` PostgreSQL);
N devices registered; a bundle; a rollout with stages 1 % and 100 % (bake 60 s). The 1 %
stage's devices report COMMITTED through the real ingest (`fleet.ingest.handle`), the stage's
canary and a control sample report telemetry (latency sketches), so the gates have real work.
Then the clock is moved to the end of the bake and ONE runner tick is timed: load state,
read reports and registry, compute cohort metrics, evaluate gates, step the machine, write
~N state rows + N outbox rows + the decision in one transaction, publish each command with
the real `FleetMqtt.publish_command` (QoS 1, waits for PUBACK; 16 at a time), and mark them
sent. Simulated devices do not answer (nothing subscribes to their topics: the broker still
acknowledges each publish).

Baseline, same round and broker: one plain paho client publishes the very same payloads to
the same topics with QoS 1 (all at once, then waits for every PUBACK).

Goal: decision latency < 10 s at 10,000 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from sqlalchemy import insert  # noqa: E402
from sqlmodel import Session, col, select  # noqa: E402

from fleet.db import create_db, make_engine  # noqa: E402
from fleet.ingest import handle  # noqa: E402
from fleet.models import Device  # noqa: E402
from fleet.mqtt import FleetMqtt  # noqa: E402
from fleet.registry import BundleStore  # noqa: E402
from fleet.rollout.runner import RolloutRunner  # noqa: E402
from fleet.rollout.service import create_rollout  # noqa: E402
from fleet.rollout.spec import GateConfig, RolloutCreate, StageSpec  # noqa: E402
from fleet.rollout.table import CommandOutbox, Rollout  # noqa: E402
from fleet.settings import FleetSettings  # noqa: E402
from protocol.messages import InstallState, StatusEvent, TelemetryWindow, encode_message  # noqa: E402
from protocol.sketch import FeatureSketch  # noqa: E402
from protocol.topics import Channel, device_topic  # noqa: E402
from tests.broker import start_mosquitto  # noqa: E402
from tests.procs import ProcessGroup  # noqa: E402
from tests.unit.test_fleet_api import make_bundle, make_keys  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rollout.json"
GOAL_S = 10.0
OLD = "0" * 64
BAKE_S = 60.0
CONCURRENCY = 64


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _ingest(engine: Any, msgs: list[Any], now: datetime) -> None:
    with Session(engine) as session:
        for m in msgs:
            ch = Channel.STATUS if m.kind == "status" else Channel.TELEMETRY
            r = handle(device_topic(m.device_id, ch), encode_message(m), session, now=now)
            assert r.reason is None, r
        session.commit()


class OneByOne:
    """The path before `FleetMqtt.publish_commands`: the outbox published each command with
    `publish_command` (its own PUBACK wait) from a pool of threads."""

    def __init__(self, mqtt: FleetMqtt) -> None:
        self.mqtt = mqtt

    def publish_command(self, command: Any) -> None:
        self.mqtt.publish_command(command)


def baseline(host: str, port: int, payloads: list[tuple[str, bytes]]) -> float:
    """Seconds for one paho client to publish every payload with QoS 1 and get every PUBACK."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-baseline", protocol=paho.MQTTv5
    )
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(100)
    client.connect(host, port)
    client.loop_start()
    try:
        t0 = time.perf_counter()
        infos = [client.publish(topic, payload, qos=1) for topic, payload in payloads]
        for info in infos:
            info.wait_for_publish(60)
        return time.perf_counter() - t0
    finally:
        client.loop_stop()
        client.disconnect()


def one_round(work: Path, devices: int, db_url: str | None, variant: str) -> dict[str, Any]:
    work.mkdir(parents=True)
    (work / "keys").mkdir()
    keys = make_keys(work / "keys")
    with ProcessGroup(work / "logs") as group:
        broker = start_mosquitto(group, work, extra_lines=["max_inflight_messages 100"])
        url = db_url or f"sqlite:///{work / 'fleet.db'}"
        settings = FleetSettings(
            database_url=url,
            trust_root=keys.trust_path,
            bundle_dir=work / "bundles",
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            mqtt_session_expiry_s=0,
            offline_after_s=3600,
            reconcile_interval_s=0,
            publish_timeout_s=30,
            rollout_publish_concurrency=CONCURRENCY,
        )
        engine = make_engine(settings.database_url)
        if db_url:
            from sqlmodel import SQLModel

            SQLModel.metadata.drop_all(engine)
        create_db(engine)
        store = BundleStore(
            bundle_dir=settings.bundle_dir, trust=keys.trust, max_upload_bytes=1 << 26
        )
        store.prepare()
        tmp = store.new_upload_path()
        shutil.copy(make_bundle(work / "b.efb", keys.release), tmp)
        t0 = datetime.now(UTC).replace(microsecond=0)
        clock = Clock(t0)
        with Session(engine) as session:
            bundle, _ = store.add(session, tmp)
            sha = bundle.sha256
            rows = [
                {"id": f"bench-{i:05d}", "profile": "x86-cpu", "tags": [], "groups": [],
                 "registered_at": t0, "auto_registered": False, "last_seen": t0, "online": True,
                 "reported_bundle_sha256": OLD}
                for i in range(devices)
            ]  # fmt: skip
            for i in range(0, len(rows), 2000):
                session.execute(insert(Device), rows[i : i + 2000])
            session.commit()
        body = RolloutCreate(
            bundle_sha256=sha,
            stages=(StageSpec(percent=1, bake_s=BAKE_S), StageSpec(percent=100, bake_s=BAKE_S)),
            gates=GateConfig(min_inferences=100, max_battery_drain_ratio=None),
            seed=1,
        )
        with Session(engine) as session:
            rid = create_rollout(session, settings, keys.trust, body, now=t0).id
            session.commit()
        mqtt = FleetMqtt(settings, lambda topic, payload: None)
        mqtt.start()
        if not mqtt.wait_connected(30):
            raise SystemExit("could not connect to the benchmark broker")
        try:
            publisher: Any = mqtt if variant == "pipelined" else OneByOne(mqtt)
            runner = RolloutRunner(engine, settings, publisher, clock=clock)
            runner.tick()  # stage 0 goes out
            with Session(engine) as session:
                stage0 = session.exec(
                    select(CommandOutbox).where(CommandOutbox.rollout_id == rid)
                ).all()
                planned = session.exec(
                    select(Device.id)
                    .where(col(Device.id).not_in([c.device_id for c in stage0]))
                    .limit(500)
                ).all()
            clock.now = t0 + timedelta(seconds=5)
            _ingest(
                engine,
                [
                    StatusEvent(
                        device_id=c.device_id,
                        command_id=c.id,
                        rollout_id=rid,
                        state=InstallState.COMMITTED,
                        bundle_sha256=sha,
                        active_bundle_sha256=sha,
                        sent_at=clock.now,  # the gates read device time, as the telemetry
                    )
                    for c in stage0
                ],
                clock.now,
            )
            runner.tick()  # the stage settles: bake starts
            clock.now = t0 + timedelta(seconds=30)
            lat = FeatureSketch.of([float(x % 20 + 1) for x in range(2000)]).to_wire()
            windows = []
            for seq, (device_id, bundle_sha) in enumerate(
                [(c.device_id, sha) for c in stage0] + [(d, OLD) for d in planned]
            ):
                windows.append(
                    TelemetryWindow(
                        device_id=device_id,
                        stream_id="b",
                        seq=seq,
                        window_start=clock.now - timedelta(seconds=20),
                        window_end=clock.now,
                        bundle_sha256=bundle_sha,
                        model_name="digits",
                        model_version=3,
                        inference_count=200,
                        latency_ms=lat,
                    )
                )
            _ingest(engine, windows, clock.now)
            with Session(engine) as session:
                row = session.get(Rollout, rid)
                assert row is not None and row.phase == "baking", row.phase if row else None
                bake_end = row.bake_started_at + timedelta(seconds=BAKE_S)  # type: ignore[operator]
            clock.now = bake_end
            started = time.perf_counter()
            stepped = runner.step_rollout(rid, clock.now)  # the decision and its outbox rows
            step_s = time.perf_counter() - started
            sent_n = runner.dispatcher.dispatch()  # every command out, each PUBACKed
            latency = time.perf_counter() - started
            assert stepped is not None
            with Session(engine) as session:
                row = session.get(Rollout, rid)
                sent = session.exec(
                    select(CommandOutbox).where(
                        CommandOutbox.rollout_id == rid, col(CommandOutbox.stage) == 1
                    )
                ).all()
            assert row is not None and row.stage == 1, (row.phase, row.reason) if row else None
            assert all(c.sent_at is not None for c in sent), "some commands were not sent"
            payloads = [
                (device_topic(c.device_id, Channel.COMMAND), c.payload.encode()) for c in sent
            ]
        finally:
            mqtt.stop()
        base = baseline(broker.host, broker.port, payloads)
        engine.dispose()
    return {
        "variant": variant,
        "devices": devices,
        "commands": len(sent),
        "decision_latency_s": latency,
        "baseline_publish_s": base,
        "ratio": latency / base if base else None,
        "step_s": step_s,
        "sent": sent_n,
    }


VARIANTS = {
    "threads": "FleetMqtt.publish_command, 64 threads (before)",
    "pipelined": "FleetMqtt.publish_commands, a batch on one client (the outbox's path)",
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2,000 devices, one round")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--db", default=None, help="postgresql+psycopg://... (default: SQLite file)")
    args = ap.parse_args()
    devices = args.devices or (2000 if args.quick else 10_000)
    rounds = args.rounds or 1
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-"))
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        for i in range(rounds):
            for variant in VARIANTS:
                r = one_round(work / f"r{i}-{variant}", devices, args.db, variant)
                results[variant].append(r)
                print(f"round {i + 1} {variant}: {json.dumps(r)}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {
        "benchmark": "rollout decision latency",
        "devices": devices,
        "db": "postgresql" if args.db else "sqlite",
        "goal_s": GOAL_S,
        "variants": {},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "measured_at": datetime.now(UTC).isoformat(),
    }
    for variant, rs in results.items():
        lat = statistics.median(r["decision_latency_s"] for r in rs)
        summary["variants"][variant] = {
            "description": VARIANTS[variant],
            "rounds": rs,
            "median_decision_latency_s": lat,
            "median_baseline_publish_s": statistics.median(r["baseline_publish_s"] for r in rs),
            "median_ratio": statistics.median(r["ratio"] for r in rs),
            "meets_goal": lat < GOAL_S,
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    n = results["threads"][0]["commands"]
    print(f"\n## Rollout decision latency: {devices:,} devices, {n:,} commands, {summary['db']}\n")
    print("| publish path | bake end -> every command PUBACKed (s) | step+write (s) "
          "| raw paho QoS 1, same payloads (s) | ratio | goal < 10 s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for v in summary["variants"].values():
        step_s = statistics.median(r["step_s"] for r in v["rounds"])
        print(
            f"| {v['description']} | {v['median_decision_latency_s']:.2f} | {step_s:.2f} | "
            f"{v['median_baseline_publish_s']:.2f} | {v['median_ratio']:.1f}x | "
            f"{'yes' if v['meets_goal'] else 'NO'} |"
        )
    print(f"\nMedians of {rounds} round(s). Results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
