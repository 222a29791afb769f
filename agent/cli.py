"""``edgefleet agent ...``: run the agent on a device.

    python -m agent.cli run --state-dir /var/lib/edgefleet --device-id pi-0042 \\
        --profile raspberry-pi-5 --mqtt-host broker.local --trust-root root.json
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import zlib
from pathlib import Path
from types import FrameType

import typer

__all__ = ["app"]

app = typer.Typer(
    help="The on-device agent: installs bundles, serves inference, reports telemetry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """The on-device agent."""


def _setup_logging(level: str, device_id: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{device_id}] %(name)s: %(message)s",
    )


@app.command()
def run(
    state_dir: Path = typer.Option(..., help="Directory for slots, pointers, trust root, outbox."),
    device_id: str = typer.Option(..., help="This device's id (letters, digits, . - _)."),
    profile: str = typer.Option(..., help="Hardware profile name or TOML path."),
    trust_root: Path | None = typer.Option(
        None, help="Trust root JSON to install at first start (later starts reuse the state's)."
    ),
    mqtt_host: str = typer.Option("127.0.0.1", help="MQTT broker host."),
    mqtt_port: int = typer.Option(1883, help="MQTT broker port."),
    mqtt_username: str | None = typer.Option(
        None, envvar="EDGEFLEET_MQTT_USERNAME", help="MQTT user name (default: none)."
    ),
    mqtt_password: str | None = typer.Option(
        None, envvar="EDGEFLEET_MQTT_PASSWORD", help="MQTT password (prefer the env variable)."
    ),
    credentials: Path | None = typer.Option(
        None,
        envvar="EDGEFLEET_CREDENTIALS",
        help="JSON {username, password} from `edgefleet fleet enroll` (mode 0600).",
    ),
    telemetry_window_s: float = typer.Option(60.0, help="Seconds per telemetry window."),
    heartbeat_s: float = typer.Option(30.0, help="Seconds between heartbeats."),
    health_inferences: int = typer.Option(20, help="Inferences in the post-switch health window."),
    latency_budget_ms: float | None = typer.Option(
        None,
        help="p95 latency budget of the post-install health window (default: the profile's).",
    ),
    health_timeout_s: float = typer.Option(
        30.0, help="Seconds to wait for real traffic before probing with golden inputs."
    ),
    compress_sketches: bool = typer.Option(
        False,
        help="zlib the telemetry sketch pack (~20% fewer bytes on a metered link; the fleet "
        "pays ~0.14 ms of CPU per window to inflate it).",
    ),
    workload: Path | None = typer.Option(
        None, help="Synthetic application: an .npz whose samples are fed to the model."
    ),
    rate: float = typer.Option(10.0, help="Synthetic workload rate, inferences per second."),
    workload_key: str = typer.Option("input", help="Key of the samples in the workload .npz."),
    label_fraction: float = typer.Option(
        0.0,
        help="Report the true label (key 'label' of the workload .npz) for this fraction of "
        "the workload's predictions, as an application that learns the truth would.",
    ),
    tag: list[str] = typer.Option([], "--tag", help="A device tag (repeatable)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    api_port: int | None = typer.Option(
        None, help="Serve the local inference API on 127.0.0.1:PORT (0 = any free port)."
    ),
    api_socket: Path | None = typer.Option(
        None, help="Serve the local inference API on this Unix socket."
    ),
    max_download_bps: float | None = typer.Option(
        None, help="Cap on bundle download speed, bytes per second (default: no cap)."
    ),
    chunk_size: int = typer.Option(64 * 1024, help="Bundle transfer chunk size in bytes."),
    transfer: str = typer.Option(
        "mqtt", help="Bundle transfer when a command gives no hint: mqtt (HTTP fallback) or http."
    ),
    outbox_max_bytes: int = typer.Option(
        64 * 1024 * 1024, help="Telemetry kept on disk while offline (older windows merge)."
    ),
    crash_at: str | None = typer.Option(
        None, envvar="EDGEFLEET_AGENT_CRASH_AT", hidden=True, help="Test hook: POINT:N."
    ),
) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    from agent.agent import Agent, paho_transport_for
    from agent.config import AgentConfig, load_agent_profile
    from agent.errors import AgentError
    from agent.workload import SyntheticWorkload

    _setup_logging(log_level, device_id)
    log = logging.getLogger("agent")
    try:
        if credentials is not None:
            mqtt_username, mqtt_password = _read_credentials(credentials)
        config = AgentConfig(
            device_id=device_id,
            profile=load_agent_profile(profile),
            state_dir=state_dir,
            trust_root_path=trust_root,
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            mqtt_username=mqtt_username,
            mqtt_password=mqtt_password,
            telemetry_window_s=telemetry_window_s,
            heartbeat_s=heartbeat_s,
            health_inferences=health_inferences,
            health_timeout_s=health_timeout_s,
            latency_budget_ms=latency_budget_ms,
            compress_sketches=compress_sketches,
            tags=tuple(tag),
            api_port=api_port,
            api_socket=api_socket,
            max_download_bps=max_download_bps,
            chunk_size_bytes=chunk_size,
            default_transfer=transfer,
            outbox_max_bytes=outbox_max_bytes,
            crash_at=crash_at,
        )
        agent = Agent(config, transport=paho_transport_for(config))
        load = (
            SyntheticWorkload(
                agent.service,
                workload,
                rate_hz=rate,
                key=workload_key,
                label_fraction=label_fraction,
                seed=zlib.crc32(device_id.encode()),
            )
            if workload is not None
            else None
        )
    except AgentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except AgentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if load is not None:
        load.start()
    if agent.api is not None and agent.api.port is not None:
        log.info("local API port %d", agent.api.port)
    log.info(
        "agent %s running (profile %s, broker %s:%d, pid %d)",
        device_id,
        config.profile.name,
        mqtt_host,
        mqtt_port,
        os.getpid(),
    )
    done.wait()
    if load is not None:
        load.stop()
    agent.stop()
    log.info("stopped")


@app.command()
def bench(
    state_dir: Path = typer.Option(..., help="The agent's state directory."),
    device_id: str = typer.Option(..., help="This device's id."),
    profile: str = typer.Option(..., help="Hardware profile name or TOML path."),
    runs: int = typer.Option(200, help="Timed inferences (after warm-up)."),
    warmup: int = typer.Option(20, help="Untimed inferences first."),
    batch: int = typer.Option(1, help="Batch size per inference."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Measure the installed model on this device; the running agent reports it to the fleet.

    The result lands in STATE_DIR/bench.json; the agent adds it to its heartbeats (field
    ``bench``) while the same bundle is active.
    """
    from agent.bench import run_bench
    from agent.config import load_agent_profile
    from agent.errors import AgentError

    try:
        result = run_bench(
            state_dir,
            device_id=device_id,
            profile=load_agent_profile(profile),
            runs=runs,
            warmup=warmup,
            batch=batch,
        )
    except AgentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(result.model_dump_json(indent=1))
        return
    mem = f"{result.mem_rss_bytes / 2**20:.1f} MiB" if result.mem_rss_bytes else "n/a"
    typer.echo(
        f"{result.backend}, batch {result.batch}, {result.runs} runs: "
        f"p50 {result.latency_p50_ms:.3f} ms, p90 {result.latency_p90_ms:.3f} ms, "
        f"p99 {result.latency_p99_ms:.3f} ms, {result.throughput_per_s:.1f} inferences/s, "
        f"RSS {mem}"
    )


def _read_credentials(path: Path) -> tuple[str, str]:
    """The broker identity from an enrollment file; refuse one others can read."""
    import json

    from agent.errors import ConfigError

    try:
        mode = path.stat().st_mode
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--credentials {path}: {exc}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"--credentials {path} is readable by other users (mode {mode & 0o777:o}); "
            f"run `chmod 600 {path}`"
        )
    if not isinstance(obj, dict) or not all(
        isinstance(obj.get(k), str) and obj.get(k) for k in ("username", "password")
    ):
        raise ConfigError(f"--credentials {path} must hold {{'username': ..., 'password': ...}}")
    return obj["username"], obj["password"]


if __name__ == "__main__":
    app()
