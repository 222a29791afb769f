"""The trust root: which keys may sign bundles (release role) and roots (root role).

The format is TUF-shaped so rotation and thresholds fit without a break: a ``signed``
document (version, expiry, keys, roles with thresholds, revoked key ids) and the
``signatures`` over its canonical bytes. A root is trusted when a threshold of its own root
keys signed it; root N+1 is trusted only when a threshold of root N's root keys *and* a
threshold of its own signed it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.canonical import canonical_bytes
from protocol.errors import ExpiredError, TrustRootError
from protocol.limits import MAX_TRUST_ROOT_BYTES
from protocol.signing import Signature, SigningKey, public_key_from_hex, verify_threshold

__all__ = ["KeyEntry", "RoleSpec", "RootDocument", "SignedRoot", "TrustRoot"]


class KeyEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    keytype: Literal["ed25519"] = "ed25519"
    public: str = Field(pattern=r"^[0-9a-f]{64}$")


class RoleSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    keyids: tuple[str, ...]
    threshold: int = Field(ge=1)


class RootDocument(BaseModel):
    """The signed part of a trust root."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    type: Literal["edgefleet-root"] = "edgefleet-root"
    schema_version: int = 1
    version: int = Field(ge=1)
    expires_at: datetime
    keys: dict[str, KeyEntry]
    roles: dict[Literal["root", "release"], RoleSpec]
    revoked_keyids: tuple[str, ...] = ()

    def role_keys(self, role: Literal["root", "release"]) -> dict[str, Ed25519PublicKey]:
        spec = self.roles[role]
        revoked = set(self.revoked_keyids)
        return {
            kid: public_key_from_hex(self.keys[kid].public)
            for kid in spec.keyids
            if kid in self.keys and kid not in revoked
        }


class SignedRoot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    signed: RootDocument
    signatures: tuple[Signature, ...]


class TrustRoot:
    """A verified trust root. Build with `TrustRoot.load` / `TrustRoot.from_bytes`."""

    __slots__ = ("_raw", "document")

    def __init__(self, document: RootDocument, raw: bytes) -> None:
        self.document = document
        self._raw = raw

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def create(
        *,
        root_keys: list[SigningKey],
        release_keys: list[Ed25519PublicKey | SigningKey],
        expires_at: datetime,
        version: int = 1,
        root_threshold: int = 1,
        release_threshold: int = 1,
        revoked_keyids: tuple[str, ...] = (),
        extra_signers: tuple[SigningKey, ...] = (),
    ) -> TrustRoot:
        """Make and sign a root document (extra_signers: the previous root's keys)."""
        from protocol.signing import keyid_of, public_key_hex

        keys: dict[str, KeyEntry] = {}
        root_ids: list[str] = []
        release_ids: list[str] = []
        for rk in root_keys:
            keys[rk.keyid] = KeyEntry(public=public_key_hex(rk.public))
            root_ids.append(rk.keyid)
        for k in release_keys:
            pub = k.public if isinstance(k, SigningKey) else k
            kid = keyid_of(pub)
            keys[kid] = KeyEntry(public=public_key_hex(pub))
            release_ids.append(kid)
        doc = RootDocument(
            version=version,
            expires_at=expires_at,
            keys=keys,
            roles={
                "root": RoleSpec(keyids=tuple(root_ids), threshold=root_threshold),
                "release": RoleSpec(keyids=tuple(release_ids), threshold=release_threshold),
            },
            revoked_keyids=revoked_keyids,
        )
        signed = canonical_bytes(doc.model_dump(mode="json"))
        sigs = tuple(k.sign(signed) for k in (*root_keys, *extra_signers))
        raw = canonical_bytes(
            {"signed": doc.model_dump(mode="json"), "signatures": [s.model_dump() for s in sigs]}
        )
        return TrustRoot.from_bytes(raw)

    @staticmethod
    def _parse(raw: bytes) -> tuple[SignedRoot, bytes]:
        if len(raw) > MAX_TRUST_ROOT_BYTES:
            raise TrustRootError(
                f"trust root is {len(raw)} bytes; the limit is {MAX_TRUST_ROOT_BYTES}"
            )
        try:
            obj = json.loads(raw)
            signed_root = SignedRoot.model_validate(obj)
        except (ValueError, ValidationError) as exc:
            raise TrustRootError(f"trust root is not a valid root document: {exc}") from exc
        doc = signed_root.signed
        for role, spec in doc.roles.items():
            missing = [k for k in spec.keyids if k not in doc.keys]
            if missing:
                raise TrustRootError(f"role {role!r} names unknown key ids {missing}")
        if set(doc.roles) != {"root", "release"}:
            raise TrustRootError("trust root must define the roles 'root' and 'release'")
        return signed_root, canonical_bytes(obj["signed"])

    @staticmethod
    def from_bytes(raw: bytes) -> TrustRoot:
        """Parse a root and check it is signed by a threshold of its own root keys."""
        signed_root, signed_bytes = TrustRoot._parse(raw)
        doc = signed_root.signed
        verify_threshold(
            signed_bytes,
            signed_root.signatures,
            doc.role_keys("root"),
            doc.roles["root"].threshold,
            what=f"trust root version {doc.version}",
        )
        return TrustRoot(doc, raw)

    @staticmethod
    def load(path: str | bytes | object) -> TrustRoot:
        """Read and verify a trust-root file."""
        from pathlib import Path

        p = Path(str(path))
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise TrustRootError(
                f"trust root {p} does not exist; create one with `edgefleet keys init`"
            ) from None
        except OSError as exc:
            raise TrustRootError(f"cannot read trust root {p}: {exc.strerror}") from exc
        try:
            return TrustRoot.from_bytes(raw)
        except TrustRootError as exc:
            raise TrustRootError(f"{p}: {exc}") from exc

    # -- use ------------------------------------------------------------------------------
    @property
    def raw(self) -> bytes:
        return self._raw

    @property
    def version(self) -> int:
        return self.document.version

    def release_keys(self) -> dict[str, Ed25519PublicKey]:
        return self.document.role_keys("release")

    @property
    def release_threshold(self) -> int:
        return self.document.roles["release"].threshold

    def check_not_expired(self, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        if self.document.expires_at <= now:
            raise ExpiredError(
                f"trust root version {self.version} expired at "
                f"{self.document.expires_at.isoformat()}; install a newer root"
            )

    def verify_successor(self, raw: bytes) -> TrustRoot:
        """Accept root N+1 only if a threshold of N's root keys and of its own signed it."""
        signed_root, signed_bytes = TrustRoot._parse(raw)
        new = signed_root.signed
        if new.version != self.version + 1:
            raise TrustRootError(
                f"new trust root has version {new.version}; expected {self.version + 1}"
            )
        verify_threshold(
            signed_bytes,
            signed_root.signatures,
            self.document.role_keys("root"),
            self.document.roles["root"].threshold,
            what=f"trust root version {new.version} (by the keys of version {self.version})",
        )
        verify_threshold(
            signed_bytes,
            signed_root.signatures,
            new.role_keys("root"),
            new.roles["root"].threshold,
            what=f"trust root version {new.version} (by its own keys)",
        )
        return TrustRoot(new, raw)
