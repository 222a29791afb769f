"""Scale-out: 10,000 simulated devices against several fleet processes on one PostgreSQL
database and one Mosquitto, with heartbeats, telemetry and a staged rollout to every device.

    .venv/bin/python benchmarks/scale.py [--quick] [--devices N] [--fleets F] [--sqlite]

Real processes: Mosquitto, PostgreSQL (a private cluster, as tests/pg.py starts it; or
SQLite with ``--sqlite``), F x ``edgefleet fleet serve`` sharing ``$share/fleet/...`` and the
rollout leases, and ``edgefleet loadgen`` (2 processes) playing the devices: presence and a
heartbeat each at start, a heartbeat every ``--heartbeat-s``, telemetry windows at
``--rate-per-device`` (64 input sketches each, like the agent's), and answers to deploy
commands (RECEIVED at once, COMMITTED after ``--commit-delay-s``).

Phases and figures:

1. register: from the loadgen's start until every device is in the database (presence +
   heartbeat per device) -> devices registered per second;
2. steady ingest: telemetry windows stored per second (slope between 5% and 95% of the
   phase's rows), beside the rate offered; fleet CPU per process and per 1,000 windows;
3. rollout (stages 1%, 10%, 50%, 100%, short bakes, gates on install failures only): for each
   stage, seconds from the decision that started it to the last of its devices committed
   (as the fleet saw it), and commands per second; the whole rollout's seconds;
4. database size after the run (PostgreSQL: pg_database_size and the biggest tables).

CPU is per process group (utime + stime from /proc) over each phase: cores = CPU s / wall s.
The machine's other load (other people's tests) counts against every figure.
Baselines: the broker-only delivery rate comes from benchmarks/fleet_ingest.py; here the
baseline of the ingest rate is the rate the devices offered in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fleet_ingest import _postgres, group_cpu_s  # noqa: E402
from tests.broker import start_mosquitto  # noqa: E402
from tests.procs import ManagedProcess, ProcessGroup, free_port  # noqa: E402
from tests.unit.test_fleet_api import make_bundle, make_keys  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
PY = sys.executable
PREFIX = "scale-"
#: goals (issue 10): 10,000 devices on one machine's worth of fleet processes
GOAL_DEVICES = 10_000
GOAL_ROLLOUT_S = 600.0  # a 4-stage rollout to 10,000 devices, bakes excluded, in 10 min


def _sql(db_url: str) -> Any:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url) if db_url.startswith("postgresql") else None
    if engine is None:
        from fleet.db import make_engine

        engine = make_engine(db_url)

    def q(sql: str, **params: Any) -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    q.engine = engine  # type: ignore[attr-defined]
    return q


class Cpu:
    """CPU seconds of named process groups (or trees: negative ids), read between phases."""

    def __init__(self, groups: dict[str, int]) -> None:
        self.groups = groups
        self.last: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        now = {k: group_cpu_s(v) for k, v in self.groups.items()}
        # a group that exited keeps its last reading
        self.last = {k: max(now.get(k, 0.0), self.last.get(k, 0.0)) for k in self.groups}
        return dict(self.last)


def _cores(a: dict[str, float], b: dict[str, float], dt: float) -> dict[str, float]:
    return {k: round((b[k] - a.get(k, 0.0)) / dt, 2) for k in b} if dt > 0 else {}


def _wait(pred: Any, what: str, timeout_s: float, poll_s: float = 0.5) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - t0


def _http(port: int, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"null")


def _start_fleets(
    group: ProcessGroup, work: Path, db: str, broker_port: int, n: int
) -> list[tuple[ManagedProcess, int]]:
    env = {
        "EDGEFLEET_FLEET_AUTH_ENABLED": "false",  # a private port; the benchmark reads the DB
        "EDGEFLEET_FLEET_MQTT_SESSION_EXPIRY_S": "0",
        "EDGEFLEET_FLEET_RECONCILE_INTERVAL_S": "0",
        "EDGEFLEET_FLEET_OFFLINE_AFTER_S": "3600",
        "EDGEFLEET_FLEET_ROLLOUT_TICK_S": "0.5",
    }
    out = []
    for i in range(n):
        port = free_port()
        proc = group.start(
            f"fleet{i}",
            [
                PY, "-m", "edgefleet.cli", "fleet", "serve",
                "--trust-root", str(work / "keys" / "trust-root.json"), "--db", db,
                "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker_port),
                "--bundle-dir", str(work / "bundles"), "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning",
            ],
            extra_env=env,
        )  # fmt: skip
        out.append((proc, port))
    for proc, port in out:
        group.wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=120, process=proc)
        group.wait_until(
            lambda p=port: _http(p, "GET", "/healthz").get("mqtt") == "connected",
            what="a fleet's MQTT connection",
            timeout_s=60,
            process=proc,
        )
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    (work / "keys").mkdir(parents=True)
    keys = make_keys(work / "keys")
    bundle = make_bundle(work / "b.efb", keys.release)
    cluster = None
    if args.sqlite:
        db = f"sqlite:///{work / 'fleet.db'}"
    else:
        cluster = _postgres(work)
        if cluster is None:
            raise SystemExit("PostgreSQL is not available (use --sqlite)")
        db = cluster.create_database("scale")
    try:
        profiles = [profile_ingest(f"sqlite:///{work / 'profile.db'}")]
        if cluster is not None:
            profiles.append(profile_ingest(cluster.create_database("profile")))
        for prof in profiles:
            print(f"  ingest profile: {json.dumps(prof)}", flush=True)
        result = _run(args, work, db, bundle, cluster)
        result["ingest_profile"] = profiles
        return result
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.base, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, db: str, bundle: Path, cluster: Any) -> Any:
    q = _sql(db)
    result: dict[str, Any] = {"database": "sqlite" if args.sqlite else "postgresql"}
    with ProcessGroup(work / "logs") as group:
        broker = start_mosquitto(
            group, work, extra_lines=["max_queued_messages 0", "max_inflight_messages 100"]
        )
        t0 = time.monotonic()
        migrate = group.start("migrate", [PY, "-m", "edgefleet.cli", "fleet", "migrate",
                                          "--db", db])  # fmt: skip
        if migrate.wait(timeout_s=300) != 0:
            raise SystemExit(f"migrate failed:\n{migrate.tail()}")
        result["migrate_s"] = round(time.monotonic() - t0, 2)
        fleets = _start_fleets(group, work, db, broker.port, args.fleets)
        groups = {f"fleet{i}": p.pid for i, (p, _) in enumerate(fleets)}
        groups["mosquitto"] = broker.process.pid
        if cluster is not None:
            pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
            groups["postgres"] = -pid  # its backends are its children
        port = fleets[0][1]
        sha = _upload(port, bundle)
        load = group.start(
            "loadgen",
            [
                PY, "-m", "edgefleet.cli", "loadgen", "--devices", str(args.devices),
                "--prefix", PREFIX, "--rate-per-device", str(args.rate_per_device),
                "--duration-s", str(args.duration_s), "--linger-s", "3600",
                "--heartbeat-s", str(args.heartbeat_s),
                "--commit-delay-s", str(args.commit_delay_s), "--processes", "2",
                "--mqtt-port", str(broker.port), "--json",
            ],
        )  # fmt: skip
        groups["loadgen"] = load.pid
        cpu = Cpu(groups)

        # 1. register
        c0, w0 = cpu.read(), time.monotonic()
        dt = _wait(
            lambda: q("SELECT count(*) FROM device")[0][0] >= args.devices,
            "every device to register",
            timeout_s=args.devices * 0.2 + 300,
        )
        c1, w1 = cpu.read(), time.monotonic()
        result["register"] = {
            "devices": args.devices,
            "seconds": round(dt, 1),
            "devices_per_s": round(args.devices / dt, 1),
            "cpu_cores": _cores(c0, c1, w1 - w0),
        }
        print(f"  register: {json.dumps(result['register'])}", flush=True)

        # 2. steady ingest (telemetry + heartbeats), no rollout yet
        n0 = q("SELECT count(*) FROM telemetryrecord")[0][0]
        samples = []
        end = time.monotonic() + args.ingest_s
        c2, w2 = cpu.read(), time.monotonic()
        while time.monotonic() < end:
            samples.append((time.monotonic(), q("SELECT count(*) FROM telemetryrecord")[0][0]))
            time.sleep(1.0)
        c3, w3 = cpu.read(), time.monotonic()
        n1 = samples[-1][1]
        rate = (n1 - samples[0][1]) / max(samples[-1][0] - samples[0][0], 1e-9)
        fleet_cores = sum(v for k, v in _cores(c2, c3, w3 - w2).items() if k.startswith("fleet"))
        offered = args.devices * args.rate_per_device
        hb_rate = args.devices / args.heartbeat_s if args.heartbeat_s else 0.0
        result["ingest"] = {
            "seconds": round(w3 - w2, 1),
            "windows_stored": n1 - n0,
            "windows_per_s": round(rate, 1),
            "offered_windows_per_s": round(offered, 1),
            "heartbeats_offered_per_s": round(hb_rate, 1),
            "fraction_of_offered": round(rate / offered, 2) if offered else None,
            "cpu_cores": _cores(c2, c3, w3 - w2),
            "fleet_cpu_ms_per_window": round(1000 * fleet_cores / rate, 2) if rate else None,
        }
        print(f"  ingest: {json.dumps(result['ingest'])}", flush=True)

        # 3. rollout to every device
        body = {
            "bundle_sha256": sha,
            "target": {"device_ids": [f"{PREFIX}{i:05d}" for i in range(args.devices)]},
            "stages": [{"percent": p, "bake_s": args.bake_s} for p in (1, 10, 50, 100)],
            "gates": {"min_inferences": 0, "max_latency_p95_ratio": None,
                      "max_error_rate_increase": None, "max_battery_drain_ratio": None,
                      "max_drift_score": None},
            "seed": 1,
            "command_timeout_s": 600,
        }  # fmt: skip
        c4, w4 = cpu.read(), time.monotonic()
        rid = _http(port, "POST", "/api/v1/rollouts", body)["id"]
        phase = _wait_rollout(port, rid, timeout_s=args.rollout_timeout_s)
        c5, w5 = cpu.read(), time.monotonic()
        result["rollout"] = _rollout_figures(q, rid, phase, w5 - w4, args)
        result["rollout"]["cpu_cores"] = _cores(c4, c5, w5 - w4)
        print(f"  rollout: {json.dumps(result['rollout'])}", flush=True)

        # 4. what it all cost
        result["db"] = _db_size(q, db, args)
        result["totals"] = {
            "telemetry_rows": q("SELECT count(*) FROM telemetryrecord")[0][0],
            "device_events": q("SELECT count(*) FROM deviceevent")[0][0],
            "fleet_processes": args.fleets,
        }
        result["fleet_stats"] = [_stats(p) for _, p in fleets]
        load.terminate()
    q.engine.dispose()  # type: ignore[attr-defined]
    return result


def profile_ingest(db_url: str, windows: int = 2000, devices: int = 500) -> dict[str, Any]:
    """The ingest worker's CPU for telemetry, in this process under cProfile: the share in
    decoding (JSON + pydantic validation of the window and its 64+2 sketches) beside the
    share in storing (SQLAlchemy + the database driver)."""
    import cProfile
    import pstats

    from edgefleet.loadgen import WindowTemplate
    from fleet.db import make_engine, migrate
    from fleet.ingest import IngestStats
    from fleet.worker import ingest_batch

    migrate(db_url)
    engine = make_engine(db_url)
    tpl = WindowTemplate(features=64, rows=20)
    now = time.time()
    items = []
    for i in range(windows):
        device = f"prof-{i % devices:05d}"
        items.append((
            f"edgefleet/v1/{device}/telemetry",
            tpl.render(device_id=device, seq=i // devices, stream_id="p",
                       window_start=now - 2, window_end=now),
        ))  # fmt: skip
    ingest_batch(engine, items[:devices], IngestStats())  # devices exist: steady state
    prof = cProfile.Profile()
    t0 = time.process_time()
    prof.enable()
    for i in range(devices, windows, 500):
        ingest_batch(engine, items[i : i + 500], IngestStats())
    prof.disable()
    cpu_s = time.process_time() - t0
    engine.dispose()
    stats: Any = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())

    def cum(file_end: str, func: str) -> float:
        return sum(v[3] for k, v in stats.items() if k[0].endswith(file_end) and k[2] == func)

    decode = cum("fleet/ingest.py", "decode")
    validate = cum("pydantic/main.py", "model_validate_json") or cum(
        "protocol/messages.py", "decode_message"
    )
    store = cum("fleet/ingest.py", "store_telemetry")
    n = windows - devices
    return {
        "database": db_url.split(":", 1)[0],
        "windows": n,
        "cpu_ms_per_window": round(1000 * cpu_s / n, 2),
        "decode_share": round(decode / total, 2) if total else None,
        "pydantic_validate_share": round(validate / total, 2) if total else None,
        "store_share": round(store / total, 2) if total else None,
    }


def _upload(port: int, bundle: Path) -> str:
    from fleet.client import FleetClient

    return str(FleetClient(f"http://127.0.0.1:{port}", timeout_s=60).upload(bundle)["sha256"])


def _stats(port: int) -> dict[str, float]:
    import re

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    # a full backlog (ingest_queue_max) blocks the process's MQTT thread: see docs/scaling.md
    for name in ("messages_received_total", "telemetry_windows_ingested_total", "ingest_backlog"):
        m = re.search(rf"^edgefleet_fleet_{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def _wait_rollout(port: int, rid: str, timeout_s: float) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        phase = str(_http(port, "GET", f"/api/v1/rollouts/{rid}")["phase"])
        if phase in ("completed", "failed", "rolled_back", "aborted", "paused"):
            return phase
        time.sleep(1.0)
    return "timed_out"


def _rollout_figures(q: Any, rid: str, phase: str, wall_s: float, args: Any) -> dict[str, Any]:
    from datetime import datetime

    def ts(v: Any) -> float:
        if isinstance(v, str):
            v = datetime.fromisoformat(v)
        return float(v.timestamp()) if v.tzinfo else float(v.replace(tzinfo=None).timestamp())

    decisions = q(
        "SELECT stage, outcome, at FROM rolloutdecision WHERE rollout_id = :r ORDER BY id", r=rid
    )
    stages = q(
        "SELECT stage, count(*), max(updated_at), sum(CASE WHEN phase = 'committed' THEN 1 "
        "ELSE 0 END) FROM rolloutdevice WHERE rollout_id = :r GROUP BY stage ORDER BY stage",
        r=rid,
    )
    # the decision that started stage s is the (s+1)-th "advance" (stage index s)
    # "advance" at stage s: stage s passed its gates and stage s+1 started (machine.py)
    started: dict[int, float] = {}
    for stage, outcome, at in decisions:
        if outcome == "created":
            started.setdefault(0, ts(at))
        elif outcome == "advance":
            started[stage + 1] = ts(at)
    per_stage = []
    for stage, devices, last_update, committed in stages:
        start = started.get(stage)
        done = int(committed or 0) == devices  # else the last update is not a commit
        latency = (
            round(ts(last_update) - start, 1)
            if done and start is not None and last_update
            else None
        )
        per_stage.append({
            "stage": stage, "devices": devices, "committed": int(committed or 0),
            "seconds_to_last_commit": latency,
            "commands_per_s": round(devices / latency, 1) if latency else None,
        })  # fmt: skip
    outbox = q(
        "SELECT count(*), sum(send_count), count(DISTINCT device_id) FROM commandoutbox "
        "WHERE rollout_id = :r",
        r=rid,
    )[0]
    bakes = args.bake_s * 4
    return {
        "phase": phase,
        "seconds": round(wall_s, 1),
        "seconds_without_bakes": round(wall_s - bakes, 1),
        "stages": per_stage,
        "decisions": [o for _, o, _ in decisions],
        "outbox_rows": outbox[0],
        "publishes": int(outbox[1] or 0),
        "devices_commanded": outbox[2],
    }


def _db_size(q: Any, db: str, args: Any) -> dict[str, Any]:
    if db.startswith("sqlite"):
        path = Path(db.removeprefix("sqlite:///"))
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        return {"bytes": size, "tables": {}}
    size = q("SELECT pg_database_size(current_database())")[0][0]
    tables = q(
        "SELECT relname, pg_total_relation_size(relid) FROM pg_catalog.pg_statio_user_tables "
        "ORDER BY 2 DESC LIMIT 6"
    )
    rows = q("SELECT count(*) FROM telemetryrecord")[0][0]
    tele = dict(tables).get("telemetryrecord", 0)
    return {
        "bytes": int(size),
        "tables": {name: int(b) for name, b in tables},
        "bytes_per_window": round(tele / rows) if rows else None,
        "per_device_day_mb_at_rate": round(
            (tele / rows if rows else 0) * args.rate_per_device * 86400 / 1e6, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 devices, shorter phases")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--fleets", type=int, default=2, help="fleet processes")
    parser.add_argument(
        "--rate-per-device", type=float, default=0.02,
        help="telemetry windows per second per device (0.02: one every 50 s)",
    )  # fmt: skip
    parser.add_argument("--heartbeat-s", type=float, default=60.0)
    parser.add_argument("--ingest-s", type=float, default=60.0, help="steady-ingest phase")
    parser.add_argument("--bake-s", type=float, default=2.0)
    parser.add_argument("--commit-delay-s", type=float, default=1.0)
    parser.add_argument("--rollout-timeout-s", type=float, default=1800.0)
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.devices = min(args.devices, 1000)
        args.ingest_s = min(args.ingest_s, 20.0)
        args.rollout_timeout_s = min(args.rollout_timeout_s, 600.0)
    # telemetry runs through every phase; the loadgen lingers (answering) after it
    args.duration_s = 3600.0
    work = args.work or Path(tempfile.mkdtemp(prefix="edgefleet-bench-scale-"))
    t0 = time.monotonic()
    result = run(args, work)
    out = {
        "benchmark": "scale",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_at_end": os.getloadavg()},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goal": {"devices": GOAL_DEVICES, "rollout_s_without_bakes": GOAL_ROLLOUT_S},
        "wall_s": round(time.monotonic() - t0, 1),
        **result,
    }  # fmt: skip
    ok = out["rollout"]["phase"] == "completed"
    out["goal_met"] = bool(
        ok
        and args.devices >= GOAL_DEVICES
        and out["rollout"]["seconds_without_bakes"] <= GOAL_ROLLOUT_S
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print_table(out)
    print(f"\nJSON: {RESULTS}")


def print_table(out: dict[str, Any]) -> None:
    """The markdown table: each figure beside its baseline and goal."""
    p, reg, ing, ro = out["params"], out["register"], out["ingest"], out["rollout"]
    print()
    print(
        f"{p['devices']:,} devices, {p['fleets']} fleet processes on {out['database']}, "
        f"telemetry {p['rate_per_device']}/s/device, heartbeat every {p['heartbeat_s']:g} s; "
        f"load average at end {out['host']['loadavg_at_end'][0]:.1f}"
    )
    print()
    print("| figure | value | baseline (same run) | goal |")
    print("|---|---:|---:|---|")
    print(f"| devices registered /s | {reg['devices_per_s']:,.1f} | - | - |")
    print(
        f"| telemetry windows stored /s | {ing['windows_per_s']:,.1f} | "
        f"{ing['offered_windows_per_s']:,.1f} offered | = offered |"
    )
    print(f"| fleet CPU ms per window | {ing['fleet_cpu_ms_per_window']} | - | - |")
    cores = ", ".join(f"{k} {v:.2f}" for k, v in ing["cpu_cores"].items())
    print(f"| CPU cores during ingest | {cores} | - | - |")
    for s in ro["stages"]:
        print(
            f"| stage {s['stage']}: {s['devices']:,} devices, s to last commit | "
            f"{s['seconds_to_last_commit']} | {s['commands_per_s']} commands/s | - |"
        )
    print(
        f"| rollout s (without {4 * p['bake_s']:g} s of bakes) | {ro['seconds_without_bakes']} "
        f"| - | <= {GOAL_ROLLOUT_S:.0f} s, phase {ro['phase']} |"
    )
    cores = ", ".join(f"{k} {v:.2f}" for k, v in ro["cpu_cores"].items())
    print(f"| CPU cores during rollout | {cores} | - | - |")
    for prof in out.get("ingest_profile", []):
        print(
            f"| ingest worker CPU ms per window ({prof['database']}, cProfile) | "
            f"{prof['cpu_ms_per_window']} | decode {prof['decode_share']:.0%} (pydantic "
            f"{prof['pydantic_validate_share']:.0%}), store {prof['store_share']:.0%} | - |"
        )
    print(
        f"| database MB | {out['db']['bytes'] / 1e6:,.1f} | "
        f"{out['db'].get('bytes_per_window', '-')} B per window | - |"
    )


if __name__ == "__main__":
    main()
