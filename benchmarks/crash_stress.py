"""Crash stress: SIGKILL the agent at random points of an install; it must never brick.

Each trial starts from a device that runs model v1 (a copy of a seeded state directory)
and deploys v2 in a child process that is killed with SIGKILL either

- at a named crash point (``EDGEFLEET_AGENT_CRASH_AT``-style ``point:n``, see
  agent/crashpoint.py: every chunk of the download, verification, install, self-test, the
  middle of the slot promotion, the switch, every health probe, just before and just after
  the commit), or
- at a uniformly random time during the deploy (the download is throttled with
  ``max_download_bps`` so the kill lands in every phase).

Then the agent is restarted on the same state directory (no crash this time) and the trial
checks what the device does and says:

1. it serves v1 or v2, and that model is verified: its slot's files re-hash to the signed
   manifest, and a real prediction on a held-out digit returns finite logits;
2. active.json, the served model and the heartbeat it publishes name the same bundle, and
   no switch is left pending;
3. the fleet hears a consistent story: if the crash cut an install short, the restarted
   agent either reverts it (REVERTED, when it had switched) or resumes it, and the last
   status it publishes names the bundle it really serves; no install record is left behind.

    .venv/bin/python benchmarks/crash_stress.py [--trials 200] [--quick]

Writes a markdown table and benchmarks/results/crash_stress.json.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this directory would come first on sys.path, and benchmarks/agent.py would
# shadow the agent package: put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(ROOT))

from protocol.messages import telemetry_json  # noqa: E402

DEVICE = "crash-dev"
CHUNK = 4096
POINTS = ("verifying", "installing", "self_test", "promote", "switched", "commit", "committed")


# -- the child: one agent run ------------------------------------------------------------------


class JsonlTransport:
    """A connected broker stand-in that appends every publish to a file and acks at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hooks: Any = None
        self._mid = 0
        self.connected = True

    def set_hooks(self, hooks: Any) -> None:
        self.hooks = hooks

    def start(self) -> None:
        if self.hooks:
            self.hooks.on_connected()

    def stop(self) -> None:
        pass

    def subscribe(self, topic: str, handler: Any) -> None:
        pass

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        self._mid += 1
        with open(self.path, "a") as f:
            # base64: a telemetry window is a binary frame (JSON + its sketch pack)
            f.write(json.dumps({"topic": topic, "payload": base64.b64encode(payload).decode()}))
            f.write("\n")
        if self.hooks:
            self.hooks.on_acked(self._mid)
        return self._mid


def child(args: argparse.Namespace) -> None:
    import numpy as np

    from agent.agent import Agent
    from agent.config import AgentConfig
    from agent.transfer import ChunkedFetcher, HttpRangeSource
    from hardware_profiles import load_profile
    from protocol.messages import DeployCommand, encode_message

    state = Path(args.state)
    log = state.parent / f"published-{args.mode}.jsonl"
    cfg = AgentConfig(
        device_id=DEVICE,
        profile=load_profile("x86-cpu"),
        state_dir=state,
        trust_root_path=Path(args.trust),
        telemetry_window_s=3600,
        health_inferences=8,
        health_timeout_s=0.0,
        crash_at=args.crash_at or None,
        max_download_bps=args.bps or None,
        chunk_size_bytes=CHUNK,
    )
    transport = JsonlTransport(log)
    fetcher = None
    agent = Agent(cfg, transport=transport)  # type: ignore[arg-type]
    fetcher = ChunkedFetcher(
        mqtt=None,
        http=HttpRangeSource(max_bps=cfg.max_download_bps),
        max_bytes=1 << 30,
        chunk_size=CHUNK,
        default_transfer="http",
        on_write=lambda _i: agent.crash.hit("download"),
    )
    agent.installer.fetcher = fetcher
    agent.start(threads=False)
    print("READY", flush=True)
    if args.command:
        cmd = DeployCommand.model_validate_json(Path(args.command).read_bytes())
        agent.handle_command(f"edgefleet/v1/{DEVICE}/cmd", encode_message(cmd))
    agent.process_commands()  # the deploy, or an install resumed after a crash
    agent.tick()  # heartbeat
    model = agent.service.model
    report: dict[str, Any] = {"serving": model.bundle_sha256 if model else None}
    if model is not None:
        with np.load(ROOT / "models" / "digits" / "heldout.npz") as npz:
            x = npz["input"][:1]
        y = agent.service.predict({"input": x})["logits"]
        report["predict_ok"] = bool(y.shape == (1, 10) and np.isfinite(y).all())
        st = agent.state.read_active()
        report["slot_problem"] = (
            agent.state.slots.verify_files(st.active.slot) if st.active else "no active"
        )
    st = agent.state.read_active()
    report["active_json"] = st.active.bundle_sha256 if st.active else None
    report["pending"] = st.pending is not None
    report["install_record"] = agent.state.install_path.exists()
    agent.stop(timeout_s=2.0)
    (state.parent / f"report-{args.mode}.json").write_text(json.dumps(report))


# -- the parent ---------------------------------------------------------------------------------


def _published(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            text = telemetry_json(base64.b64decode(rec["payload"]))
            out.append({"topic": rec["topic"], **json.loads(text)})
        except (ValueError, KeyError):
            continue  # a line torn by the kill
    return out


class Rig:
    def __init__(self, work: Path) -> None:
        import numpy as np

        from agent.testing import build_test_bundle
        from protocol.signing import generate_signing_key
        from protocol.trust import TrustRoot

        self.work = work
        key = generate_signing_key()
        root = TrustRoot.create(
            root_keys=[generate_signing_key()],
            release_keys=[key],
            expires_at=datetime.now(UTC) + timedelta(days=30),
        )
        self.trust = work / "root.json"
        self.trust.write_bytes(root.raw)
        with np.load(ROOT / "models" / "digits" / "heldout.npz") as npz:
            samples = npz["input"][:64]
        self.bundles = {}
        for v in (1, 2):
            b = build_test_bundle(
                work / f"v{v}.efb",
                model_path=ROOT / "models" / "digits" / "model.onnx",
                samples=samples,
                signer=key,
                version=v,
            )
            self.bundles[v] = b
            (work / f"v{v}.cmd.json").write_text(
                b.deploy_command(DEVICE, command_id=f"deploy-v{v}").model_dump_json()
            )
        self.chunks = -(-self.bundles[2].size // CHUNK)
        self.seed = work / "seed" / "state"
        rc, _ = self.run_child(self.seed, "seed", command=work / "v1.cmd.json")
        rep = json.loads((self.seed.parent / "report-seed.json").read_text())
        assert rc == 0 and rep["serving"] == self.bundles[1].sha256, rep

    def run_child(
        self,
        state: Path,
        mode: str,
        *,
        command: Path | None = None,
        crash_at: str = "",
        bps: float = 0.0,
        kill_after_s: float | None = None,
        timeout_s: float = 120.0,
    ) -> tuple[int, float]:
        argv = [
            sys.executable, __file__, "--child", "--mode", mode, "--state", str(state),
            "--trust", str(self.trust), "--crash-at", crash_at, "--bps", str(bps),
            "--command", str(command or ""),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        state.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(state.parent / f"log-{mode}.txt", "w") as errlog,
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errlog, env=env) as p,
        ):
            try:
                assert p.stdout is not None
                line = p.stdout.readline()
                t0 = time.monotonic()
                if kill_after_s is not None and line.strip() == b"READY":
                    try:
                        p.wait(timeout=kill_after_s)
                    except subprocess.TimeoutExpired:
                        p.send_signal(signal.SIGKILL)
                rc = p.wait(timeout=timeout_s)
                return rc, time.monotonic() - t0
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def trial(
        self, n: int, how: str, spec: str, bps: float, kill_after: float | None
    ) -> dict[str, Any]:
        tdir = self.work / f"t{n:04d}"
        state = tdir / "state"
        shutil.copytree(self.seed, state)
        rc, _ = self.run_child(
            state, "crash", command=self.work / "v2.cmd.json", crash_at=spec, bps=bps,
            kill_after_s=kill_after,
        )  # fmt: skip
        killed = rc == -signal.SIGKILL
        before = _published(tdir / "published-crash.jsonl")
        crashed_in = next(
            (e["state"] for e in reversed(before) if e.get("kind") == "status"), "none"
        )
        rc2, _ = self.run_child(state, "check")
        after = _published(tdir / "published-check.jsonl")
        problems: list[str] = []
        rep: dict[str, Any] = {}
        try:
            rep = json.loads((tdir / "report-check.json").read_text())
        except (OSError, ValueError):
            problems.append(f"restart failed (rc {rc2})")
        v1, v2 = self.bundles[1].sha256, self.bundles[2].sha256
        serving = rep.get("serving")
        if rep:
            if serving not in (v1, v2):
                problems.append(f"serves {serving}")
            if not rep.get("predict_ok"):
                problems.append("prediction failed")
            if rep.get("slot_problem"):
                problems.append(f"slot not verified: {rep['slot_problem']}")
            if rep.get("active_json") != serving:
                problems.append("active.json disagrees with the served model")
            if rep.get("pending"):
                problems.append("switch still pending")
            if rep.get("install_record"):
                problems.append("install record left behind")
            hbs = [e for e in after if e.get("kind") == "heartbeat"]
            if not hbs or hbs[-1].get("active_bundle_sha256") != serving:
                problems.append("heartbeat disagrees with the served model")
            statuses = [e for e in after if e.get("kind") == "status"]
            if statuses and statuses[-1].get("active_bundle_sha256") != serving:
                problems.append("last status names another active bundle")
            # "none": killed before the command was even acknowledged (no claim was made)
            finished_before = crashed_in in ("none", "committed", "reverted", "failed")
            if killed and not finished_before:
                terminal = [
                    s for s in statuses if s["state"] in ("committed", "reverted", "failed")
                ]
                if not terminal:
                    problems.append(
                        f"interrupted in {crashed_in} but nothing reported after restart"
                    )
            if serving == v1 and crashed_in == "committed" and killed:
                problems.append("reverted although committed")
        last = next((e for e in reversed(after) if e.get("kind") == "status"), None)
        outcome = ("new" if serving == v2 else "old" if serving == v1 else "BRICKED") + (
            f" ({last['state']}:{last['reason']})" if last else " (no status)"
        )
        shutil.rmtree(tdir, ignore_errors=True) if not problems else None
        return {
            "trial": n,
            "how": how,
            "spec": spec,
            "kill_after_s": kill_after,
            "killed": killed,
            "crashed_in": crashed_in,
            "outcome": outcome,
            "ok": not problems,
            "problems": problems,
        }


def plan(
    rig: Rig, trials: int, rng: random.Random, deploy_s: float
) -> list[tuple[str, str, float, float | None]]:
    out: list[tuple[str, str, float, float | None]] = []
    for i in range(trials):
        if i % 2 == 0:
            k = rng.randrange(3)
            if k == 0:
                spec = f"download:{rng.randint(1, rig.chunks)}"
            elif k == 1:
                spec = f"health:{rng.randint(1, 8)}"
            else:
                spec = rng.choice(POINTS)
            out.append(("point", spec, 0.0, None))
        else:
            out.append(
                ("random-time", "", 4 * rig.bundles[2].size / deploy_s, rng.uniform(0, deploy_s))
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="")
    ap.add_argument("--state", default="")
    ap.add_argument("--trust", default="")
    ap.add_argument("--crash-at", default="")
    ap.add_argument("--bps", type=float, default=0.0)
    ap.add_argument("--command", default="")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="20 trials")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crash_stress.json"))
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    trials = 20 if args.quick else args.trials
    result = run(trials, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    sys.exit(0 if result["failed"] == 0 else 1)


def run(trials: int, *, seed: int = 1, work: Path | None = None) -> dict[str, Any]:
    """Run ``trials`` crash trials; the summary (and every failing trial)."""
    rng = random.Random(seed)
    tmp = Path(work or tempfile.mkdtemp(prefix="crash-stress-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rig = Rig(tmp)
    # Calibrate a throttled deploy's duration (download ~1/4 of it) for random-time kills.
    cal = tmp / "cal" / "state"
    shutil.copytree(rig.seed, cal)
    bps = rig.bundles[2].size / 1.0  # ~1 s of download
    _, deploy_s = rig.run_child(cal, "cal", command=tmp / "v2.cmd.json", bps=bps)
    deploy_s = max(0.5, deploy_s)
    rows = []
    for n, (how, spec, bps_, kill) in enumerate(plan(rig, trials, rng, deploy_s)):
        rows.append(rig.trial(n, how, spec, bps_, kill))
        r = rows[-1]
        print(f"trial {n:3d} {how:11s} {spec or f'{kill:.2f}s':12s} -> {r['outcome']}"
              + ("" if r["ok"] else f"  FAILED: {r['problems']}"), flush=True)  # fmt: skip
    outcomes = collections.Counter(r["outcome"] for r in rows)
    crashed = collections.Counter(r["crashed_in"] for r in rows if r["killed"])
    failed = [r for r in rows if not r["ok"]]
    if not failed:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "trials": len(rows),
        "killed": sum(r["killed"] for r in rows),
        "failed": len(failed),
        "outcomes": dict(outcomes),
        "killed_after_status": dict(crashed),
        "bundle_bytes": rig.bundles[2].size,
        "chunks": rig.chunks,
        "calibrated_deploy_s": deploy_s,
        "wall_s": time.monotonic() - t0,
        "failures": failed,
        "work_dir": str(tmp) if failed else None,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Crash stress: {res['trials']} trials, {res['killed']} killed by SIGKILL, "
        f"{res['failed']} failed checks ({res['wall_s']:.0f} s)",
        "",
        "| outcome after restart | trials |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(res["outcomes"].items())]
    lines += ["", "| last status before the kill | kills |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(res["killed_after_status"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
