"""agent installer: real signed bundles around the digits model, fakes at the seams."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from agent.testing import BuiltBundle, FakeTransport, FileFetcher, build_test_bundle
from hardware_profiles import load_profile
from protocol.messages import (
    DeployCommand,
    Heartbeat,
    InstallState,
    ReasonCode,
    RollbackCommand,
    StatusEvent,
    decode_message,
    encode_message,
)
from protocol.signing import SigningKey, generate_signing_key
from protocol.trust import TrustRoot

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"
DEVICE = "dev-001"
CMD_TOPIC = f"edgefleet/v1/{DEVICE}/cmd"
S = InstallState


@pytest.fixture(scope="module")
def heldout() -> np.ndarray:
    with np.load(DIGITS / "heldout.npz") as npz:
        return npz["input"][:64]


@pytest.fixture(scope="module")
def release_key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def trust_file(tmp_path_factory: pytest.TempPathFactory, release_key: SigningKey) -> Path:
    root = TrustRoot.create(
        root_keys=[generate_signing_key()],
        release_keys=[release_key],
        expires_at=datetime.now(UTC) + timedelta(days=365),
    )
    path = tmp_path_factory.mktemp("trust") / "root.json"
    path.write_bytes(root.raw)
    return path


class Rig:
    """Builds bundles and (re)starts agents on one state directory."""

    def __init__(self, tmp: Path, trust: Path, key: SigningKey, samples: np.ndarray) -> None:
        self.tmp, self.trust, self.key, self.samples = tmp, trust, key, samples
        self.fetcher = FileFetcher()
        self.transport = FakeTransport(auto_ack=True)
        self.profile = load_profile("x86-cpu")
        self.agent: Agent | None = None

    def bundle(self, version: int = 1, **kw: object) -> BuiltBundle:
        out = self.tmp / f"b{version}-{len(self.fetcher.files)}.efb"
        b = build_test_bundle(
            out,
            model_path=DIGITS / "model.onnx",
            samples=self.samples,
            signer=kw.pop("signer", self.key),  # type: ignore[arg-type]
            version=version,
            **kw,  # type: ignore[arg-type]
        )
        b = dataclasses.replace(b, url=f"test://{out.name}")
        self.fetcher.files[b.url] = out
        return b

    def start(self, **overrides: object) -> Agent:
        cfg = AgentConfig(
            device_id=DEVICE,
            profile=overrides.pop("profile", self.profile),  # type: ignore[arg-type]
            state_dir=self.tmp / "state",
            trust_root_path=self.trust,
            telemetry_window_s=5.0,
            health_inferences=5,
            health_timeout_s=0.0,
            **overrides,  # type: ignore[arg-type]
        )
        self.transport = FakeTransport(auto_ack=True)
        self.agent = Agent(cfg, transport=self.transport, fetcher=self.fetcher)
        self.agent.start(threads=False)
        return self.agent

    def send(self, cmd: DeployCommand | RollbackCommand) -> list[StatusEvent]:
        assert self.agent is not None
        before = len(self.transport.on("/status"))
        self.transport.deliver(CMD_TOPIC, encode_message(cmd))
        self.agent.process_commands()
        return [decode_message(p) for p in self.transport.on("/status")[before:]]

    def deploy(self, b: BuiltBundle, **kw: object) -> list[StatusEvent]:
        return self.send(b.deploy_command(DEVICE, **kw))

    def predict(self) -> np.ndarray:
        assert self.agent is not None
        return self.agent.service.predict({"input": self.samples[:4]})["logits"]


@pytest.fixture
def rig(tmp_path: Path, trust_file: Path, release_key: SigningKey, heldout: np.ndarray) -> Rig:
    r = Rig(tmp_path, trust_file, release_key, heldout)
    yield r
    if r.agent is not None:
        r.agent.stop()


def states(events: list[StatusEvent]) -> list[InstallState]:
    return [e.state for e in events]


def test_install_commits_and_serves(rig: Rig) -> None:
    agent = rig.start()
    b = rig.bundle(1)
    events = rig.deploy(b)
    assert states(events) == [
        S.RECEIVED,
        S.DOWNLOADING,
        S.DOWNLOADING,
        S.VERIFYING,
        S.INSTALLING,
        S.SELF_TEST,
        S.SWITCHED,
        S.HEALTH_CHECK,
        S.COMMITTED,
    ]
    last = events[-1]
    assert last.reason is ReasonCode.OK
    assert last.command_id == events[0].command_id
    assert last.bundle_sha256 == b.sha256 == last.active_bundle_sha256
    assert (last.model_name, last.model_version) == ("digits", 1)
    assert events[0].active_bundle_sha256 is None
    logits = rig.predict()
    assert logits.shape == (4, 10)
    active = json.loads((rig.tmp / "state" / "active.json").read_text())
    assert active["active"]["bundle_sha256"] == b.sha256
    assert active["pending"] is None
    assert [h["bundle_sha256"] for h in active["history"]] == [b.sha256]
    agent.tick()
    hb = decode_message(rig.transport.on("/heartbeat")[-1])
    assert isinstance(hb, Heartbeat)
    assert (hb.active_bundle_sha256, hb.model_version, hb.profile) == (b.sha256, 1, "x86-cpu")


def test_restart_serves_committed_model(rig: Rig) -> None:
    rig.start()
    b = rig.bundle(1)
    rig.deploy(b)
    expected = rig.predict()
    rig.agent.stop()  # type: ignore[union-attr]
    agent = rig.start()
    assert agent.service.model is not None
    assert agent.service.model.bundle_sha256 == b.sha256
    np.testing.assert_allclose(rig.predict(), expected)


def test_tampered_bundle_rejected_and_old_model_keeps_serving(rig: Rig) -> None:
    rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    before = rig.predict()
    v2 = rig.bundle(2)
    with tarfile.open(v2.path) as tar:
        member = tar.getmember("model/model.onnx")
    data = bytearray(v2.path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF  # a byte of the model's weights
    v2.path.write_bytes(bytes(data))

    # The fleet's sha no longer matches what arrives: refused by the download check.
    ev = rig.deploy(v2)
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.BAD_HASH)
    # A command carrying the tampered file's own sha: refused by the manifest's file hashes.
    tampered_sha = hashlib.sha256(bytes(data)).hexdigest()
    ev = rig.deploy(v2, bundle_sha256=tampered_sha)
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.BAD_HASH)
    assert S.SWITCHED not in states(ev)
    assert ev[-1].active_bundle_sha256 == v1.sha256
    np.testing.assert_array_equal(rig.predict(), before)
    assert rig.agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]


def test_bundle_signed_by_unknown_key_rejected(rig: Rig) -> None:
    rig.start()
    b = rig.bundle(1, signer=generate_signing_key())
    ev = rig.deploy(b)
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.BAD_SIGNATURE)
    assert rig.agent.service.model is None  # type: ignore[union-attr]


def test_wrong_profile_rejected(rig: Rig) -> None:
    rig.start()
    ev = rig.deploy(rig.bundle(1, profile="raspberry-pi-5"))
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.WRONG_TARGET)
    assert "raspberry-pi-5" in ev[-1].detail


def test_bundle_for_other_devices_rejected(rig: Rig) -> None:
    rig.start()
    ev = rig.deploy(rig.bundle(1, device_selectors=("dev-999", "tag:canary")))
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.WRONG_TARGET)


def test_old_version_rejected(rig: Rig) -> None:
    rig.start()
    v2 = rig.bundle(2)
    rig.deploy(v2)
    v1 = rig.bundle(1)
    ev = rig.deploy(v1)
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.OLD_VERSION)
    assert "not newer" in ev[-1].detail
    # Refused from the command alone: nothing was downloaded.
    assert v1.url not in rig.fetcher.fetched
    # A command that lies about the version is caught by the signed manifest.
    other = rig.bundle(1)
    ev = rig.deploy(other, model_version=3)
    assert ev[-1].state is S.REJECTED
    assert ev[-1].reason in (ReasonCode.OLD_VERSION, ReasonCode.BAD_COMMAND)
    assert rig.agent.service.model.model_version == 2  # type: ignore[union-attr]


def test_redeploying_the_active_bundle_is_idempotent(rig: Rig) -> None:
    rig.start()
    b = rig.bundle(1)
    rig.deploy(b)
    ev = rig.deploy(b)
    assert states(ev) == [S.RECEIVED, S.COMMITTED]
    assert "already active" in ev[-1].detail


def test_golden_mismatch_fails_self_test_and_old_model_serves(rig: Rig) -> None:
    rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    wrong = np.zeros((16, 10), dtype=np.float32)
    ev = rig.deploy(rig.bundle(2, golden_outputs={"logits": wrong}))
    assert (ev[-1].state, ev[-1].reason) == (S.FAILED, ReasonCode.SELF_TEST_FAILED)
    assert "outside atol" in ev[-1].detail
    assert S.SWITCHED not in states(ev)
    assert rig.agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]
    # The rollback target survived too: the failed bundle never entered a slot.
    ev = rig.send(RollbackCommand(device_id=DEVICE))
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.NOTHING_TO_ROLL_BACK)


def test_health_failure_reverts(rig: Rig) -> None:
    strict = dataclasses.replace(
        rig.profile, limits=dataclasses.replace(rig.profile.limits, latency_budget_ms=1e-9)
    )
    rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    rig.agent.stop()  # type: ignore[union-attr]
    rig.start(profile=strict)
    ev = rig.deploy(rig.bundle(2))
    assert states(ev)[-3:] == [S.SWITCHED, S.HEALTH_CHECK, S.REVERTED]
    assert ev[-1].reason is ReasonCode.HEALTH_FAILED
    assert "p95 latency" in ev[-1].detail
    assert ev[-1].active_bundle_sha256 == v1.sha256
    assert rig.agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]
    assert rig.predict().shape == (4, 10)
    active = json.loads((rig.tmp / "state" / "active.json").read_text())
    assert active["active"]["bundle_sha256"] == v1.sha256
    assert active["pending"] is None


class _Crash(BaseException):
    """Stands in for the process dying (BaseException: nothing catches it)."""


def test_crash_between_switch_and_commit_reverts_on_restart(rig: Rig) -> None:
    agent = rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    v2 = rig.bundle(2)
    emit = agent.installer.emit

    def dying_emit(event: StatusEvent) -> None:
        emit(event)
        if event.state is S.SWITCHED:
            raise _Crash()

    agent.installer.emit = dying_emit
    with pytest.raises(_Crash):
        agent.installer.deploy(v2.deploy_command(DEVICE))
    active = json.loads((rig.tmp / "state" / "active.json").read_text())
    assert active["active"]["bundle_sha256"] == v2.sha256
    assert active["pending"]["restore_active"]["bundle_sha256"] == v1.sha256
    rig.agent = None  # died: no clean stop

    restarted = rig.start()
    assert restarted.service.model is not None
    assert restarted.service.model.bundle_sha256 == v1.sha256
    events = [decode_message(p) for p in rig.transport.on("/status")]
    assert (events[-1].state, events[-1].reason) == (S.REVERTED, ReasonCode.HEALTH_FAILED)
    assert events[-1].bundle_sha256 == v2.sha256
    assert events[-1].active_bundle_sha256 == v1.sha256
    active = json.loads((rig.tmp / "state" / "active.json").read_text())
    assert active["active"]["bundle_sha256"] == v1.sha256
    assert active["pending"] is None


def test_rollback_goes_to_previous_bundle(rig: Rig) -> None:
    rig.start()
    v1, v2 = rig.bundle(1), rig.bundle(2)
    rig.deploy(v1)
    rig.deploy(v2)
    assert rig.agent.service.model.model_version == 2  # type: ignore[union-attr]
    ev = rig.send(RollbackCommand(device_id=DEVICE, reason="canary regressed"))
    assert states(ev) == [S.RECEIVED, S.ROLLED_BACK]
    assert ev[-1].bundle_sha256 == v1.sha256 == ev[-1].active_bundle_sha256
    assert rig.agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]
    # Named target: back to v2, which its slot still holds.
    ev = rig.send(RollbackCommand(device_id=DEVICE, target_bundle_sha256=v2.sha256))
    assert ev[-1].state is S.ROLLED_BACK
    assert rig.agent.service.model.bundle_sha256 == v2.sha256  # type: ignore[union-attr]
    # A bundle no slot holds any more.
    ev = rig.send(RollbackCommand(device_id=DEVICE, target_bundle_sha256="0" * 64))
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.NOTHING_TO_ROLL_BACK)


def test_rollback_on_a_fresh_device_has_nothing_to_roll_back(rig: Rig) -> None:
    rig.start()
    ev = rig.send(RollbackCommand(device_id=DEVICE))
    assert (ev[-1].state, ev[-1].reason) == (S.REJECTED, ReasonCode.NOTHING_TO_ROLL_BACK)


def test_malformed_commands_are_answered_and_counted(rig: Rig) -> None:
    agent = rig.start()
    rig.transport.deliver(CMD_TOPIC, b'{"kind": "deploy", "command_id": "c-42", "device_id": 7}')
    rig.transport.deliver(CMD_TOPIC, b"\xff not json")
    other = RollbackCommand(device_id="someone-else", command_id="c-43")
    rig.transport.deliver(CMD_TOPIC, encode_message(other))
    assert agent.process_commands() == 0
    events = [decode_message(p) for p in rig.transport.on("/status")]
    assert [(e.command_id, e.state, e.reason) for e in events] == [
        ("c-42", S.REJECTED, ReasonCode.BAD_COMMAND),
        ("c-43", S.REJECTED, ReasonCode.BAD_COMMAND),
    ]
    assert agent.counters["bad_commands"] == 3
    # Still working.
    ev = rig.deploy(rig.bundle(1))
    assert ev[-1].state is S.COMMITTED


def test_download_failure_is_failed_and_harmless(rig: Rig) -> None:
    rig.start()
    b = rig.bundle(1)
    ev = rig.deploy(b, bundle_url="test://missing.efb")
    assert (ev[-1].state, ev[-1].reason) == (S.FAILED, ReasonCode.DOWNLOAD_FAILED)
    assert list((rig.tmp / "state" / "downloads").iterdir()) == []
