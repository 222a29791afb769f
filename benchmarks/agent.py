"""Agent benchmarks: per-inference overhead, resident memory, telemetry size, broker outage.

    .venv/bin/python benchmarks/agent.py [--quick] [--outage-s S] [--skip-outage]

(the outage lasts 600 s, or 30 s with --quick)

1. Overhead of the agent's served path (input check, telemetry buffers, batched sketches,
   shadow hook) over a bare runtime call on the same loaded model, on a tiny MLP (64
   inputs, so 64 sketched features) and a MobileNetV2-shaped model (224x224, random
   weights). Interleaved rounds. The goal is judged on the mean over every call (total
   time / calls), which includes the calls that flush the batched sketches and
   bookkeeping (every 64 rows): the cost per inference. The median over rounds of the
   per-round median (a typical call's latency, which skips those flushes) is reported
   beside it. The local HTTP API (JSON) is measured too, separately.
2. Resident memory of an agent process with the digits model loaded (ONNX Runtime; LiteRT if
   `compile --profile raspberry-pi-5` works here), against the same interpreter without it.
3. Telemetry bytes per window with 64 input features.
4. A broker outage during steady inference: a real Mosquitto (persistence on) is stopped and
   restarted; a counting subscriber with a persistent session counts windows by
   (stream, seq): lost and duplicate windows.

Writes a markdown table and benchmarks/results/agent.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this directory would come first on sys.path, and benchmarks/agent.py would
# shadow the agent package: put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(ROOT))

from protocol.messages import decode_message, telemetry_json  # noqa: E402

DIGITS = ROOT / "models" / "digits"
DEVICE = "bench-dev"


def _keys(tmp: Path) -> tuple[Any, Path]:
    from protocol.signing import generate_signing_key
    from protocol.trust import TrustRoot

    key = generate_signing_key()
    root = TrustRoot.create(
        root_keys=[generate_signing_key()],
        release_keys=[key],
        expires_at=datetime.now(UTC) + timedelta(days=30),
    )
    (tmp / "root.json").write_bytes(root.raw)
    return key, tmp / "root.json"


def _mlp_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(32, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 10)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(10, np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [w1, b1, w2, b2],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def _lenient(profile: Any) -> Any:
    """The profile without its latency budget: a loaded benchmark machine must not revert."""
    return dataclasses.replace(
        profile, limits=dataclasses.replace(profile.limits, latency_budget_ms=1e6)
    )


def _agent_with(tmp: Path, model: Path, samples: np.ndarray, name: str, **cfg: Any) -> Any:
    import dataclasses as dc

    from agent.agent import Agent
    from agent.config import AgentConfig
    from agent.testing import FakeTransport, FileFetcher, build_test_bundle
    from hardware_profiles import load_profile

    key, trust = _keys(tmp)
    b = build_test_bundle(
        tmp / f"{name}.efb", model_path=model, samples=samples, signer=key, name=name
    )
    b = dc.replace(b, url=f"test://{name}")
    config = AgentConfig(
        device_id=DEVICE,
        profile=_lenient(load_profile("x86-cpu")),
        state_dir=tmp / f"state-{name}",
        trust_root_path=trust,
        telemetry_window_s=3600,
        health_inferences=3,
        health_timeout_s=0,
        **cfg,
    )
    agent = Agent(
        config, transport=FakeTransport(auto_ack=True), fetcher=FileFetcher({b.url: b.path})
    )
    agent.start(threads=False)
    ev = agent.installer.deploy(b.deploy_command(DEVICE))
    assert ev.state.value == "committed", ev
    return agent


def overhead(tmp: Path, name: str, model: Path, x: np.ndarray, rounds: int, n: int) -> dict:
    """Median per-call time: bare backend.run vs service.predict vs the local HTTP API."""
    samples = np.concatenate([x] * max(1, 256 // len(x)))[:256]
    agent = _agent_with(tmp, model, samples, name, api_port=0)
    backend = agent.service.model.backend
    inputs = {"input": x}
    body = json.dumps({"inputs": {"input": x.tolist()}}).encode()
    url = f"http://127.0.0.1:{agent.api.port}/v1/predict"

    def api_call() -> None:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()

    every: dict[str, list[float]] = {"bare": [], "served": []}

    def timed(fn: Any, k: int, into: str | None = None) -> float:
        ts = []
        for _ in range(k):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        if into is not None:
            every[into] += ts
        return statistics.median(ts)

    for _ in range(20):
        backend.run(inputs)
        agent.service.predict(inputs)
    bare, served, api = [], [], []
    for _ in range(rounds):
        bare.append(timed(lambda: backend.run(inputs), n, "bare"))
        served.append(timed(lambda: agent.service.predict(inputs), n, "served"))
        api.append(timed(api_call, max(3, n // 10)))
    # one closed window's encoded size (64 features for the MLP)
    agent.tick(now=agent.clock() + 7200)
    tele = agent.transport.on("/telemetry")
    window_bytes = len(tele[-1]) if tele else None
    features = len(decode_message(tele[-1]).sketches()) if tele else None
    agent.stop()
    b, s, a = statistics.median(bare), statistics.median(served), statistics.median(api)
    ratios = [sv / bb for sv, bb in zip(served, bare, strict=True)]
    # the mean counts the calls that flush the batched work (every 64 rows): the cost per
    # inference; the median call skips them and is the latency of a typical call
    bm, sm = statistics.fmean(every["bare"]), statistics.fmean(every["served"])
    return {
        "model": name,
        "bare_us": b * 1e6,
        "agent_us": s * 1e6,
        "overhead_us": (s - b) * 1e6,
        "overhead_ratio_median": statistics.median(ratios),
        "bare_mean_us": bm * 1e6,
        "agent_mean_us": sm * 1e6,
        "overhead_mean_us": (sm - bm) * 1e6,
        "overhead_mean_ratio": sm / bm,
        "api_json_us": a * 1e6,
        "goal_met": (sm - bm) * 1e6 <= max(30.0, 0.05 * bm * 1e6),
        "window_bytes": window_bytes,
        "window_features": features,
        "rounds": rounds,
        "calls_per_round": n,
    }


_RSS_CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
def rss():
    import os
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
base = rss()
mode = sys.argv[2]
if mode == 'bare':
    import numpy, agent.agent  # the agent's code, no model
    print(json.dumps({'rss': rss(), 'base': base})); sys.exit()
from agent.bench import run_bench
from hardware_profiles import load_profile
import numpy as np
res = run_bench(Path(sys.argv[3]), device_id=sys.argv[4], profile=load_profile(sys.argv[5]),
                runs=50, warmup=5)
print(json.dumps({'rss': rss(), 'base': base, 'backend': res.backend,
                  'p50_ms': res.latency_p50_ms}))
"""


def memory(tmp: Path) -> list[dict[str, Any]]:
    """RSS of a process with the agent imported, and with the digits model loaded and run."""
    with np.load(DIGITS / "heldout.npz") as npz:
        samples = npz["input"][:256]
    agent = _agent_with(tmp, DIGITS / "model.onnx", samples, "digits")
    state = agent.config.state_dir
    agent.stop()
    out = []

    def child(*args: str) -> dict[str, Any]:
        r = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(ROOT), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"}
        return json.loads(r.stdout.strip().splitlines()[-1])

    bare = child("bare")
    ort = child("model", str(state), DEVICE, "x86-cpu")
    out.append({"backend": "agent code, no model", **bare})
    out.append({**ort, "backend": f"{ort.get('backend', 'onnxruntime')} + digits"})
    out.append(litert_memory(tmp, child))
    return out


def litert_memory(tmp: Path, child: Any) -> dict[str, Any]:
    """The same for a LiteRT artifact, if the compiler can make one for raspberry-pi-5."""
    from agent.agent import Agent
    from agent.config import AgentConfig
    from agent.testing import FakeTransport, FileFetcher
    from hardware_profiles import load_profile
    from protocol.messages import DeployCommand
    from protocol.signing import save_signing_key

    work = tmp / "tfl"
    work.mkdir(exist_ok=True)
    key, trust = _keys(work)
    save_signing_key(key, work / "release.key")
    try:
        from compiler.pipeline import CompileOptions, compile_model

        res = compile_model(
            CompileOptions(
                model_path=DIGITS / "model.onnx",
                profile="raspberry-pi-5",
                calibration_path=DIGITS / "calibration.npz",
                heldout_path=DIGITS / "heldout.npz",
                key_path=work / "release.key",
                out_dir=work / "dist",
                model_name="digits",
            )
        )
    except Exception as exc:  # the TFLite converter is being written concurrently
        return {"backend": "litert + digits", "error": f"compile for raspberry-pi-5: {exc}"}
    cfg = AgentConfig(
        device_id=DEVICE,
        profile=_lenient(load_profile("raspberry-pi-5")),
        state_dir=work / "state",
        trust_root_path=trust,
        health_timeout_s=0,
    )
    url = "test://tfl"
    agent = Agent(
        cfg,
        transport=FakeTransport(auto_ack=True),
        fetcher=FileFetcher({url: Path(res.bundle_path)}),
    )
    agent.start(threads=False)
    ev = agent.installer.deploy(
        DeployCommand(
            device_id=DEVICE,
            bundle_sha256=res.sha256,
            bundle_size=Path(res.bundle_path).stat().st_size,
            bundle_url=url,
            model_name="digits",
            model_version=1,
        )
    )
    backend = agent.service.model.backend.description if agent.service.model else None
    agent.stop()
    if ev.state.value != "committed":
        return {"backend": "litert + digits", "error": f"install: {ev.reason}: {ev.detail}"}
    out = child("model", str(work / "state"), DEVICE, "raspberry-pi-5")
    return {**out, "backend": f"{out.get('backend', backend)} + digits"}


def outage(tmp: Path, outage_s: float, steady_s: float) -> dict[str, Any]:
    """Stop and restart a real Mosquitto during steady inference; count windows received."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.agent import Agent, paho_transport_for
    from agent.config import AgentConfig
    from agent.testing import FileFetcher, build_test_bundle
    from agent.workload import SyntheticWorkload
    from hardware_profiles import load_profile
    from tests.broker import start_mosquitto
    from tests.procs import ProcessGroup, free_port

    port = free_port()
    persist = tmp / "mosq-data"
    persist.mkdir()
    extra = ["persistence true", f"persistence_location {persist}/", "autosave_interval 1"]
    seen: dict[tuple[str, int], int] = {}
    merged = 0
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        nonlocal merged
        w = json.loads(telemetry_json(bytes(m.payload)))
        with lock:
            k = (w["stream_id"], w["seq"])
            seen[k] = seen.get(k, 0) + 1
            merged += w.get("merged_windows", 1) - 1

    with ProcessGroup(tmp / "procs") as procs:
        broker = start_mosquitto(procs, tmp / "broker", port=port, extra_lines=extra)
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter",
                          protocol=mqtt.MQTTv5)  # fmt: skip
        sub.on_message = on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        sub.on_connect = lambda c, *_a: c.subscribe(f"edgefleet/v1/{DEVICE}/telemetry", qos=1)
        sub.reconnect_delay_set(1, 2)
        sub.connect(broker.host, port, clean_start=False, properties=props)
        sub.loop_start()

        with np.load(DIGITS / "heldout.npz") as npz:
            samples = npz["input"][:256]
        key, trust = _keys(tmp)
        b = build_test_bundle(tmp / "d.efb", model_path=DIGITS / "model.onnx", samples=samples,
                              signer=key)  # fmt: skip
        b = dataclasses.replace(b, url="test://d")
        cfg = AgentConfig(device_id=DEVICE, profile=load_profile("x86-cpu"),
                          state_dir=tmp / "state-outage", trust_root_path=trust,
                          mqtt_port=port, telemetry_window_s=1.0, heartbeat_s=5.0,
                          health_timeout_s=0)  # fmt: skip
        agent = Agent(cfg, transport=paho_transport_for(cfg), fetcher=FileFetcher({b.url: b.path}))
        agent.start()
        agent.installer.deploy(b.deploy_command(DEVICE))
        load = SyntheticWorkload(agent.service, DIGITS / "heldout.npz", rate_hz=50)
        load.start()
        time.sleep(steady_s)
        broker.process.terminate()
        t_down = time.monotonic()
        time.sleep(outage_s)
        broker2 = start_mosquitto(procs, tmp / "broker", port=port, extra_lines=extra,
                                  name="mosquitto2")  # fmt: skip
        outage_real = time.monotonic() - t_down
        time.sleep(steady_s)
        # paho's reconnect backoff may be up to 30 s by now: wait for the outbox to drain
        # (the windows wait on disk, they are not lost), then stop.
        drain_deadline = time.monotonic() + 90
        while agent.outbox.seqs() and time.monotonic() < drain_deadline:
            time.sleep(0.5)
        load.stop()
        agent.stop()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1)
            with lock:
                n = len(seen)
            if n and agent_seq_total(tmp / "state-outage") <= n:
                break
        sub.loop_stop()
        sub.disconnect()
        del broker2
    total = agent_seq_total(tmp / "state-outage")
    with lock:
        unique = len(seen)
        dups = sum(v - 1 for v in seen.values())
    return {
        "outage_s": outage_real,
        "windows_stored": total,
        "windows_received": unique,
        "windows_lost": total - unique,
        "duplicates_at_subscriber": dups,
        "windows_merged": merged,
        "inferences": load.calls,
    }


def agent_seq_total(state: Path) -> int:
    import sqlite3

    db = sqlite3.connect(state / "outbox.sqlite")
    try:
        row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| model | bare runtime call (mean) | agent predict (mean) | overhead per inference "
        "(mean, flushes included) | overhead of the median call | goal (<=5% or <=30 us, "
        "on the mean) | local HTTP API (JSON) |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in res["overhead"]:
        lines.append(
            f"| {o['model']} | {o['bare_mean_us']:.1f} us | {o['agent_mean_us']:.1f} us | "
            f"{o['overhead_mean_us']:+.1f} us ({100 * (o['overhead_mean_ratio'] - 1):+.1f}%) | "
            f"{o['overhead_us']:+.1f} us ({100 * (o['overhead_ratio_median'] - 1):+.1f}%) | "
            f"{'met' if o['goal_met'] else 'MISSED'} | {o['api_json_us']:.0f} us |"
        )
    lines += ["", "| process | RSS | baseline (interpreter) |", "|---|---|---|"]
    for m in res["memory"]:
        if "rss" in m:
            lines.append(
                f"| {m['backend']} | {m['rss'] / 2**20:.1f} MiB | {m['base'] / 2**20:.1f} MiB |"
            )
        else:
            lines.append(f"| {m['backend']} | n/a: {m.get('error', '')[:120]} | |")
    mlp = next((o for o in res["overhead"] if o["window_features"] == 64), None)
    if mlp:
        lines += [
            "",
            f"Telemetry window with {mlp['window_features']} input features: "
            f"{mlp['window_bytes']} bytes (a telemetry frame)",
        ]
    if res.get("outage"):
        o = res["outage"]
        lines += [
            "",
            f"Broker outage {o['outage_s']:.0f} s during {o['inferences']} inferences: "
            f"{o['windows_stored']} windows stored, {o['windows_received']} received, "
            f"lost {o['windows_lost']}, duplicates {o['duplicates_at_subscriber']}, "
            f"merged {o['windows_merged']}",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--outage-s", type=float, default=None, help="broker outage (default 600 s; 30 quick)"
    )
    ap.add_argument("--skip-outage", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agent.json"))
    args = ap.parse_args()
    rounds, n = (5, 100) if args.quick else (15, 300)
    if args.outage_s is None:  # run_all's quick mode gives a script minutes, not ten of them
        args.outage_s = 30.0 if args.quick else 600.0
    res: dict[str, Any] = {"overhead": [], "memory": [], "outage": None}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        x_mlp = np.random.default_rng(0).random((1, 64), dtype=np.float32)
        res["overhead"].append(
            overhead(tmp, "mlp64", _mlp_onnx(tmp / "mlp.onnx"), x_mlp, rounds, n)
        )
        from benchmarks.models import image_set, mobilenet_v2_onnx

        x_mb = image_set(1, seed=0)["input"]
        res["overhead"].append(
            overhead(tmp, "mobilenetv2", mobilenet_v2_onnx(), x_mb, rounds, max(10, n // 10))
        )
        res["memory"] = memory(tmp)
        if not args.skip_outage:
            res["outage"] = outage(tmp, args.outage_s, steady_s=5.0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(markdown(res))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
