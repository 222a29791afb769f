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
    telemetry_window_s: float = typer.Option(60.0, help="Seconds per telemetry window."),
    heartbeat_s: float = typer.Option(30.0, help="Seconds between heartbeats."),
    health_inferences: int = typer.Option(20, help="Inferences in the post-switch health window."),
    health_timeout_s: float = typer.Option(
        30.0, help="Seconds to wait for real traffic before probing with golden inputs."
    ),
    workload: Path | None = typer.Option(
        None, help="Synthetic application: an .npz whose samples are fed to the model."
    ),
    rate: float = typer.Option(10.0, help="Synthetic workload rate, inferences per second."),
    workload_key: str = typer.Option("input", help="Key of the samples in the workload .npz."),
    tag: list[str] = typer.Option([], "--tag", help="A device tag (repeatable)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    from agent.agent import Agent, paho_transport_for
    from agent.config import AgentConfig, load_agent_profile
    from agent.errors import AgentError
    from agent.workload import SyntheticWorkload

    _setup_logging(log_level, device_id)
    log = logging.getLogger("agent")
    try:
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
            tags=tuple(tag),
        )
        agent = Agent(config, transport=paho_transport_for(config))
        load = (
            SyntheticWorkload(agent.service, workload, rate_hz=rate, key=workload_key)
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


if __name__ == "__main__":
    app()
