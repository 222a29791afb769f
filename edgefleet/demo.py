"""`edgefleet demo` / `make demo`: the whole loop on one machine, narrated.

Release keys -> compile the shipped digits model -> a private Mosquitto -> the fleet
service -> several real agent processes -> upload and deploy -> devices report back.
Every process it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app", "run_demo"]

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
console = Console(highlight=False)
app = typer.Typer(help="Run the end-to-end demo.")


class DemoError(Exception):
    """Something the demo needs is missing or failed; the message says what to do."""


# -- processes -------------------------------------------------------------------------


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class _Supervisor:
    """Starts processes with their output in log files and stops them all at the end."""

    log_dir: Path
    procs: list[_Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> _Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches us, and we stop them in order
            )
        proc = _Proc(name=name, popen=popen, log=log)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                tail = p.log.read_text(errors="replace").splitlines()[-15:]
                raise DemoError(
                    f"{p.name} exited with code {p.popen.returncode}; its log ({p.log}) ends:\n"
                    + "\n".join(tail)
                )

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        self.procs.clear()


def _free_port(preferred: int | None = None) -> int:
    """The preferred port if it is free, else any free loopback port."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                console.print(f"  port {preferred} is in use; choosing another")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Callable[[], Any], what: str, timeout_s: float, sup: _Supervisor) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sup.check_alive()
        try:
            result = check()
        except (OSError, urllib.error.URLError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")


# -- the fleet's REST API ----------------------------------------------------------------


@dataclass
class _Api:
    base: str
    token: str | None = None

    def call(self, method: str, path: str, body: Any = None, data: bytes | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise DemoError(f"{method} {path} -> {exc.code}: {detail}") from None
        return json.loads(raw) if raw else None


# -- steps -------------------------------------------------------------------------------


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if not found:
        raise DemoError(
            "mosquitto is not installed: run `make mosquitto` (or `sudo apt-get install "
            "mosquitto`), then run the demo again"
        )
    return found


def _start_broker(sup: _Supervisor, work: Path, port: int) -> None:
    conf = work / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "log_dest stdout",
        "max_packet_size 4194304",
    ]
    if os.geteuid() == 0:
        # Mosquitto drops root to the 'mosquitto' user, which cannot write our work dir.
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sup.start("mosquitto", [_mosquitto_binary(), "-c", str(conf)])

    def accepts() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait(accepts, "Mosquitto to listen", 10, sup)


def _compile(keys: Path, out: Path, profile: str, version: int) -> tuple[Path, str]:
    from compiler.pipeline import CompileOptions, compile_model

    result = compile_model(
        CompileOptions(
            model_path=DIGITS / "model.onnx",
            profile=profile,
            calibration_path=DIGITS / "calibration.npz",
            heldout_path=DIGITS / "heldout.npz",
            key_path=keys / "release.key",
            out_dir=out,
            model_name="digits",
            model_version=version,
        )
    )
    v = result.manifest.verification
    acc = (
        f"top-1 {v.float_top1_accuracy:.2%} -> {v.artifact_top1_accuracy:.2%}"
        if v is not None and v.float_top1_accuracy is not None
        else ""
    )
    console.print(
        f"  compiled digits v{version} for [bold]{profile}[/bold]: "
        f"{result.manifest.artifact.precision} {result.manifest.artifact.format}, "
        f"{result.size_bytes:,} bytes, {acc}"
    )
    return result.bundle_path, result.sha256


def _device_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="devices", show_lines=False)
    for col in ("device", "profile", "online", "model", "inferences", "p95 ms", "last seen"):
        t.add_column(col, justify="right" if col in ("inferences", "p95 ms") else "left")
    for d in sorted(rows, key=lambda r: r["id"]):
        p95 = d.get("latency_p95_ms")
        model = f"{d.get('model_name') or '-'}@v{d.get('model_version') or '-'}"
        t.add_row(
            d["id"],
            d.get("profile") or "-",
            "[green]yes" if d.get("online") else "[red]no",
            model,
            f"{d.get('inference_count') or 0:,}",
            "-" if p95 is None else f"{p95:.2f}",
            (d.get("last_seen") or "-")[11:19],
        )
    return t


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    out: Path
    devices: int
    http_port: int | None
    wait: bool
    window_s: float


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the demo; returns the summary (also printed)."""
    from edgefleet.keys_cli import init_keys

    started = time.monotonic()
    work = opts.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh fleet database and device state every run
    run_dir.mkdir()
    sup = _Supervisor(run_dir / "logs")
    py = sys.executable
    summary: dict[str, Any] = {}
    try:
        console.rule("[bold]1. release keys")
        trust = init_keys(work / "keys", reuse=True)
        console.print(f"  trust root {trust} (release key stays in {work / 'keys'})")

        console.rule("[bold]2. compile and sign")
        bundle, sha = _compile(work / "keys", work / "dist", "x86-cpu", 1)

        console.rule("[bold]3. broker, fleet, devices")
        mqtt_port = _free_port()
        _start_broker(sup, run_dir, mqtt_port)
        console.print(f"  Mosquitto on 127.0.0.1:{mqtt_port}")
        http_port = _free_port(opts.http_port)
        base = f"http://127.0.0.1:{http_port}"
        sup.start(
            "fleet",
            [
                py, "-m", "edgefleet.cli", "fleet", "serve",
                "--trust-root", str(trust),
                "--db", f"sqlite:///{run_dir / 'fleet.db'}",
                "--mqtt-port", str(mqtt_port),
                "--bundle-dir", str(run_dir / "bundles"),
                "--port", str(http_port),
            ],
        )  # fmt: skip
        api = _Api(base)
        _wait(
            lambda: api.call("GET", "/healthz").get("mqtt") == "connected",
            "the fleet service",
            60,
            sup,
        )
        console.print(f"  fleet service on {base}")
        device_ids = [f"demo-x86-{i:02d}" for i in range(opts.devices)]
        for dev in device_ids:
            sup.start(
                dev,
                [
                    py, "-m", "edgefleet.cli", "agent", "run",
                    "--device-id", dev,
                    "--profile", "x86-cpu",
                    "--state-dir", str(run_dir / "devices" / dev),
                    "--trust-root", str(trust),
                    "--mqtt-port", str(mqtt_port),
                    "--telemetry-window-s", str(opts.window_s),
                    "--heartbeat-s", "2",
                    "--workload", str(DIGITS / "heldout.npz"),
                    "--rate", "20",
                ],
            )  # fmt: skip
        console.print(f"  started {len(device_ids)} agent processes")

        def all_registered() -> bool:
            seen = {d["id"] for d in api.call("GET", "/api/v1/devices") if d.get("profile")}
            return set(device_ids) <= seen

        _wait(all_registered, "the agents to check in", 60, sup)

        console.rule("[bold]4. upload and deploy")
        up = api.call("POST", "/api/v1/bundles", data=bundle.read_bytes())
        console.print(f"  uploaded {bundle.name}; the fleet verified it ({up['sha256'][:12]})")
        dep = api.call(
            "POST", "/api/v1/deployments", body={"bundle_sha256": sha, "device_ids": device_ids}
        )
        console.print(f"  deploy command sent to {len(dep['commands'])} devices")

        def all_serving() -> list[dict[str, Any]] | None:
            rows = [d for d in api.call("GET", "/api/v1/devices") if d["id"] in device_ids]
            done = [
                d
                for d in rows
                if d.get("reported_bundle_sha256") == sha and (d.get("inference_count") or 0) > 0
            ]
            return rows if len(done) == len(device_ids) else None

        rows = _wait(all_serving, "every device to install v1 and report telemetry", 120, sup)

        console.rule("[bold]5. devices reporting")
        console.print(_device_table(rows))
        summary = {
            "devices": len(rows),
            "serving_v1": sum(1 for d in rows if d.get("model_version") == 1),
            "inferences": sum(d.get("inference_count") or 0 for d in rows),
            "fleet_url": base,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        if opts.wait:
            console.print(
                f"\n  fleet API: {base}/docs   devices: {base}/api/v1/devices\n"
                "  press Ctrl-C to stop everything"
            )
            while True:
                time.sleep(opts.window_s)
                sup.check_alive()
                rows = [d for d in api.call("GET", "/api/v1/devices") if d["id"] in device_ids]
                console.print(_device_table(rows))
    except KeyboardInterrupt:
        console.print("\n  stopping ...")
    finally:
        sup.stop_all()
    console.rule("[bold]summary")
    for k, v in summary.items():
        console.print(f"  {k}: {v}")
    return summary


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working directory for keys, bundles, logs.")] = Path(
        "demo-out"
    ),
    devices: Annotated[int, typer.Option(help="Agent processes to start.")] = 4,
    port: Annotated[int, typer.Option(help="Preferred HTTP port of the fleet.")] = 8080,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Exit as soon as the story is told.")
    ] = False,
    window_s: Annotated[float, typer.Option(help="Telemetry window seconds.")] = 3.0,
) -> None:
    """Run the whole loop on this machine and show the devices reporting."""
    try:
        summary = run_demo(
            DemoOptions(
                out=out, devices=devices, http_port=port, wait=not no_wait, window_s=window_s
            )
        )
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from None
    if not summary:
        raise typer.Exit(1)


def main() -> None:
    """`python -m edgefleet.demo` (what `make demo` runs)."""
    app()


if __name__ == "__main__":
    main()
