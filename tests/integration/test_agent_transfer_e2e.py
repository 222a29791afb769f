"""Bundle transfer over a real Mosquitto: the fleet's ChunkServer answers from its bundle
directory, the agent process fetches in chunks (the bundle URL is unreachable, so MQTT is
the only way), survives a SIGKILL mid-transfer, resumes, and commits."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.testing import build_test_bundle
from fleet.settings import FleetSettings
from fleet.transfer import ChunkServer
from protocol.messages import decode_message, encode_message
from protocol.signing import generate_signing_key
from protocol.trust import TrustRoot
from tests.broker import Broker
from tests.procs import ProcessGroup

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"


class Listener:
    """Collects one device's status events."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.events: list[dict[str, object]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{device}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = lambda _c, _u, m: self.events.append(
            json.loads(m.payload) if m.topic.endswith("/status") else {}
        )
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"edgefleet/v1/{device}/status", qos=1)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _wait(pred: object, what: str, timeout_s: float, procs: ProcessGroup) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{procs.describe()}")


def test_chunked_transfer_resumes_after_sigkill(
    tmp_path: Path, mosquitto: Broker, procs: ProcessGroup
) -> None:
    key = generate_signing_key()
    root = TrustRoot.create(
        root_keys=[generate_signing_key()],
        release_keys=[key],
        expires_at=datetime.now(UTC) + timedelta(days=30),
    )
    (tmp_path / "root.json").write_bytes(root.raw)
    with np.load(DIGITS / "heldout.npz") as npz:
        samples = npz["input"][:64]
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    tmp_bundle = tmp_path / "b.efb"
    b = build_test_bundle(tmp_bundle, model_path=DIGITS / "model.onnx", samples=samples, signer=key)
    tmp_bundle.rename(bundles / f"{b.sha256}.efb")

    settings = FleetSettings(
        trust_root=tmp_path / "root.json",
        bundle_dir=bundles,
        mqtt_host=mosquitto.host,
        mqtt_port=mosquitto.port,
        mqtt_share_group=f"t{time.monotonic_ns() % 10**9}",
    )
    server = ChunkServer(settings)
    server.start()
    device = f"xfer-{time.monotonic_ns() % 10**8}"
    listener = Listener(mosquitto, device)
    try:
        assert server.connected.wait(10)
        argv = [
            sys.executable, "-m", "agent.cli", "run",
            "--state-dir", str(tmp_path / "state"), "--device-id", device,
            "--profile", "x86-cpu", "--trust-root", str(tmp_path / "root.json"),
            "--mqtt-host", mosquitto.host, "--mqtt-port", str(mosquitto.port),
            "--health-timeout-s", "0", "--chunk-size", "4096",
        ]  # fmt: skip
        # ~4 s of transfer: time to kill it half-way
        agent = procs.start("agent", [*argv, "--max-download-bps", str(b.size / 4)])
        _wait(lambda: "connected to MQTT" in agent.log_text(), "agent connect", 30, procs)
        cmd = b.deploy_command(device, bundle_url="http://127.0.0.1:9/unreachable")
        listener.publish(f"edgefleet/v1/{device}/cmd", encode_message(cmd))

        def half() -> bool:
            prog = [e.get("progress") or 0 for e in listener.events]
            return any(0.3 <= p < 0.9 for p in prog)  # type: ignore[operator]

        _wait(half, "the transfer to be under way", 60, procs)
        agent.kill()
        have = tmp_path / "state" / "downloads" / f"{b.sha256}.have"
        assert have.exists()
        held = sum(
            json.loads(have.read_text())["have"][i : i + 2] == "01" for i in range(0, 200, 2)
        )
        assert held > 0
        sent_before = server.stats["chunks_sent"]

        agent = procs.start("agent2", argv)
        _wait(
            lambda: any(e.get("state") == "committed" for e in listener.events),
            "the resumed install to commit",
            90,
            procs,
        )
        assert "resuming download" in agent.log_text()
        chunks = -(-b.size // 4096)
        # resumed: the whole transfer took fewer chunk sends than twice the bundle
        assert server.stats["chunks_sent"] - sent_before < chunks
        committed = [e for e in listener.events if e.get("state") == "committed"][-1]
        assert committed["active_bundle_sha256"] == b.sha256
        assert decode_message(json.dumps(committed).encode())
    finally:
        listener.close()
        server.stop()
