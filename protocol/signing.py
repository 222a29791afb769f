"""Ed25519 keys, key ids and threshold signature checks (pure, no I/O except key files)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import KeyFileError, SignatureError
from protocol.limits import MAX_SIGNATURES

__all__ = [
    "Signature",
    "SigningKey",
    "generate_signing_key",
    "keyid_of",
    "load_signing_key",
    "public_key_from_hex",
    "public_key_hex",
    "save_signing_key",
    "verify_threshold",
]


class Signature(BaseModel):
    """One signature over some canonical bytes, by the key with this id."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    keyid: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    sig: str = Field(min_length=128, max_length=128, pattern=r"^[0-9a-f]{128}$")


def public_key_hex(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SignatureError(f"public key {text[:16]!r}... is not 32 bytes of hex: {exc}") from exc


def keyid_of(key: Ed25519PublicKey) -> str:
    """A key's id: sha256 of its raw 32 public bytes, hex."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private Ed25519 key and its id."""

    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def keyid(self) -> str:
        return keyid_of(self.public)

    def sign(self, data: bytes) -> Signature:
        return Signature(keyid=self.keyid, sig=self.private.sign(data).hex())


def generate_signing_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def save_signing_key(key: SigningKey, path: Path, passphrase: bytes | None = None) -> None:
    """Write a PKCS#8 PEM private key with mode 0600, atomically; refuse to overwrite."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a private key")
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Read a private key file, with errors that say which file and what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist; create one with `edgefleet keys init`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        raise KeyFileError(f"key file {path}: {exc} (pass the passphrase)") from exc
    except ValueError as exc:
        raise KeyFileError(f"key file {path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return SigningKey(key)


def verify_threshold(
    data: bytes,
    signatures: Iterable[Signature],
    keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
    *,
    what: str,
) -> frozenset[str]:
    """Check that at least `threshold` distinct trusted keys signed `data`.

    `keys` holds only the keys trusted for this role (revoked ones already removed).
    Returns the ids of the keys whose signatures verified.
    """
    if threshold < 1:
        raise SignatureError(f"{what}: threshold must be at least 1")
    sigs = list(signatures)
    if len(sigs) > MAX_SIGNATURES:
        raise SignatureError(f"{what}: {len(sigs)} signatures; at most {MAX_SIGNATURES}")
    good: set[str] = set()
    for s in sigs:
        key = keys.get(s.keyid)
        if key is None or s.keyid in good:
            continue
        try:
            key.verify(bytes.fromhex(s.sig), data)
        except InvalidSignature:
            continue
        good.add(s.keyid)
    if len(good) < threshold:
        raise SignatureError(
            f"{what}: {len(good)} valid signature(s) from trusted keys, {threshold} required "
            f"(signed by {sorted(s.keyid[:12] for s in sigs) or 'nobody'}; "
            f"trusted {sorted(k[:12] for k in keys) or 'none'})"
        )
    return frozenset(good)
