"""fleet REST API: registry, devices, deployments, download, metrics; MQTT is a fake."""

from __future__ import annotations

import hashlib
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session
from starlette.exceptions import StarletteDeprecationWarning

from fleet.app import create_app
from fleet.errors import BrokerUnavailable, SettingsError
from fleet.ingest import handle
from fleet.settings import FleetSettings
from protocol.bundle import sign_manifest, write_bundle
from protocol.manifest import ArtifactInfo, BundleManifest, FileEntry, ModelInfo, TensorSpec
from protocol.messages import DeployCommand, RollbackCommand, encode_message
from protocol.signing import SigningKey, generate_signing_key
from protocol.trust import TrustRoot

with warnings.catch_warnings():
    # starlette 1.x warns on import when only `httpx` (not `httpx2`) is installed; the
    # client works the same. pyproject could filter it instead (see the fleet report).
    warnings.filterwarnings(
        "ignore",
        category=StarletteDeprecationWarning,
        message="Using `httpx` with `starlette.testclient`",
    )
    from starlette.testclient import TestClient

MODEL = b"\x08\x07fake-onnx-model-bytes" * 50


# -- fixtures: keys, bundles, a fake publisher ---------------------------------------------


@dataclass
class Keys:
    root: SigningKey
    release: SigningKey
    trust: TrustRoot
    trust_path: Path


def make_keys(tmp_path: Path) -> Keys:
    root, release = generate_signing_key(), generate_signing_key()
    trust = TrustRoot.create(
        root_keys=[root], release_keys=[release], expires_at=datetime.now(UTC) + timedelta(days=365)
    )
    path = tmp_path / "trust-root.json"
    path.write_bytes(trust.raw)
    return Keys(root=root, release=release, trust=trust, trust_path=path)


def make_bundle(
    out: Path,
    release: SigningKey,
    *,
    version: int = 3,
    profile: str = "x86-cpu",
    model: bytes = MODEL,
    selectors: tuple[str, ...] = (),
) -> Path:
    now = datetime.now(UTC).replace(microsecond=0)
    manifest = BundleManifest(
        model=ModelInfo(name="digits", version=version),
        profile=profile,
        device_selectors=selectors,
        created_at=now,
        expires_at=now + timedelta(days=30),
        files=(
            FileEntry(
                path="model/model.onnx",
                sha256=hashlib.sha256(model).hexdigest(),
                size=len(model),
                role="artifact",
            ),
        ),
        artifact=ArtifactInfo(
            path="model/model.onnx", format="onnx", runtime="onnxruntime", precision="int8"
        ),
        inputs=(TensorSpec(name="input", dtype="float32", shape=(None, 1, 8, 8)),),
        outputs=(TensorSpec(name="logits", dtype="float32", shape=(None, 10)),),
        key_ids=(release.keyid,),
    )
    write_bundle(out, manifest, sign_manifest(manifest, [release]), {"model/model.onnx": model})
    return out


def tamper(src: Path, dst: Path) -> Path:
    """Same manifest and signatures, one changed byte in the model file."""
    data = bytearray(src.read_bytes())
    with tarfile.open(src) as tar:
        member = tar.getmember("model/model.onnx")
    data[member.offset_data + 5] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


@dataclass
class FakePublisher:
    """Records commands; raises BrokerUnavailable after ``fail_after`` successful sends."""

    sent: list[DeployCommand | RollbackCommand] = field(default_factory=list)
    fail_after: int | None = None

    def publish_command(self, command: DeployCommand | RollbackCommand) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise BrokerUnavailable("MQTT broker test:1883 is not connected; not sent")
        self.sent.append(command)


@dataclass
class Fleet:
    client: TestClient
    publisher: FakePublisher
    settings: FleetSettings
    keys: Keys
    tmp: Path

    def upload(self, path: Path) -> dict[str, object]:
        r = self.client.post(
            "/api/v1/bundles",
            content=path.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code in (200, 201), r.text
        return r.json()  # type: ignore[no-any-return]

    def register(
        self, device_id: str, profile: str = "x86-cpu", tags: tuple[str, ...] = ()
    ) -> None:
        r = self.client.post(
            "/api/v1/devices", json={"id": device_id, "profile": profile, "tags": list(tags)}
        )
        assert r.status_code in (200, 201), r.text

    def ingest(self, topic: str, payload: bytes) -> None:
        with Session(self.client.app.state.engine) as s:  # type: ignore[attr-defined]
            handle(topic, payload, s)
            s.commit()


def make_settings(tmp_path: Path, keys: Keys, **kw: object) -> FleetSettings:
    base: dict[str, object] = dict(
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        trust_root=keys.trust_path,
        bundle_dir=tmp_path / "bundles",
        public_url="http://fleet.test:8080",
        # auth has its own tests (test_auth_api.py); these test the endpoints behind it
        auth_enabled=False,
    )
    base.update(kw)
    return FleetSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    keys = make_keys(tmp_path)
    settings = make_settings(tmp_path, keys)
    publisher = FakePublisher()
    with TestClient(create_app(settings, publisher=publisher)) as client:
        yield Fleet(client=client, publisher=publisher, settings=settings, keys=keys, tmp=tmp_path)


# -- bundles -------------------------------------------------------------------------------


def test_upload_verifies_stores_and_is_idempotent(fleet: Fleet) -> None:
    path = make_bundle(fleet.tmp / "b.efb", fleet.keys.release)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    r = fleet.client.post(
        "/api/v1/bundles",
        content=path.read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["sha256"] == sha and body["model_name"] == "digits"
    assert body["model_version"] == 3 and body["profile"] == "x86-cpu"
    assert body["size"] == path.stat().st_size and "path" not in body
    assert (fleet.settings.bundle_dir / f"{sha}.efb").read_bytes() == path.read_bytes()

    again = fleet.client.post("/api/v1/bundles", content=path.read_bytes())
    assert again.status_code == 200 and again.json()["sha256"] == sha

    listed = fleet.client.get("/api/v1/bundles").json()
    assert [b["sha256"] for b in listed] == [sha]
    detail = fleet.client.get(f"/api/v1/bundles/{sha}").json()
    assert detail["manifest"]["model"]["name"] == "digits"


def test_multipart_upload_is_accepted(fleet: Fleet) -> None:
    path = make_bundle(fleet.tmp / "b.efb", fleet.keys.release)
    r = fleet.client.post(
        "/api/v1/bundles", files={"file": ("b.efb", path.read_bytes(), "application/octet-stream")}
    )
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def _stored_files(fleet: Fleet) -> list[Path]:
    return [p for p in fleet.settings.bundle_dir.rglob("*") if p.is_file()]


def test_tampered_bundle_is_rejected_and_nothing_stored(fleet: Fleet) -> None:
    good = make_bundle(fleet.tmp / "b.efb", fleet.keys.release)
    bad = tamper(good, fleet.tmp / "bad.efb")
    r = fleet.client.post("/api/v1/bundles", content=bad.read_bytes())
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "bundle_rejected" and body["reason"] == "bad_bundle_hash"
    assert "model/model.onnx" in body["detail"]
    assert fleet.client.get("/api/v1/bundles").json() == []
    assert _stored_files(fleet) == []


def test_bundle_signed_by_unknown_key_is_rejected(fleet: Fleet) -> None:
    stranger = generate_signing_key()
    path = make_bundle(fleet.tmp / "b.efb", stranger)
    r = fleet.client.post("/api/v1/bundles", content=path.read_bytes())
    assert r.status_code == 422 and r.json()["reason"] == "bad_signature"
    assert _stored_files(fleet) == []


def test_garbage_upload_is_rejected(fleet: Fleet) -> None:
    r = fleet.client.post("/api/v1/bundles", content=b"not a tar file at all")
    assert r.status_code == 422 and r.json()["reason"] == "bad_bundle_format"


def test_upload_over_the_limit_is_refused(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    settings = make_settings(tmp_path, keys, max_upload_bytes=1024)
    path = make_bundle(tmp_path / "b.efb", keys.release)
    with TestClient(create_app(settings, publisher=FakePublisher())) as client:
        r = client.post("/api/v1/bundles", content=path.read_bytes())
        assert r.status_code == 413 and r.json()["error"] == "bundle_too_large"
        # also when the body is streamed without a length
        r = client.post("/api/v1/bundles", content=iter([path.read_bytes()]))
        assert r.status_code == 413
    assert [p for p in settings.bundle_dir.rglob("*") if p.is_file()] == []


def test_download_supports_range_requests(fleet: Fleet) -> None:
    path = make_bundle(fleet.tmp / "b.efb", fleet.keys.release)
    data = path.read_bytes()
    sha = fleet.upload(path)["sha256"]
    url = f"/api/v1/bundles/{sha}/download"

    full = fleet.client.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["accept-ranges"] == "bytes"

    part = fleet.client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"

    resume = fleet.client.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert resume.status_code == 206 and resume.content == data[-10:]

    beyond = fleet.client.get(url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert beyond.status_code == 416

    assert fleet.client.get(f"/api/v1/bundles/{'0' * 64}/download").status_code == 404


# -- devices -------------------------------------------------------------------------------


def test_register_device_validates_id(fleet: Fleet) -> None:
    r = fleet.client.post("/api/v1/devices", json={"id": "bad/id", "profile": "x86-cpu"})
    assert r.status_code == 422 and "forbidden characters" in r.json()["detail"]

    r = fleet.client.post(
        "/api/v1/devices", json={"id": "pi-1", "profile": "raspberry-pi-5", "tags": ["lab"]}
    )
    assert r.status_code == 201
    assert r.json()["id"] == "pi-1" and r.json()["tags"] == ["lab"]
    assert not r.json()["online"] and r.json()["inference_count"] == 0

    same = fleet.client.post("/api/v1/devices", json={"id": "pi-1", "profile": "raspberry-pi-5"})
    assert same.status_code == 200
    other = fleet.client.post("/api/v1/devices", json={"id": "pi-1", "profile": "x86-cpu"})
    assert other.status_code == 409


def test_device_listing_shows_model_telemetry_and_events(fleet: Fleet) -> None:
    import numpy as np

    from protocol.messages import Heartbeat, InstallState, StatusEvent, TelemetryWindow
    from protocol.sketch import FeatureSketch
    from protocol.topics import Channel, device_topic

    fleet.register("dev-1")
    sha = "c" * 64
    fleet.ingest(
        device_topic("dev-1", Channel.HEARTBEAT),
        encode_message(
            Heartbeat(
                device_id="dev-1",
                profile="x86-cpu",
                agent_version="0.1.0",
                active_bundle_sha256=sha,
                model_name="digits",
                model_version=3,
                uptime_s=1.0,
            )
        ),
    )
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    for seq, top in ((0, 10.0), (1, 200.0)):
        fleet.ingest(
            device_topic("dev-1", Channel.TELEMETRY),
            encode_message(
                TelemetryWindow(
                    device_id="dev-1",
                    seq=seq,
                    window_start=t0 + timedelta(minutes=seq),
                    window_end=t0 + timedelta(minutes=seq + 1),
                    inference_count=40,
                    model_name="digits",
                    model_version=3,
                    latency_ms=FeatureSketch.of(np.linspace(1.0, top, 100)).to_wire(),
                )
            ),
        )
    fleet.ingest(
        device_topic("dev-1", Channel.STATUS),
        encode_message(
            StatusEvent(device_id="dev-1", state=InstallState.DOWNLOADING, progress=0.5)
        ),
    )

    [d] = fleet.client.get("/api/v1/devices").json()
    assert d["id"] == "dev-1" and d["online"] is True
    assert (d["model_name"], d["model_version"]) == ("digits", 3)
    assert d["inference_count"] == 80
    assert d["latency_p95_ms"] == pytest.approx(190, rel=0.05)  # the latest window's

    detail = fleet.client.get("/api/v1/devices/dev-1").json()
    assert [e["state"] for e in detail["events"]] == ["downloading"]
    assert fleet.client.get("/api/v1/devices/nope").status_code == 404

    metrics = fleet.client.get("/metrics").text
    assert "edgefleet_fleet_devices_online 1.0" in metrics
    assert 'edgefleet_fleet_inferences_total{model="digits",version="3"} 80.0' in metrics
    assert "edgefleet_fleet_devices 1.0" in metrics


def test_device_goes_offline_after_silence(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    settings = make_settings(tmp_path, keys, offline_after_s=0.001)
    from protocol.messages import Heartbeat
    from protocol.topics import Channel, device_topic

    with TestClient(create_app(settings, publisher=FakePublisher())) as client:
        with Session(client.app.state.engine) as s:  # type: ignore[attr-defined]
            handle(
                device_topic("d", Channel.HEARTBEAT),
                encode_message(
                    Heartbeat(device_id="d", profile="x86-cpu", agent_version="1", uptime_s=0.0)
                ),
                s,
                now=datetime.now(UTC) - timedelta(seconds=5),
            )
            s.commit()
        [d] = client.get("/api/v1/devices").json()
        assert d["online"] is False and d["last_seen"] is not None


# -- deployments ---------------------------------------------------------------------------


def test_deploy_sends_commands_and_records_desired_state(fleet: Fleet) -> None:
    path = make_bundle(fleet.tmp / "b.efb", fleet.keys.release)
    bundle = fleet.upload(path)
    fleet.register("dev-1")
    fleet.register("dev-2")
    r = fleet.client.post(
        "/api/v1/deployments",
        json={"bundle_sha256": bundle["sha256"], "device_ids": ["dev-1", "dev-2"]},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert sorted(c["device_id"] for c in body["commands"]) == ["dev-1", "dev-2"]

    cmds = fleet.publisher.sent
    assert [c.device_id for c in cmds] == ["dev-1", "dev-2"]
    cmd = cmds[0]
    assert isinstance(cmd, DeployCommand)
    assert cmd.bundle_sha256 == bundle["sha256"] and cmd.bundle_size == bundle["size"]
    assert cmd.bundle_url == f"http://fleet.test:8080/api/v1/bundles/{bundle['sha256']}/download"
    assert (cmd.model_name, cmd.model_version) == ("digits", 3)
    assert {c["id"] for c in body["commands"]} == {c.command_id for c in cmds}

    for d in fleet.client.get("/api/v1/devices").json():
        assert d["desired_bundle_sha256"] == bundle["sha256"]
    detail = fleet.client.get("/api/v1/devices/dev-1").json()
    assert detail["commands"][0]["kind"] == "deploy" and detail["commands"][0]["state"] == "sent"


def test_deploy_by_profile_picks_matching_devices(fleet: Fleet) -> None:
    bundle = fleet.upload(make_bundle(fleet.tmp / "b.efb", fleet.keys.release))
    fleet.register("x-1")
    fleet.register("pi-1", profile="raspberry-pi-5")
    r = fleet.client.post(
        "/api/v1/deployments", json={"bundle_sha256": bundle["sha256"], "profile": "x86-cpu"}
    )
    assert r.status_code == 201
    assert [c.device_id for c in fleet.publisher.sent] == ["x-1"]
    r = fleet.client.post(
        "/api/v1/deployments", json={"bundle_sha256": bundle["sha256"], "profile": "raspberry-pi-5"}
    )
    assert r.status_code == 409


def test_deploy_unknown_bundle_is_404(fleet: Fleet) -> None:
    fleet.register("dev-1")
    r = fleet.client.post(
        "/api/v1/deployments", json={"bundle_sha256": "f" * 64, "device_ids": ["dev-1"]}
    )
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert fleet.publisher.sent == []


def test_deploy_checks_every_device_before_sending_any(fleet: Fleet) -> None:
    bundle = fleet.upload(make_bundle(fleet.tmp / "b.efb", fleet.keys.release))
    fleet.register("dev-1")
    fleet.register("pi-1", profile="raspberry-pi-5")
    r = fleet.client.post(
        "/api/v1/deployments",
        json={"bundle_sha256": bundle["sha256"], "device_ids": ["dev-1", "pi-1"]},
    )
    assert r.status_code == 409 and r.json()["device_ids"] == ["pi-1"]
    r = fleet.client.post(
        "/api/v1/deployments",
        json={"bundle_sha256": bundle["sha256"], "device_ids": ["dev-1", "ghost"]},
    )
    assert r.status_code == 404 and r.json()["device_ids"] == ["ghost"]
    r = fleet.client.post(
        "/api/v1/deployments", json={"bundle_sha256": bundle["sha256"], "device_ids": ["a/b"]}
    )
    assert r.status_code == 422
    r = fleet.client.post("/api/v1/deployments", json={"bundle_sha256": bundle["sha256"]})
    assert r.status_code == 422
    assert fleet.publisher.sent == []
    assert all(
        d["desired_bundle_sha256"] is None for d in fleet.client.get("/api/v1/devices").json()
    )


def test_deploy_respects_device_selectors(fleet: Fleet) -> None:
    bundle = fleet.upload(
        make_bundle(fleet.tmp / "b.efb", fleet.keys.release, selectors=("tag:canary",))
    )
    fleet.register("dev-1", tags=("canary",))
    fleet.register("dev-2")
    r = fleet.client.post(
        "/api/v1/deployments", json={"bundle_sha256": bundle["sha256"], "device_ids": ["dev-2"]}
    )
    assert r.status_code == 409
    r = fleet.client.post(
        "/api/v1/deployments", json={"bundle_sha256": bundle["sha256"], "profile": "x86-cpu"}
    )
    assert r.status_code == 201
    assert [c.device_id for c in fleet.publisher.sent] == ["dev-1"]


def test_broker_down_is_503_and_records_nothing(fleet: Fleet) -> None:
    bundle = fleet.upload(make_bundle(fleet.tmp / "b.efb", fleet.keys.release))
    fleet.register("dev-1")
    fleet.publisher.fail_after = 0
    r = fleet.client.post(
        "/api/v1/deployments", json={"bundle_sha256": bundle["sha256"], "device_ids": ["dev-1"]}
    )
    assert r.status_code == 503 and r.json()["error"] == "broker_unavailable"
    detail = fleet.client.get("/api/v1/devices/dev-1").json()
    assert detail["desired_bundle_sha256"] is None and detail["commands"] == []


def test_broker_failing_midway_records_only_what_was_sent(fleet: Fleet) -> None:
    bundle = fleet.upload(make_bundle(fleet.tmp / "b.efb", fleet.keys.release))
    for d in ("dev-1", "dev-2", "dev-3"):
        fleet.register(d)
    fleet.publisher.fail_after = 1
    r = fleet.client.post(
        "/api/v1/deployments",
        json={"bundle_sha256": bundle["sha256"], "device_ids": ["dev-1", "dev-2", "dev-3"]},
    )
    assert r.status_code == 503
    body = r.json()
    assert body["sent_device_ids"] == ["dev-1"]
    assert body["unsent_device_ids"] == ["dev-2", "dev-3"]
    desired = {
        d["id"]: d["desired_bundle_sha256"] for d in fleet.client.get("/api/v1/devices").json()
    }
    assert desired == {"dev-1": bundle["sha256"], "dev-2": None, "dev-3": None}


def test_rollback_sends_command(fleet: Fleet) -> None:
    fleet.register("dev-1")
    r = fleet.client.post("/api/v1/devices/dev-1/rollback", json={"reason": "latency"})
    assert r.status_code == 202 and r.json()["kind"] == "rollback"
    [cmd] = fleet.publisher.sent
    assert isinstance(cmd, RollbackCommand) and cmd.reason == "latency"
    assert cmd.target_bundle_sha256 is None and cmd.command_id == r.json()["id"]
    assert fleet.client.post("/api/v1/devices/dev-1/rollback").status_code == 202
    assert fleet.client.post("/api/v1/devices/ghost/rollback").status_code == 404


# -- operations ----------------------------------------------------------------------------


def test_healthz_stats_and_metrics(fleet: Fleet) -> None:
    assert fleet.client.get("/healthz").json() == {
        "status": "ok",
        "database": "ok",
        "mqtt": "disabled",
    }
    stats = fleet.client.get("/api/v1/stats").json()
    assert stats["received"] == 0 and stats["backlog"] == 0
    text = fleet.client.get("/metrics").text
    assert "edgefleet_fleet_messages_received_total 0.0" in text
    assert "edgefleet_fleet_devices_online 0.0" in text


def test_two_apps_in_one_process_have_separate_metrics(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    one = create_app(make_settings(tmp_path / "1", keys), publisher=FakePublisher())
    two = create_app(make_settings(tmp_path / "2", keys), publisher=FakePublisher())
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    with TestClient(one) as a, TestClient(two) as b:
        a.post("/api/v1/devices", json={"id": "only-in-one", "profile": "x86-cpu"})
        assert "edgefleet_fleet_devices 1.0" in a.get("/metrics").text
        assert "edgefleet_fleet_devices 0.0" in b.get("/metrics").text


def test_missing_trust_root_fails_at_construction(tmp_path: Path) -> None:
    settings = FleetSettings(
        trust_root=tmp_path / "nope.json",
        bundle_dir=tmp_path / "b",
        database_url=f"sqlite:///{tmp_path / 'f.db'}",
    )
    with pytest.raises(SettingsError, match=r"nope\.json"):
        create_app(settings, publisher=FakePublisher())
