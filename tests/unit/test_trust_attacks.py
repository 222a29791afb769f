"""TUF's attacks, one by one, against a real agent (real bundles, ONNX Runtime; fake seams).

Each refused bundle must end REJECTED with its own reason code, leave the running model
serving exactly what it served, and leave nothing half-installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from agent.testing import BuiltBundle, FakeTransport, FileFetcher, build_test_bundle
from hardware_profiles import load_profile
from protocol.bundle import sign_manifest, write_bundle
from protocol.messages import (
    InstallState,
    ReasonCode,
    RollbackCommand,
    StatusEvent,
    TrustRootCommand,
    decode_message,
    encode_message,
)
from protocol.signing import SigningKey, generate_signing_key
from protocol.trust import TrustRoot

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"
DEVICE = "attack-001"
CMD = f"edgefleet/v1/{DEVICE}/cmd"
S, R = InstallState, ReasonCode


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    with np.load(DIGITS / "heldout.npz") as npz:
        return npz["input"][:48]


class Device:
    """One agent on a fresh state dir, a trust root we control, bundles we build."""

    def __init__(self, tmp: Path, samples: np.ndarray, *, root_days: int = 365) -> None:
        self.tmp, self.samples = tmp, samples
        self.root_key, self.release = generate_signing_key(), generate_signing_key()
        self.trust = TrustRoot.create(
            root_keys=[self.root_key],
            release_keys=[self.release],
            expires_at=datetime.now(UTC) + timedelta(days=root_days),
        )
        (tmp / "root.json").write_bytes(self.trust.raw)
        self.fetcher = FileFetcher()
        self.transport = FakeTransport(auto_ack=True)
        cfg = AgentConfig(
            device_id=DEVICE,
            profile=load_profile("x86-cpu"),
            state_dir=tmp / "state",
            trust_root_path=tmp / "root.json",
            telemetry_window_s=5.0,
            health_inferences=3,
            health_timeout_s=0.0,
            download_max_bytes=64 * 1024 * 1024,
        )
        self.agent = Agent(cfg, transport=self.transport, fetcher=self.fetcher)
        self.agent.start(threads=False)

    def bundle(
        self, version: int, *, signer: SigningKey | None = None, **kw: object
    ) -> BuiltBundle:
        out = self.tmp / f"v{version}-{len(self.fetcher.files)}.efb"
        b = build_test_bundle(
            out,
            model_path=DIGITS / "model.onnx",
            samples=self.samples,
            signer=signer or self.release,
            version=version,
            **{"golden_count": 8, **kw},  # type: ignore[arg-type]
        )
        return self.serve(b)

    def serve(self, b: BuiltBundle) -> BuiltBundle:
        b = dataclasses.replace(b, url=f"test://{b.path.name}")
        self.fetcher.files[b.url] = b.path
        return b

    def send(self, payload: bytes) -> list[StatusEvent]:
        before = len(self.transport.on("/status"))
        self.transport.deliver(CMD, payload)
        self.agent.process_commands()
        return [decode_message(p) for p in self.transport.on("/status")[before:]]

    def deploy(self, b: BuiltBundle, **kw: object) -> StatusEvent:
        return self.send(encode_message(b.deploy_command(DEVICE, **kw)))[-1]

    @property
    def active(self) -> str | None:
        model = self.agent.service.model
        return model.bundle_sha256 if model else None

    def staging_empty(self) -> bool:
        # anything beside the two slots (the staging area) must be empty
        root = self.agent.state.slots.root
        return all(
            p.name in ("a", "b") or not any(p.iterdir()) for p in root.iterdir() if p.is_dir()
        )

    def refused(self, event: StatusEvent, reason: ReasonCode, before: str | None) -> None:
        assert (event.state, event.reason) == (S.REJECTED, reason), event
        assert self.active == before, "a refused bundle changed the running model"
        assert self.staging_empty(), "a refused bundle left files in staging"
        assert not list(self.agent.state.downloads.glob("*")), "download left behind"


@pytest.fixture
def device(tmp_path: Path, samples: np.ndarray) -> Device:
    d = Device(tmp_path, samples)
    yield d
    d.agent.stop()


def _committed(d: Device, b: BuiltBundle) -> None:
    ev = d.deploy(b)
    assert ev.state is S.COMMITTED, ev
    assert d.active == b.sha256


# -- arbitrary software ---------------------------------------------------------------------


def test_arbitrary_software_unknown_signer(device: Device) -> None:
    _committed(device, device.bundle(1))
    before = device.active
    evil = device.bundle(2, signer=generate_signing_key())
    device.refused(device.deploy(evil), R.BAD_SIGNATURE, before)


# -- rollback -------------------------------------------------------------------------------


def test_rollback_attack_refused_but_explicit_rollback_works(device: Device) -> None:
    v1 = device.bundle(1)
    _committed(device, v1)
    v2 = device.bundle(2)
    _committed(device, v2)
    device.refused(device.deploy(v1), R.OLD_VERSION, v2.sha256)  # lower
    same = device.bundle(2, device_selectors=(DEVICE,))  # same version, other bytes
    device.refused(device.deploy(same), R.OLD_VERSION, v2.sha256)
    # an operator's explicit rollback to a version this device has run is allowed
    events = device.send(encode_message(RollbackCommand(device_id=DEVICE, reason="incident")))
    assert events[-1].state is S.ROLLED_BACK and device.active == v1.sha256
    # ... but a rollback to a bundle it never ran is not
    v9 = device.bundle(9)
    events = device.send(
        encode_message(RollbackCommand(device_id=DEVICE, target_bundle_sha256=v9.sha256))
    )
    assert (events[-1].state, events[-1].reason) == (S.REJECTED, R.NOTHING_TO_ROLL_BACK)
    assert device.active == v1.sha256


# -- indefinite freeze ----------------------------------------------------------------------


def test_expired_bundle_refused(device: Device) -> None:
    _committed(device, device.bundle(1))
    b = device.bundle(2)
    now = datetime.now(UTC).replace(microsecond=0)
    stale = _resigned(
        device,
        b,
        created_at=now - timedelta(days=40),
        expires_at=now - timedelta(days=10),
    )
    device.refused(device.deploy(stale), R.EXPIRED, device.active)


def test_expired_trust_root_refuses_bundles(tmp_path: Path, samples: np.ndarray) -> None:
    d = Device(tmp_path, samples, root_days=365)
    try:
        _committed(d, d.bundle(1))
        # the device's clock passes the root's expiry: install a root that already expired
        expired = TrustRoot.create(
            root_keys=[d.root_key],
            release_keys=[d.release],
            version=2,
            expires_at=datetime.now(UTC) - timedelta(seconds=1),
            extra_signers=(d.root_key,),
        )
        d.agent.state.trust_path.write_bytes(expired.raw)  # as if time had passed
        before = d.active
        ev = d.deploy(d.bundle(2))
        d.refused(ev, R.EXPIRED, before)
        assert "trust root" in ev.detail
    finally:
        d.agent.stop()


# -- endless data ---------------------------------------------------------------------------


def test_endless_data_declared_size_and_oversized_member(device: Device) -> None:
    _committed(device, device.bundle(1))
    before = device.active
    huge = device.bundle(2)
    ev = device.deploy(huge, bundle_size=1 << 40)  # more than the device accepts
    device.refused(ev, R.TOO_LARGE, before)
    # a bundle whose file is longer than its manifest says (bytes appended to the member)
    b = device.bundle(3)
    padded = _rewrite_member(b.path, "golden/golden.npz", lambda data: data + b"\0" * 4096)
    ev = device.deploy(device.serve(_rebuilt(b, padded)))
    device.refused(ev, R.BAD_HASH, before)


# -- wrong software -------------------------------------------------------------------------


def test_wrong_software_profile_and_selectors(device: Device) -> None:
    _committed(device, device.bundle(1))
    before = device.active
    device.refused(device.deploy(device.bundle(2, profile="jetson-orin")), R.WRONG_TARGET, before)
    other = device.bundle(3, device_selectors=("someone-else", "tag:lab"))
    device.refused(device.deploy(other), R.WRONG_TARGET, before)


# -- mix and match --------------------------------------------------------------------------


def test_mix_and_match_file_from_another_bundle(device: Device) -> None:
    _committed(device, device.bundle(1))
    before = device.active
    a = device.bundle(2)
    b = device.bundle(3, golden_count=4)  # a different, validly signed golden file
    other_golden = _member(b.path, "golden/golden.npz")
    mixed = _rewrite_member(a.path, "golden/golden.npz", lambda _data: other_golden)
    device.refused(device.deploy(device.serve(_rebuilt(a, mixed))), R.BAD_HASH, before)


# -- key compromise: trust-root rotation delivered on the command channel -------------------


def test_revoked_release_key_after_trust_root_update(device: Device) -> None:
    _committed(device, device.bundle(1))
    new_release = generate_signing_key()
    v2 = device.trust.successor(
        signers=[device.root_key],
        expires_at=datetime.now(UTC) + timedelta(days=365),
        add_release=[new_release.public],
    )
    v3 = v2.successor(
        signers=[device.root_key],
        expires_at=datetime.now(UTC) + timedelta(days=365),
        revoke=[device.release.keyid],
    )
    cmd = TrustRootCommand(device_id=DEVICE, roots=(v2.raw.decode(), v3.raw.decode()))
    ev = device.send(encode_message(cmd))[-1]
    assert (ev.state, ev.reason) == (S.COMMITTED, R.OK) and "version 3" in ev.detail
    assert device.agent.state.load_trust().version == 3
    before = device.active
    # the old (compromised) release key signs nothing any more ...
    device.refused(device.deploy(device.bundle(2)), R.BAD_SIGNATURE, before)
    # ... and the new one works
    _committed(device, device.bundle(3, signer=new_release))


def test_forged_trust_roots_are_refused_and_the_old_root_stays(device: Device) -> None:
    installed = device.agent.state.trust_path.read_bytes()
    later = datetime.now(UTC) + timedelta(days=365)
    attacker = generate_signing_key()
    forged = TrustRoot.create(
        root_keys=[attacker], release_keys=[attacker], version=2, expires_at=later
    )
    ev = device.send(
        encode_message(TrustRootCommand(device_id=DEVICE, roots=(forged.raw.decode(),)))
    )[-1]
    assert (ev.state, ev.reason) == (S.REJECTED, R.BAD_SIGNATURE), ev
    v2 = device.trust.successor(signers=[device.root_key], expires_at=later)
    v3 = v2.successor(signers=[device.root_key], expires_at=later)
    gap = TrustRootCommand(device_id=DEVICE, roots=(v3.raw.decode(),))  # skips version 2
    ev = device.send(encode_message(gap))[-1]
    assert (ev.state, ev.reason) == (S.REJECTED, R.BAD_COMMAND) and "missing" in ev.detail
    garbage = TrustRootCommand(device_id=DEVICE, roots=("{not json",))
    assert device.send(encode_message(garbage))[-1].state is S.REJECTED
    assert device.agent.state.trust_path.read_bytes() == installed


# -- helpers: rewrite one tar member, keep manifest and signatures --------------------------


def _member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def _rewrite_member(path: Path, name: str, change: object) -> bytes:
    out = io.BytesIO()
    with (
        tarfile.open(path) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst,
    ):
        for member in src.getmembers():
            f = src.extractfile(member)
            assert f is not None
            data = f.read()
            if member.name == name:
                data = change(data)  # type: ignore[operator]
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out.getvalue()


def _resigned(d: Device, b: BuiltBundle, **changes: object) -> BuiltBundle:
    """The same files under a changed manifest, properly signed by the release key."""
    manifest = b.manifest.model_copy(update=changes)
    files = {f.path: _member(b.path, f.path) for f in manifest.files}
    out = b.path.with_name(b.path.stem + "-resigned.efb")
    sha = write_bundle(out, manifest, sign_manifest(manifest, [d.release]), files)
    built = dataclasses.replace(
        b, path=out, sha256=sha, size=out.stat().st_size, manifest=manifest, url=""
    )
    return d.serve(built)


def _rebuilt(b: BuiltBundle, raw: bytes) -> BuiltBundle:
    path = b.path.with_name(b.path.stem + "-evil.efb")
    path.write_bytes(raw)
    return dataclasses.replace(
        b, path=path, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), url=""
    )
