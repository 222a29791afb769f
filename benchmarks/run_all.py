"""Run every benchmark, then write ONE table of their figures, each beside its baseline and goal.

    .venv/bin/python benchmarks/run_all.py            # quick mode (--quick where a script has it)
    .venv/bin/python benchmarks/run_all.py --full     # the full runs (long: an hour or more)
    .venv/bin/python benchmarks/run_all.py --only scale --only rollout
    .venv/bin/python benchmarks/run_all.py --summary-only   # re-read results/*.json, run nothing

Every ``benchmarks/*.py`` that is not a helper runs once, in its own process, with a per-run
timeout (``--timeout-s``; a run that overruns is killed with its whole process group and shows
as ``timeout``). Each script writes ``benchmarks/results/<name>.json``; this one reads them
back (a JSON older than this run is shown as stale, not as a result of this run) and writes
``benchmarks/results/SUMMARY.md`` and ``benchmarks/results/summary.json``: the machine
(CPU model, cores, RAM, OS, Python, key package versions), each benchmark's status, and every
figure with its baseline and goal. A benchmark this file does not know still gets a row per
``goal_met``/``meets_goal`` it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
#: files in benchmarks/ that are helpers, not benchmarks
HELPERS = frozenset({"models.py", "run_all.py", "__init__.py"})
#: the order to run them in (cheap and independent first); others follow alphabetically
ORDER = (
    "agent", "drift", "tflite", "crash_stress", "quality", "compile", "rollout",
    "fleet_ingest", "scale", "fuzz",
)  # fmt: skip
#: output file when it is not results/<name>.json
RESULT_FILE = {"agent": "agent.json"}
PACKAGES = (
    "numpy", "onnx", "onnxruntime", "ai-edge-litert", "paho-mqtt", "datasketches", "sqlalchemy",
    "sqlmodel", "alembic", "psycopg", "fastapi", "uvicorn", "pydantic", "torch",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    benchmark: str
    figure: str
    value: str
    baseline: str = "-"
    goal: str = "-"
    #: True / False against the goal; None when there is no goal
    ok: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    name: str
    status: str  # ok | failed (rc) | timeout | skipped | not run (summary only)
    seconds: float
    command: str
    log: str
    result_file: str | None


# -- the machine ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and the versions of the packages that matter."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip().strip('"')
                os_name = f"{pretty} ({platform.release()})"
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": ram,
        "os": os_name,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "packages": versions,
        "mosquitto": _version(["mosquitto", "-h"], "mosquitto version"),
        "postgresql": _pg_version(),
    }


def _version(argv: list[str], marker: str) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if marker in line:
            return line.strip()
    return None


def _pg_version() -> str | None:
    sys.path.insert(0, str(ROOT))
    try:
        from tests.pg import find_pg_bin_dir
    except ImportError:
        return None
    bin_dir = find_pg_bin_dir()
    return _version([str(bin_dir / "postgres"), "--version"], "postgres") if bin_dir else None


# -- running ----------------------------------------------------------------------------


def discover() -> list[str]:
    """Every benchmark script's name, in run order."""
    names = sorted(p.stem for p in BENCH.glob("*.py") if p.name not in HELPERS)
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def _has_option(name: str, option: str) -> bool:
    return f'"{option}"' in (BENCH / f"{name}.py").read_text()


def result_path(name: str) -> Path:
    return RESULTS / RESULT_FILE.get(name, f"{name}.json")


def run_one(name: str, *, full: bool, timeout_s: float, logs: Path) -> Run:
    """Run one benchmark in its own process group; kill the group when it overruns."""
    argv = [sys.executable, str((BENCH / f"{name}.py").relative_to(ROOT))]
    if not full and _has_option(name, "--quick"):
        argv.append("--quick")
    log = logs / f"{name}.log"
    started = time.time()
    t0 = time.monotonic()
    print(f"== {name}: {' '.join(argv[1:])} (timeout {timeout_s:.0f} s)", flush=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = "timeout"
        finally:
            # children left behind (brokers, fleets, databases) go with the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = round(time.monotonic() - t0, 1)
    path = result_path(name)
    fresh = path.exists() and path.stat().st_mtime >= started
    print(
        f"   {status} in {seconds:.0f} s; result {'written' if fresh else 'NOT written'}",
        flush=True,
    )
    return Run(
        name=name,
        status=status,
        seconds=seconds,
        command=" ".join(argv[1:]),
        log=str(log.relative_to(ROOT)),
        result_file=str(path.relative_to(ROOT)) if fresh else None,
    )


# -- figures from each benchmark's JSON -----------------------------------------------------


def _n(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _compile(d: dict[str, Any]) -> Iterator[Figure]:
    for r in d.get("table", []):
        where = f"{r.get('model')} {r.get('profile')} {r.get('precision')}"
        yield Figure(
            benchmark="compile",
            figure=f"{where}: {r.get('metric')}",
            value=f"{r.get('artifact')} ({r.get('relative')})",
            baseline=str(r.get("float")),
            goal=str(r.get("goal", "-")),
            ok=r.get("ok"),
        )


def _tflite(d: dict[str, Any]) -> Iterator[Figure]:
    for r in d.get("rows", []):
        m = r.get("model")
        yield Figure(
            benchmark="tflite",
            figure=f"{m}: .tflite bytes",
            value=_n(r.get("tflite_bytes")),
            baseline=f"{_n(r.get('onnx_int8_bytes'))} ONNX int8",
        )
        yield Figure(
            benchmark="tflite",
            figure=f"{m}: LiteRT ms / ORT int8 ms (median ratio)",
            value=f"{_n(r.get('litert_ms'), 3)} ms ({_n(r.get('latency_ratio_median'))})",
            baseline=f"{_n(r.get('ort_int8_ms'), 3)} ms ORT int8",
        )
        if r.get("top1_drop_points") is not None:
            yield Figure(
                benchmark="tflite",
                figure=f"{m}: top-1 drop (points)",
                value=_n(r.get("top1_drop_points")),
                baseline=f"float top-1 {_n(r.get('float_top1'), 4)}",
                goal="<= 0.5",
                ok=float(r["top1_drop_points"]) <= 0.5,
            )


def _agent(d: dict[str, Any]) -> Iterator[Figure]:
    for o in d.get("overhead", []):
        yield Figure(
            benchmark="agent",
            figure=f"{o['model']}: agent predict, mean per inference (us)",
            value=_n(o.get("agent_mean_us", o.get("agent_us")), 1),
            baseline=f"{_n(o.get('bare_mean_us', o.get('bare_us')), 1)} bare",
            goal="overhead <= 5% or <= 30 us",
            ok=o.get("goal_met"),
        )
    for m in d.get("memory", []):
        yield Figure(
            benchmark="agent",
            figure=f"RSS MB: {m.get('backend')}",
            value=_n(m.get("rss", 0) / 1e6, 1),
            baseline=f"{_n(m.get('base', 0) / 1e6, 1)} bare Python",
        )
    o = d.get("outage")
    if o:
        yield Figure(
            benchmark="agent",
            figure=f"windows lost in a {o['outage_s']:.0f} s outage",
            value=_n(o.get("windows_lost")),
            baseline=f"{_n(o.get('windows_stored'))} stored",
            goal="0",
            ok=o.get("windows_lost") == 0,
        )


def _drift(d: dict[str, Any]) -> Iterator[Figure]:
    for r in d.get("false_alarms", []):
        yield Figure(
            benchmark="drift",
            figure=f"false alarms, {r['dist']} {r['rows']:,} rows",
            value=_n(r.get("ours"), 3),
            baseline=f"{_n(r.get('raw-count KS'), 3)} raw KS",
            goal="<= 0.01",
            ok=r.get("ours", 1) <= 0.01,
        )
    for r in d.get("power", []):
        goal = r.get("change") == "mean +0.1 SD" and r.get("rows", 0) >= 200_000
        yield Figure(
            benchmark="drift",
            figure=f"power, {r['change']}, {r['rows']:,} rows",
            value=_n(r.get("ours"), 3),
            baseline=f"{_n(r.get('raw-count KS'), 3)} raw KS",
            goal=">= 0.95" if goal else "-",
            ok=(r.get("ours", 0) >= 0.95) if goal else None,
        )
    for r in d.get("sizes", []):
        framed = "pack_base64_zlib_bytes" in r  # since packs travel as raw bytes in a frame
        wire = r.get("pack_bytes" if framed else "pack_zlib_bytes", r.get("wire_json_bytes"))
        yield Figure(
            benchmark="drift",
            figure=(
                f"wire bytes per feature, {'pack in a frame' if framed else 'pack+zlib'} "
                f"({r['values']} values)"
            ),
            value=_n(wire),
            baseline=f"{_n(r.get('wire_json_bytes'))} JSON form, {_n(r.get('kll_bytes'))} KLL",
            goal="<= 3072",
            ok=(wire or 1e9) <= 3072,
        )
    for r in d.get("fleet_cost", []):
        pack = r.get("pack") or {}
        total = pack.get("total_s", r.get("ours_total_s"))
        yield Figure(
            benchmark="drift",
            figure=(
                f"merge + test, {r['devices']:,} stored windows x {r['features']} features x "
                f"{r.get('values_per_window', '?')} values (pack), s"
            ),
            value=_n(total),
            baseline=f"{_n(r.get('library_one_by_one_s', r.get('naive_merge_s')))} library",
            goal="< 2 s",
            ok=(total if total is not None else 1e9) < 2,
        )


def _fleet_ingest(d: dict[str, Any]) -> Iterator[Figure]:
    goal = d.get("goal", {})
    cases = d.get("cases", [])
    broker = next((c for c in cases if c.get("case") == "broker"), None)
    for c in cases:
        if c is broker:
            continue
        yield Figure(
            benchmark="fleet_ingest",
            figure=f"{c['case']}: windows stored /s while the load runs",
            value=f"{_n(c.get('rate'), 0)} ({_n(c.get('per_fleet_cpu_s'), 0)} per CPU-s)",
            baseline=f"{_n(broker.get('rate') if broker else None, 0)} broker",
            goal=f">= {_n(goal.get('windows_per_s'), 0)} and >= "
            f"{_n(goal.get('fraction_of_broker'))} of broker",
            ok=c.get("goal_met"),
        )


def _rollout(d: dict[str, Any]) -> Iterator[Figure]:
    for name, v in d.get("variants", {}).items():
        yield Figure(
            benchmark="rollout",
            figure=f"{d.get('devices', '?'):,} devices, {name}: decision to all sent (s)",
            value=_n(v.get("median_decision_latency_s")),
            baseline=f"{_n(v.get('median_baseline_publish_s'))} bare publish",
            goal=f"< {_n(d.get('goal_s'), 0)} s",
            ok=v.get("meets_goal"),
        )


def _crash_stress(d: dict[str, Any]) -> Iterator[Figure]:
    yield Figure(
        benchmark="crash_stress",
        figure="failed checks after SIGKILL + restart",
        value=f"{_n(d.get('failed'))} of {_n(d.get('trials'))}",
        baseline=f"{_n(d.get('killed'))} killed",
        goal="0",
        ok=d.get("failed") == 0,
    )


def _quality(d: dict[str, Any]) -> Iterator[Figure]:
    for k, c in d.get("calibration", {}).items():
        yield Figure(
            benchmark="quality",
            figure=f"{k}: ECE after temperature scaling",
            value=_n(c.get("ece_after"), 3),
            baseline=f"{_n(c.get('ece_before'), 3)} before",
        )
    for r in d.get("detection", []):
        yield Figure(
            benchmark="quality",
            figure=f"{r.get('scenario')} drop, coverage {r.get('coverage', 0):.0%}, "
            f"lag {r.get('lag_mean_h')} h: minutes to detect (estimate)",
            value=_n(r.get("detect_min_estimate"), 0),
            baseline=f"{_n(r.get('detect_min_labels'), 0)} with labels",
        )


def _fuzz(d: dict[str, Any]) -> Iterator[Figure]:
    for t in d.get("targets", []):
        yield Figure(
            benchmark="fuzz",
            figure=f"{t['name']}: crashes",
            value=_n(t.get("crashes")),
            baseline=f"{_n(t.get('cases'))} cases",
            goal="0",
            ok=t.get("crashes") == 0,
        )


def _scale(d: dict[str, Any]) -> Iterator[Figure]:
    p = d.get("params", {})
    tag = f"{p.get('devices', 0):,} devices, {p.get('fleets')} fleets, {d.get('database')}"
    reg, ing, ro = d.get("register", {}), d.get("ingest", {}), d.get("rollout", {})
    yield Figure(
        benchmark="scale",
        figure=f"{tag}: devices registered /s",
        value=_n(reg.get("devices_per_s"), 1),
    )
    yield Figure(
        benchmark="scale",
        figure=f"{tag}: telemetry windows stored /s",
        value=_n(ing.get("windows_per_s"), 1),
        baseline=f"{_n(ing.get('offered_windows_per_s'), 1)} offered",
        goal="= offered",
        ok=(ing.get("fraction_of_offered") or 0) >= 0.95,
    )
    yield Figure(
        benchmark="scale",
        figure=f"{tag}: fleet CPU ms per window",
        value=_n(ing.get("fleet_cpu_ms_per_window")),
    )
    for s in ro.get("stages", []):
        yield Figure(
            benchmark="scale",
            figure=f"{tag}: stage {s['stage']} ({s['devices']:,} devices) s to last commit",
            value=_n(s.get("seconds_to_last_commit"), 1),
            baseline=f"{_n(s.get('commands_per_s'), 1)} commands/s",
        )
    goal = d.get("goal", {})
    yield Figure(
        benchmark="scale",
        figure=f"{tag}: whole rollout s without bakes",
        value=f"{_n(ro.get('seconds_without_bakes'), 1)} ({ro.get('phase')})",
        goal=f"<= {_n(goal.get('rollout_s_without_bakes'), 0)} s at "
        f"{_n(goal.get('devices'))} devices",
        ok=d.get("goal_met"),
    )
    db = d.get("db", {})
    yield Figure(
        benchmark="scale",
        figure=f"{tag}: database MB after the run",
        value=_n(db.get("bytes", 0) / 1e6, 1),
        baseline=f"{_n(db.get('bytes_per_window'))} B per window",
    )


def _generic(name: str, d: Any) -> Iterator[Figure]:
    """Any ``goal_met`` / ``meets_goal`` in a JSON this file does not know."""

    def walk(x: Any, path: str) -> Iterator[Figure]:
        if isinstance(x, dict):
            for key in ("goal_met", "meets_goal"):
                if isinstance(x.get(key), bool):
                    yield Figure(
                        benchmark=name,
                        figure=path or name,
                        value=str(x[key]),
                        goal="met",
                        ok=x[key],
                    )
            for k, v in x.items():
                yield from walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                yield from walk(v, f"{path}[{i}]")

    yield from walk(d, "")


EXTRACTORS: dict[str, Callable[[dict[str, Any]], Iterator[Figure]]] = {
    "compile": _compile,
    "tflite": _tflite,
    "agent": _agent,
    "drift": _drift,
    "fleet_ingest": _fleet_ingest,
    "rollout": _rollout,
    "crash_stress": _crash_stress,
    "quality": _quality,
    "fuzz": _fuzz,
    "scale": _scale,
}


def figures(name: str, path: Path) -> list[Figure]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [Figure(benchmark=name, figure="result file", value=f"unreadable: {exc}")]
    extract = EXTRACTORS.get(name)
    try:
        return list(extract(data) if extract else _generic(name, data))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # a benchmark changed its JSON: say so instead of failing the whole summary
        return [
            Figure(
                benchmark=name,
                figure="result file",
                value=f"format not understood: {type(exc).__name__}: {exc}",
            )
        ]


# -- the summary ----------------------------------------------------------------------------


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_summary(runs: list[Run], mode: str) -> dict[str, Any]:
    mach = machine()
    rows: list[Figure] = []
    for run in runs:
        path = result_path(run.name)
        if path.exists():
            rows.extend(figures(run.name, path))
    summary = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "machine": mach,
        "runs": [asdict(r) for r in runs],
        "figures": [asdict(f) for f in rows],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    pk = ", ".join(f"{k} {v}" for k, v in mach["packages"].items() if v)
    lines = [
        "# Benchmark summary",
        "",
        f"Generated {summary['generated_at']} by `benchmarks/run_all.py` ({mode}).",
        "",
        f"- CPU: {mach['cpu']}, {mach['logical_cores']} logical cores "
        f"({mach['usable_cores']} usable), RAM {mach['ram_gib']} GiB, 1-min load at the end "
        f"{mach['load_avg_1m']}",
        f"- OS: {mach['os']}; Python {mach['python']}",
        f"- Packages: {pk}",
        f"- Mosquitto: {mach['mosquitto'] or '-'}; PostgreSQL: {mach['postgresql'] or '-'}",
        "",
        "## Runs",
        "",
        "| benchmark | status | seconds | command | result |",
        "|---|---|---:|---|---|",
    ]
    for r in runs:
        stale = "-"
        path = result_path(r.name)
        if r.result_file:
            stale = f"`{r.result_file}`"
        elif path.exists():
            when = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="minutes")
            stale = f"stale: `{path.relative_to(ROOT)}` from {when} (figures below are old)"
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | `{r.command}` | {stale} |")
    lines += [
        "",
        "## Figures",
        "",
        "ok: the goal is met (yes), missed (NO), or there is no goal (blank).",
        "",
        "| benchmark | figure | value | baseline | goal | ok |",
        "|---|---|---:|---|---|---|",
    ]
    for f in rows:
        ok = "" if f.ok is None else ("yes" if f.ok else "NO")
        lines.append(
            f"| {f.benchmark} | {_cell(f.figure)} | {_cell(f.value)} | {_cell(f.baseline)} | "
            f"{_cell(f.goal)} | {ok} |"
        )
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full runs (default: --quick)")
    ap.add_argument("--only", action="append", default=None, help="run only this (repeat)")
    ap.add_argument("--skip", action="append", default=[], help="do not run this (repeat)")
    ap.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="per benchmark (default: 900 quick, 7200 full)",
    )
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing; summarize the results already there",
    )
    args = ap.parse_args()
    names = discover()
    unknown = set(args.only or []) - set(names)
    if unknown:
        ap.error(f"no such benchmark: {', '.join(sorted(unknown))} (have: {', '.join(names)})")
    chosen = [n for n in names if not args.only or n in args.only]
    timeout_s = args.timeout_s or (7200.0 if args.full else 900.0)
    mode = "full" if args.full else "quick"
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    previous: dict[str, Any] = {}
    if args.summary_only and (RESULTS / "summary.json").exists():
        # keep what the last real run said of each benchmark (status, seconds, command)
        with contextlib.suppress(ValueError, KeyError):
            last = json.loads((RESULTS / "summary.json").read_text())
            previous = {r["name"]: r for r in last["runs"] if not r["status"].startswith("not run")}
            if previous:
                mode = last["mode"].replace(", re-summarized", "") + ", re-summarized"
    for name in chosen:
        if args.summary_only and name in previous:
            runs.append(Run(**previous[name]))
            continue
        if name in args.skip:
            # still in the table, with the result an earlier run left (marked stale)
            runs.append(Run(name=name, status="skipped", seconds=0.0, command="-", log="-",
                            result_file=None))  # fmt: skip
            continue
        if args.summary_only:
            path = result_path(name)
            runs.append(
                Run(
                    name=name,
                    status="not run (summary only)",
                    seconds=0.0,
                    command="-",
                    log="-",
                    result_file=str(path.relative_to(ROOT)) if path.exists() else None,
                )
            )
            continue
        runs.append(run_one(name, full=args.full, timeout_s=timeout_s, logs=logs))
    summary = write_summary(runs, "summary only" if args.summary_only and not previous else mode)
    print((RESULTS / "SUMMARY.md").read_text())
    bad = [
        r["name"]
        for r in summary["runs"]
        if r["status"] not in ("ok", "skipped") and not r["status"].startswith("not run")
    ]
    if bad:
        print(f"benchmarks that did not finish cleanly: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
