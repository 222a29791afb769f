"""Trust root rotation and revocation (TUF's key-compromise defences), and `edgefleet keys`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.keys_cli import app as keys_app
from edgefleet.keys_cli import init_keys
from protocol.bundle import sign_manifest, verify_manifest
from protocol.errors import ExpiredError, SignatureError, TrustRootError
from protocol.manifest import manifest_bytes
from protocol.signing import SigningKey, generate_signing_key, load_signing_key
from protocol.trust import MAX_ROOT_CHAIN, TrustRoot, TrustRootExpiredError
from tests.unit.test_protocol_bundle import _manifest

NOW = datetime(2026, 12, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=300)


def _root(
    release: list[SigningKey], root: list[SigningKey] | None = None, **kw: object
) -> tuple[TrustRoot, list[SigningKey]]:
    root = root or [generate_signing_key()]
    trust = TrustRoot.create(
        root_keys=root, release_keys=release, expires_at=NOW + timedelta(days=365), **kw
    )  # type: ignore[arg-type]
    return trust, root


def _sigs(m: object, keys: list[SigningKey]) -> bytes:
    return json.dumps([s.model_dump() for s in sign_manifest(m, keys)]).encode()  # type: ignore[arg-type]


# -- arbitrary software: m-of-n release signatures ------------------------------------------


def test_threshold_m_of_n_release_signatures() -> None:
    r1, r2, r3 = (generate_signing_key() for _ in range(3))
    trust, _ = _root([r1, r2, r3], release_threshold=2)
    m = _manifest(r1)
    raw = manifest_bytes(m)
    outsider = generate_signing_key()
    with pytest.raises(SignatureError, match=r"1 valid signature.*2 required") as one:
        verify_manifest(raw, _sigs(m, [r1]), trust, now=NOW)
    assert one.value.code == "bad_signature"
    with pytest.raises(SignatureError):  # an outsider's signature does not count
        verify_manifest(raw, _sigs(m, [r1, outsider]), trust, now=NOW)
    with pytest.raises(SignatureError):  # nor does the same key twice
        verify_manifest(raw, _sigs(m, [r2, r2]), trust, now=NOW)
    assert verify_manifest(raw, _sigs(m, [r3, r1]), trust, now=NOW).model.version == 3
    # a signature over other bytes (the manifest changed after signing) is worthless
    other = manifest_bytes(_manifest(r1, profile="jetson-orin"))
    with pytest.raises(SignatureError):
        verify_manifest(other, _sigs(m, [r1, r2]), trust, now=NOW)


# -- indefinite freeze: the trust root itself expires ---------------------------------------


def test_expired_trust_root_refuses_every_bundle() -> None:
    release = generate_signing_key()
    trust, _ = _root([release])
    m = _manifest(release)
    after = trust.document.expires_at + timedelta(seconds=1)
    with pytest.raises(TrustRootExpiredError, match="install a newer root") as exc:
        verify_manifest(manifest_bytes(m), _sigs(m, [release]), trust, now=after)
    assert exc.value.code == "trust_root_expired"
    assert isinstance(exc.value, ExpiredError)  # agents report it as bundle_expired


# -- key compromise: rotation, revocation, the chain ----------------------------------------


def test_add_and_revoke_release_keys() -> None:
    old_release, new_release = generate_signing_key(), generate_signing_key()
    v1, root = _root([old_release])
    v2 = v1.successor(signers=root, expires_at=LATER, add_release=[new_release.public])
    assert v2.version == 2 and set(v2.release_keys()) == {old_release.keyid, new_release.keyid}
    v3 = v2.successor(signers=root, expires_at=LATER, revoke=[old_release.keyid])
    assert set(v3.release_keys()) == {new_release.keyid}
    m = _manifest(old_release)
    with pytest.raises(SignatureError):  # the revoked key signs nothing any more
        verify_manifest(manifest_bytes(m), _sigs(m, [old_release]), v3, now=NOW)
    verify_manifest(manifest_bytes(m), _sigs(m, [new_release]), v3, now=NOW)
    with pytest.raises(TrustRootError, match="revoked"):  # and cannot be added back
        v3.successor(signers=root, expires_at=LATER, add_release=[old_release.public])
    with pytest.raises(TrustRootError, match="usable release key"):  # no lock-out by mistake
        v3.successor(signers=root, expires_at=LATER, revoke=[new_release.keyid])


def test_rotated_root_is_signed_by_old_and_new_keys() -> None:
    release = generate_signing_key()
    v1, old_root = _root([release])
    fresh = generate_signing_key()
    v2 = v1.successor(signers=old_root, expires_at=LATER, new_root_keys=[fresh])
    assert v2.document.roles["root"].keyids == (fresh.keyid,)
    assert old_root[0].keyid in v2.document.revoked_keyids
    signers = {s["keyid"] for s in json.loads(v2.raw)["signatures"]}
    assert signers == {old_root[0].keyid, fresh.keyid}
    # v3 must now come from the new root key; the old one alone is not enough
    with pytest.raises(SignatureError):
        v2.successor(signers=old_root, expires_at=LATER)
    assert v2.successor(signers=[fresh], expires_at=LATER).version == 3


def test_successor_needs_a_threshold_of_old_and_new_root_keys() -> None:
    release = generate_signing_key()
    a, b, c = (generate_signing_key() for _ in range(3))
    v1, _ = _root([release], root=[a, b, c], root_threshold=2)
    with pytest.raises(SignatureError, match="by the keys of version 1"):
        v1.successor(signers=[a], expires_at=LATER)
    v2 = v1.successor(signers=[a, c], expires_at=LATER)
    # an attacker holding one old root key and keys of their own cannot rotate
    evil = generate_signing_key()
    with pytest.raises(SignatureError):
        v1.successor(signers=[a], new_root_keys=[evil], expires_at=LATER)
    assert v2.version == 2


def test_update_chain_walks_one_version_at_a_time() -> None:
    release = generate_signing_key()
    v1, root = _root([release])
    chain = [v1]
    for _ in range(3):
        chain.append(chain[-1].successor(signers=root, expires_at=LATER))
    raws = [t.raw for t in chain]
    assert v1.update_chain(raws[1:], now=NOW).version == 4
    assert v1.update_chain(list(reversed(raws)), now=NOW).version == 4  # order does not matter
    assert chain[2].update_chain(raws, now=NOW).version == 4  # older ones are skipped
    with pytest.raises(TrustRootError, match="version 2 is missing"):  # fast-forward refused
        v1.update_chain([raws[2], raws[3]], now=NOW)
    # a different root claiming an existing version: a fork, refused as a whole
    fork = chain[1].successor(signers=root, expires_at=LATER + timedelta(days=1))
    with pytest.raises(TrustRootError, match="two different trust roots claim version 3"):
        v1.update_chain([raws[1], raws[2], fork.raw], now=NOW)
    with pytest.raises(TrustRootError, match="installed version"):
        chain[2].update_chain([fork.raw], now=NOW)
    # the newest root must not have expired (freeze attack on the root itself)
    with pytest.raises(TrustRootExpiredError):
        v1.update_chain(raws[1:], now=LATER + timedelta(days=1))
    with pytest.raises(TrustRootError, match="at most"):
        v1.update_chain([raws[1]] * (MAX_ROOT_CHAIN + 1), now=NOW)


def test_root_signed_by_strangers_is_refused() -> None:
    release = generate_signing_key()
    v1, _ = _root([release])
    rogue_v2 = TrustRoot.create(
        root_keys=[generate_signing_key()],
        release_keys=[generate_signing_key()],
        version=2,
        expires_at=LATER,
    )
    with pytest.raises(SignatureError, match="by the keys of version 1"):
        v1.update_chain([rogue_v2.raw], now=NOW)
    with pytest.raises(TrustRootError):
        v1.update_chain([b"{not json"], now=NOW)
    # JSON that parses but has no canonical form (found by benchmarks/fuzz.py)
    doc = json.loads(v1.raw)
    doc["signed"]["note"] = float("nan")
    with pytest.raises(TrustRootError, match="canonical"):
        TrustRoot.from_bytes(json.dumps(doc).encode())


# -- the release engineer's commands --------------------------------------------------------


def test_keys_cli_add_revoke_rotate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "correct horse")
    keys = tmp_path / "keys"
    init_keys(keys)
    runner = CliRunner()
    v1 = TrustRoot.load(keys / "trust-root.json")
    first_release = next(iter(v1.release_keys()))

    r = runner.invoke(keys_app, ["add", "--dir", str(keys), "--key", str(keys / "r2.key")])
    assert r.exit_code == 0, r.output
    v2 = TrustRoot.load(keys / "trust-root.json")
    r2 = load_signing_key(keys / "r2.key", b"correct horse")  # encrypted like the others
    assert v2.version == 2 and r2.keyid in v2.release_keys()
    assert v1.verify_successor(v2.raw).version == 2

    r = runner.invoke(keys_app, ["revoke", first_release[:12], "--dir", str(keys)])
    assert r.exit_code == 0, r.output
    v3 = TrustRoot.load(keys / "trust-root.json")
    assert set(v3.release_keys()) == {r2.keyid}

    old_root = load_signing_key(keys / "root.key", b"correct horse")
    r = runner.invoke(keys_app, ["rotate-root", "--dir", str(keys)])
    assert r.exit_code == 0, r.output
    v4 = TrustRoot.load(keys / "trust-root.json")
    new_root = load_signing_key(keys / "root.key", b"correct horse")
    assert new_root.keyid != old_root.keyid
    assert v4.document.roles["root"].keyids == (new_root.keyid,)
    assert (keys / "root-v3.key").exists()  # the old root key is kept, renamed

    # the whole chain is kept for the fleet and devices, and walks from version 1
    chain = sorted((keys / "roots").glob("*.root.json"))
    assert len(chain) == 4
    assert v1.update_chain([p.read_bytes() for p in chain]).version == 4

    r = runner.invoke(keys_app, ["revoke", "abc", "--dir", str(keys)])
    assert r.exit_code == 2 and "8+ hex digits" in r.output
    r = runner.invoke(keys_app, ["show", "--trust", str(keys / "trust-root.json")])
    assert "(revoked)" in r.output

    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "wrong")
    r = runner.invoke(keys_app, ["add", "--dir", str(keys)])
    assert r.exit_code == 2 and "key file" in r.output
