"""Fleet ingest throughput: telemetry windows per second from simulated devices, through
Mosquitto, into the real fleet process, beside the broker's own delivery rate.

    .venv/bin/python benchmarks/fleet_ingest.py [--quick] [--devices N] [--duration-s S]

Each case gets a fresh Mosquitto (unbounded QoS 1 queues, so a slow consumer builds a
backlog instead of losing messages) and the same publishers (`edgefleet.loadgen`, same
devices, same payloads, telemetry only):

- broker: a plain paho subscriber on ``edgefleet/v1/+/telemetry`` only counts messages;
- fleet, SQLite, 1 worker: ``edgefleet fleet serve``; windows stored = rows in the DB;
- fleet, SQLite, 2 workers: two ``fleet serve`` processes sharing the ``$share`` group and
  one database;
- fleet, PostgreSQL, 1 and 2 workers: when the server binaries are installed.

The devices offer more than the goal (10,000 x 0.7 = 7,000 windows/s by default): a
consumer that merely keeps up with 5,000 offered could never show that it does 5,000. A
rate is the slope of the stored (or delivered) count from 5% of the final count to the
moment the publishers finish: the consumer shares the machine with the load the whole
time. The slope from 5% to 95% (``rate_all``, the figure runs before 2026-12 reported)
also counts the backlog drained after the load, with the machine to itself. CPU is each
process group's (utime+stime) over the first interval, in cores (from /proc).
Goal: >= 5,000 windows/s and >= 50% of the broker's rate. The machine's other load (other
people's tests) counts against every figure; the per-CPU-second figures move less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.keys_cli import init_keys  # noqa: E402
from edgefleet.loadgen import WindowTemplate  # noqa: E402
from tests.broker import start_mosquitto  # noqa: E402
from tests.procs import ManagedProcess, ProcessGroup, free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fleet_ingest.json"
PY = sys.executable
GOAL_RATE = 5000.0
GOAL_FRACTION = 0.5
_SAMPLE_S = 0.5
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid``, in seconds; a
    negative ``pgid`` means the process ``-pgid`` and its children (PostgreSQL's backends
    each start a session of their own)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if pgid >= 0:
            mine = int(fields[2]) == pgid
        else:
            mine = int(entry.name) == -pgid or int(fields[1]) == -pgid
        if mine:
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


@dataclass
class Sampler:
    """Samples a counter and the CPU of named process groups every ``_SAMPLE_S``."""

    count: Any
    groups: dict[str, int]
    samples: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            prev = self.samples[-1][2] if self.samples else {}
            # a process that exited takes its CPU time with it: keep the highest seen
            cpu = {
                name: max(group_cpu_s(pgid), prev.get(name, 0.0))
                for name, pgid in self.groups.items()
            }
            try:
                n = self.count()
            except Exception:  # a database not created yet
                n = 0
            self.samples.append((time.monotonic(), n, cpu))
            self._stop.wait(_SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def rate(self, load_end: float) -> dict[str, Any]:
        """The consumer's rate while the devices publish, and over the whole run.

        ``rate``: the slope of the count from 5% of the final count to ``load_end`` (the
        publishers' last window), with each group's cores over the same interval: the
        consumer shares the machine with the load there. ``rate_all``: the slope from 5%
        to 95%, which includes draining a backlog after the load ended, with the machine
        to itself (the figure earlier runs reported).
        """
        final = self.latest()
        if final < 20:
            return {"count": final, "rate": 0.0, "rate_all": 0.0, "cpu_cores": {},
                    "interval_s": 0.0}  # fmt: skip
        lo = next(s for s in self.samples if s[1] >= 0.05 * final)
        hi = next(s for s in self.samples if s[1] >= 0.95 * final)
        under = [s for s in self.samples if lo[0] < s[0] <= load_end]
        end = under[-1] if under else hi
        dt = max(end[0] - lo[0], 1e-9)
        cores = {k: round((end[2].get(k, 0) - lo[2].get(k, 0)) / dt, 2) for k in end[2]}
        return {
            "count": final,
            "rate": round((end[1] - lo[1]) / dt, 1),
            "rate_all": round((hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9), 1),
            "interval_s": round(dt, 1),
            "cpu_cores": cores,
        }


SUBSCRIBER = r"""
import sys, time, threading, paho.mqtt.client as m
from paho.mqtt.enums import CallbackAPIVersion
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n = [0]
c = m.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=m.MQTTv5)
def on_message(client, userdata, msg): n[0] += 1
c.on_message = on_message
c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("edgefleet/v1/+/telemetry", 1)
c.connect(host, port)
c.loop_start()
while True:
    tmp = out + ".tmp"
    open(tmp, "w").write(str(n[0]))
    __import__("os").replace(tmp, out)
    time.sleep(0.2)
"""


def _fleet_argv(keys: Path, db: str, broker_port: int, bundles: Path, port: int) -> list[str]:
    return [
        PY, "-m", "edgefleet.cli", "fleet", "serve",
        "--trust-root", str(keys / "trust-root.json"), "--db", db,
        "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker_port),
        "--bundle-dir", str(bundles), "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning",
    ]  # fmt: skip


def _fleet_env() -> dict[str, str]:
    # the benchmark polls the database, not the API; no tokens needed on a private port
    return {"EDGEFLEET_FLEET_AUTH_ENABLED": "false"}


def _wait_connected(group: ProcessGroup, port: int, proc: ManagedProcess) -> None:
    import urllib.request

    def ok() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return json.loads(r.read()).get("mqtt") == "connected"
        except OSError:
            return False

    group.wait_until(ok, what="the fleet's MQTT connection", timeout_s=90, process=proc)


def run_case(
    name: str,
    work: Path,
    keys: Path,
    args: argparse.Namespace,
    *,
    consumer: str,
    workers: int = 1,
    db_url: str | None = None,
    server_pgid: int | None = None,
) -> dict[str, Any]:
    """One case: fresh broker, consumer(s), the load; returns its figures."""
    case_dir = work / name
    case_dir.mkdir(parents=True)
    with ProcessGroup(case_dir / "logs") as group:
        broker = start_mosquitto(
            group, case_dir, extra_lines=["max_queued_messages 0", "max_inflight_messages 100"]
        )
        groups = {"mosquitto": broker.process.pid}
        if server_pgid is not None:  # the database server shares the machine too
            groups["postgres"] = server_pgid
        if consumer == "subscriber":
            out = case_dir / "count"
            script = case_dir / "sub.py"
            script.write_text(SUBSCRIBER)
            sub = group.start(
                "subscriber", [PY, str(script), broker.host, str(broker.port), str(out)]
            )
            group.wait_until(out.exists, what="the subscriber", timeout_s=30, process=sub)
            groups["subscriber"] = sub.pid

            def count() -> int:
                return int(out.read_text() or 0)

        else:
            assert db_url is not None
            for w in range(workers):
                port = free_port()
                proc = group.start(
                    f"fleet{w}",
                    _fleet_argv(keys, db_url, broker.port, case_dir / "bundles", port),
                    extra_env=_fleet_env(),
                )
                _wait_connected(group, port, proc)
                groups[f"fleet{w}"] = proc.pid
            count = _db_counter(db_url)
        sampler = Sampler(count=count, groups=groups)
        load = group.start(
            "loadgen",
            [
                PY, "-m", "edgefleet.loadgen", "--devices", str(args.devices),
                "--rate-per-device", str(args.rate_per_device),
                "--duration-s", str(args.duration_s), "--rows-per-window", str(args.rows),
                "--mqtt-port", str(broker.port), "--no-announce", "--heartbeat-s", "0",
                "--processes", str(args.publishers), "--prefix", f"bench-{name}-", "--json",
            ],
        )  # fmt: skip
        groups["loadgen"] = load.pid
        sampler.start()
        load.wait(timeout_s=args.duration_s * 20 + 120)
        load_end = time.monotonic()
        report = json.loads(load.log_text().strip().splitlines()[-1])
        sent = report["telemetry_sent"]
        # wait for the consumer to finish (or to stop making progress)
        last, still = -1, time.monotonic()
        deadline = time.monotonic() + args.drain_timeout_s
        while time.monotonic() < deadline and sampler.latest() < sent:
            if sampler.latest() != last:
                last, still = sampler.latest(), time.monotonic()
            elif time.monotonic() - still > 20:
                break
            time.sleep(0.5)
        sampler.stop()
        result = sampler.rate(load_end)
        result.update(
            case=name,
            consumer=consumer,
            workers=workers,
            sent=sent,
            offered_rate=report["achieved_rate"],
            complete=sampler.latest() >= sent,
        )
        if consumer == "fleet":
            result["per_fleet_cpu_s"] = _per_cpu(result)
        print(f"  {name}: {json.dumps(result)}", flush=True)
        return result


def _per_cpu(result: dict[str, Any]) -> float | None:
    fleet_cores = sum(v for k, v in result["cpu_cores"].items() if k.startswith("fleet"))
    return round(result["rate"] / fleet_cores, 1) if fleet_cores else None


def _db_counter(db_url: str) -> Any:
    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")

        def count() -> int:
            with sqlite3.connect(path, timeout=5) as conn:
                return int(conn.execute("SELECT count(*) FROM telemetryrecord").fetchone()[0])

        return count
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)

    def pg_count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM telemetryrecord")).scalar_one())

    return pg_count


def _postgres(work: Path) -> Any:
    try:
        from tests.pg import PostgresCluster, find_pg_bin_dir
    except ImportError:
        return None
    import pwd
    import tempfile

    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        return None
    base = Path(tempfile.mkdtemp(prefix="edgefleet-bench-pg-"))
    run_as = None
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = "postgres"
    cluster = PostgresCluster(bin_dir=bin_dir, base=base, port=free_port(), run_as=run_as)
    try:
        cluster.start()
    except Exception as exc:
        print(f"  PostgreSQL did not start: {exc}", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        return None
    return cluster


def _server_pgid(cluster: Any) -> int | None:
    """The PostgreSQL server's postmaster and its children, as `group_cpu_s` takes them."""
    try:
        return -int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def payload_sizes(features: int) -> dict[str, int]:
    """Wire size of one window for a few window lengths (10 inferences/s)."""
    out = {}
    for rows in (1, 20, 100, 600, 3000):
        raw = WindowTemplate(features=features, rows=rows).render(
            device_id="bench-00000", seq=1, stream_id="s", window_start=0.0, window_end=2.0
        )
        out[str(rows)] = len(raw)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows, fewer cases")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rate-per-device", type=float, default=0.7)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=20, help="inferences per window")
    parser.add_argument("--publishers", type=int, default=2, help="loadgen processes")
    parser.add_argument("--drain-timeout-s", type=float, default=600.0)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated subset of the fleet cases "
        "(sqlite1w,sqlite2w,postgres1w,postgres2w); the broker case always runs",
    )
    args = parser.parse_args()
    wanted = set(filter(None, args.cases.split(",")))
    if args.quick:
        args.duration_s = min(args.duration_s, 6.0)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    keys = work / "keys"
    init_keys(keys)
    sizes = payload_sizes(64)
    print(f"window payload bytes by inferences per window (64 features): {sizes}", flush=True)
    cases: list[dict[str, Any]] = []
    cases.append(run_case("broker", work, keys, args, consumer="subscriber"))
    for workers in (1, 2):
        if (args.quick and workers == 2) or (wanted and f"sqlite{workers}w" not in wanted):
            continue
        db = f"sqlite:///{work / f'sqlite{workers}' / 'fleet.db'}"
        (work / f"sqlite{workers}").mkdir()
        cases.append(
            run_case(f"sqlite{workers}w", work, keys, args, consumer="fleet", workers=workers,
                     db_url=db)
        )  # fmt: skip
        shutil.rmtree(work / f"sqlite{workers}", ignore_errors=True)  # ~1.3 GB per case
    pg_wanted = not wanted or any(c.startswith("postgres") for c in wanted)
    if not args.quick and not args.no_postgres and pg_wanted:
        cluster = _postgres(work)
        if cluster is None:
            print("  PostgreSQL not available: skipped", flush=True)
        else:
            try:
                for workers in (1, 2):
                    if wanted and f"postgres{workers}w" not in wanted:
                        continue
                    url = cluster.create_database(f"bench{workers}")
                    cases.append(
                        run_case(f"postgres{workers}w", work, keys, args, consumer="fleet",
                                 workers=workers, db_url=url, server_pgid=_server_pgid(cluster))
                    )  # fmt: skip
                    cluster.drop_database(f"bench{workers}")
            finally:
                cluster.stop()
                shutil.rmtree(cluster.base, ignore_errors=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    broker_rate = cases[0]["rate"]
    for c in cases[1:]:
        c["fraction_of_broker"] = round(c["rate"] / broker_rate, 2) if broker_rate else None
        c["goal_met"] = bool(
            c["rate"] >= GOAL_RATE and (c["fraction_of_broker"] or 0) >= GOAL_FRACTION
        )
    out = {
        "benchmark": "fleet_ingest",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_at_end": os.getloadavg()},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "payload_bytes_by_rows": sizes,
        "goal": {"windows_per_s": GOAL_RATE, "fraction_of_broker": GOAL_FRACTION},
        "cases": cases,
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(
        f"{args.devices} devices x {args.rate_per_device} windows/s for {args.duration_s:g} s, "
        f"{args.rows} inferences/window ({sizes.get(str(args.rows), '?')} B), "
        f"{args.publishers} publisher processes; load average at end {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| case | stored or delivered /s under load | broker /s (same run) | fraction | "
        "incl. drain after load /s | windows per fleet CPU-s | offered /s | complete | "
        "CPU cores: mosquitto / loadgen / consumer(s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for c in cases:
        cores = c["cpu_cores"]
        consumers = " + ".join(
            f"{cores[k]:.2f}" for k in cores if k.startswith(("fleet", "subscriber"))
        )
        print(
            f"| {c['case']} | {c['rate']:,.0f} | {broker_rate:,.0f} | "
            f"{c.get('fraction_of_broker', 1.0) or 0:.2f} | {c['rate_all']:,.0f} | "
            f"{c.get('per_fleet_cpu_s') or '-'} | "
            f"{c['offered_rate']:,.0f} | {c['complete']} | {cores.get('mosquitto', 0):.2f} / "
            f"{cores.get('loadgen', 0):.2f} / {consumers}"
            + (f" (PostgreSQL server {cores['postgres']:.2f})" if "postgres" in cores else "")
            + " |"
        )
    print(f"\nJSON: {RESULTS}")


if __name__ == "__main__":
    main()
