"""Bundles and trust: every tampering is caught, with a specific error, before use."""

from __future__ import annotations

import hashlib
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from protocol.bundle import BundleReader, sign_manifest, write_bundle
from protocol.errors import (
    BundleFormatError,
    BundleIntegrityError,
    ExpiredError,
    KeyFileError,
    SignatureError,
    TrustRootError,
    WrongTargetError,
)
from protocol.manifest import ArtifactInfo, BundleManifest, FileEntry, ModelInfo, TensorSpec
from protocol.signing import SigningKey, generate_signing_key, load_signing_key, save_signing_key
from protocol.trust import TrustRoot

NOW = datetime(2026, 12, 1, tzinfo=UTC)
MODEL = b"\x08\x07fake-onnx-model-bytes" * 10


def _manifest(release: SigningKey, **kw: object) -> BundleManifest:
    base: dict[str, object] = dict(
        model=ModelInfo(name="digits", version=3),
        profile="x86-cpu",
        created_at=NOW,
        expires_at=NOW + timedelta(days=30),
        files=(
            FileEntry(
                path="model/model.onnx",
                sha256=hashlib.sha256(MODEL).hexdigest(),
                size=len(MODEL),
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
    base.update(kw)
    return BundleManifest(**base)  # type: ignore[arg-type]


@pytest.fixture
def keys() -> tuple[SigningKey, SigningKey, TrustRoot]:
    root, release = generate_signing_key(), generate_signing_key()
    trust = TrustRoot.create(
        root_keys=[root], release_keys=[release], expires_at=NOW + timedelta(days=365)
    )
    return root, release, trust


def _write(tmp_path: Path, m: BundleManifest, signers: list[SigningKey], name: str = "b") -> Path:
    out = tmp_path / f"{name}.efb"
    write_bundle(out, m, sign_manifest(m, signers), {"model/model.onnx": MODEL})
    return out


def test_good_bundle_verifies_and_extracts(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, release, trust = keys
    path = _write(tmp_path, _manifest(release), [release])
    v = BundleReader(path).verify(trust, now=NOW, profile="x86-cpu", extract_to=tmp_path / "slot")
    assert v.manifest.model.version == 3
    assert (tmp_path / "slot/model/model.onnx").read_bytes() == MODEL
    assert v.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundles_are_reproducible(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, release, _ = keys
    a = _write(tmp_path, _manifest(release), [release], "a")
    b = _write(tmp_path, _manifest(release), [release], "b")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:  # a plain tar that standard tools can list
        assert tar.getnames() == ["manifest.json", "signatures.json", "model/model.onnx"]


def test_every_single_byte_change_is_caught(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, release, trust = keys
    path = _write(tmp_path, _manifest(release), [release])
    data = path.read_bytes()
    # Flip one byte in each region that matters: manifest, signatures, model payload.
    for needle in (b'"digits"', b'"sig"', b"fake-onnx"):
        pos = data.find(needle) + 2
        bad = bytearray(data)
        bad[pos] ^= 0x01
        p = tmp_path / "tampered.efb"
        p.write_bytes(bytes(bad))
        with pytest.raises((SignatureError, BundleIntegrityError, BundleFormatError)):
            BundleReader(p).verify(trust, now=NOW, extract_to=tmp_path / "x")
    assert not (tmp_path / "x/model/model.onnx").exists()


def test_unknown_signer_is_refused(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, release, trust = keys
    mallory = generate_signing_key()
    path = _write(tmp_path, _manifest(release), [mallory])
    with pytest.raises(SignatureError, match="0 valid signature"):
        BundleReader(path).verify(trust, now=NOW)


def test_expired_wrong_profile_and_selectors(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, release, trust = keys
    path = _write(tmp_path, _manifest(release), [release])
    with pytest.raises(ExpiredError):
        BundleReader(path).verify(trust, now=NOW + timedelta(days=31))
    with pytest.raises(WrongTargetError, match="raspberry-pi-5"):
        BundleReader(path).verify(trust, now=NOW, profile="raspberry-pi-5")
    sel = _write(tmp_path, _manifest(release, device_selectors=("cam-7", "tag:lab")), [release])
    BundleReader(sel).verify(trust, now=NOW, device_id="cam-7")
    BundleReader(sel).verify(trust, now=NOW, device_id="cam-9", device_tags=["lab"])
    with pytest.raises(WrongTargetError):
        BundleReader(sel).verify(trust, now=NOW, device_id="cam-9")


def test_truncated_and_foreign_files(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, release, trust = keys
    path = _write(tmp_path, _manifest(release), [release])
    cut = tmp_path / "cut.efb"
    cut.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(BundleFormatError):
        BundleReader(cut).verify(trust, now=NOW)
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleFormatError, match="not a bundle"):
        BundleReader(junk)
    with pytest.raises(BundleFormatError, match="does not exist"):
        BundleReader(tmp_path / "missing.efb")


def test_extra_member_is_refused(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, release, trust = keys
    path = _write(tmp_path, _manifest(release), [release])
    with tarfile.open(path, "a") as tar:
        extra = tmp_path / "evil.sh"
        extra.write_text("rm -rf /")
        tar.add(extra, arcname="evil.sh")
    with pytest.raises(BundleIntegrityError, match="not listed"):
        BundleReader(path).verify(trust, now=NOW, extract_to=tmp_path / "slot")
    assert not (tmp_path / "slot/evil.sh").exists()


def test_unsafe_paths_rejected() -> None:
    for bad in ("../etc/passwd", "/abs", "a//b", "manifest.json"):
        with pytest.raises(ValueError):
            FileEntry(path=bad, sha256="0" * 64, size=1, role="other")


def test_threshold_and_revocation(keys) -> None:  # type: ignore[no-untyped-def]
    root, release, _ = keys
    r2 = generate_signing_key()
    two = TrustRoot.create(
        root_keys=[root],
        release_keys=[release, r2],
        release_threshold=2,
        expires_at=NOW + timedelta(days=10),
    )
    from protocol.bundle import verify_manifest
    from protocol.manifest import manifest_bytes

    m = _manifest(release)
    raw = manifest_bytes(m)
    import json

    one_sig = json.dumps([s.model_dump() for s in sign_manifest(m, [release])]).encode()
    both = json.dumps([s.model_dump() for s in sign_manifest(m, [release, r2])]).encode()
    twice = json.dumps([s.model_dump() for s in sign_manifest(m, [release, release])]).encode()
    with pytest.raises(SignatureError, match="2 required"):
        verify_manifest(raw, one_sig, two, now=NOW)
    with pytest.raises(SignatureError):  # the same key twice counts once
        verify_manifest(raw, twice, two, now=NOW)
    verify_manifest(raw, both, two, now=NOW)
    revoked = TrustRoot.create(
        root_keys=[root],
        release_keys=[release],
        revoked_keyids=(release.keyid,),
        expires_at=NOW + timedelta(days=10),
    )
    with pytest.raises(SignatureError):
        verify_manifest(raw, one_sig, revoked, now=NOW)


def test_root_rotation_chain(keys) -> None:  # type: ignore[no-untyped-def]
    root, release, trust = keys
    new_root = generate_signing_key()
    v2 = TrustRoot.create(
        root_keys=[new_root],
        release_keys=[release],
        version=2,
        expires_at=NOW + timedelta(days=400),
        extra_signers=(root,),
    )
    assert trust.verify_successor(v2.raw).version == 2
    # Signed only by the new key: not accepted as the successor.
    rogue = TrustRoot.create(
        root_keys=[new_root], release_keys=[release], version=2, expires_at=NOW
    )
    with pytest.raises(SignatureError):
        trust.verify_successor(rogue.raw)
    with pytest.raises(TrustRootError, match="expected 2"):
        trust.verify_successor(trust.raw)
    with pytest.raises(TrustRootError):
        TrustRoot.from_bytes(b"{not json")


def test_key_files(tmp_path: Path) -> None:
    k = generate_signing_key()
    save_signing_key(k, tmp_path / "k.key", b"pw")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert load_signing_key(tmp_path / "k.key", b"pw").keyid == k.keyid
    with pytest.raises(KeyFileError, match="passphrase"):
        load_signing_key(tmp_path / "k.key")
    with pytest.raises(KeyFileError, match="keys init"):
        load_signing_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="overwrite"):
        save_signing_key(k, tmp_path / "k.key")
    (tmp_path / "bad.key").write_text("hello")
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_signing_key(tmp_path / "bad.key")
