"""The trust root: which keys may sign bundles (release role) and roots (root role).

The format is TUF-shaped so rotation and thresholds fit without a break: a ``signed``
document (version, expiry, keys, roles with thresholds, revoked key ids) and the
``signatures`` over its canonical bytes. A root is trusted when a threshold of its own root
keys signed it; root N+1 is trusted only when a threshold of root N's root keys *and* a
threshold of its own signed it.

Rotation and revocation build successors (`TrustRoot.successor`); devices walk a chain of
successors (`TrustRoot.update_chain`) the way TUF clients update their root: one version at
a time, each signed by a threshold of the previous root's keys and of its own, and the last
one must not have expired.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.canonical import canonical_bytes
from protocol.errors import ExpiredError, TrustRootError
from protocol.limits import MAX_TRUST_ROOT_BYTES
from protocol.signing import (
    Signature,
    SigningKey,
    keyid_of,
    public_key_from_hex,
    public_key_hex,
    verify_threshold,
)

__all__ = [
    "MAX_ROOT_CHAIN",
    "KeyEntry",
    "RoleSpec",
    "RootDocument",
    "SignedRoot",
    "TrustRoot",
    "TrustRootExpiredError",
]

#: the most successors one update may walk (each is small; this bounds the work)
MAX_ROOT_CHAIN: Final = 64


class TrustRootExpiredError(ExpiredError):
    """The trust root itself expired (indefinite-freeze defence): install a newer root."""

    code = "trust_root_expired"


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
        return TrustRoot.from_bytes(TrustRoot._sign(doc, (*root_keys, *extra_signers)))

    @staticmethod
    def _sign(doc: RootDocument, signers: Sequence[SigningKey]) -> bytes:
        signed = canonical_bytes(doc.model_dump(mode="json"))
        unique = {k.keyid: k for k in signers}  # one signature per key
        sigs = [k.sign(signed).model_dump() for k in unique.values()]
        return canonical_bytes({"signed": doc.model_dump(mode="json"), "signatures": sigs})

    def successor(
        self,
        *,
        signers: Sequence[SigningKey],
        expires_at: datetime,
        add_release: Sequence[Ed25519PublicKey] = (),
        revoke: Sequence[str] = (),
        new_root_keys: Sequence[SigningKey] | None = None,
        root_threshold: int | None = None,
        release_threshold: int | None = None,
    ) -> TrustRoot:
        """Make root version N+1 and check it verifies as this root's successor.

        ``signers`` are this root's root keys (a threshold of them must be given);
        ``new_root_keys`` replaces the root role (its keys sign too: a rotation is signed
        by old AND new). ``revoke`` names release (or root) key ids that may never sign
        again; ``add_release`` adds release keys.
        """
        doc = self.document
        keys = dict(doc.keys)
        roles = {name: spec for name, spec in doc.roles.items()}
        revoked = list(doc.revoked_keyids)
        for kid in revoke:
            if kid not in keys:
                raise TrustRootError(f"cannot revoke {kid[:16]}...: no such key in the root")
            if kid not in revoked:
                revoked.append(kid)
        release_ids = list(roles["release"].keyids)
        for pub in add_release:
            kid = keyid_of(pub)
            if kid in revoked:
                raise TrustRootError(f"key {kid[:16]}... was revoked; make a new release key")
            keys[kid] = KeyEntry(public=public_key_hex(pub))
            if kid not in release_ids:
                release_ids.append(kid)
        root_signers = list(new_root_keys) if new_root_keys is not None else list(signers)
        root_ids = (
            [k.keyid for k in new_root_keys]
            if new_root_keys is not None
            else list(roles["root"].keyids)
        )
        for k in root_signers:
            keys[k.keyid] = KeyEntry(public=public_key_hex(k.public))
        if new_root_keys is not None:
            # old root keys stay listed (so `keys show` can say what they were) but revoked
            for kid in roles["root"].keyids:
                if kid not in root_ids and kid not in revoked:
                    revoked.append(kid)
        live_release = [k for k in release_ids if k not in revoked]
        rel_threshold = release_threshold or roles["release"].threshold
        if len(live_release) < rel_threshold:
            raise TrustRootError(
                f"the new root would have {len(live_release)} usable release key(s) but needs "
                f"{rel_threshold} to sign a bundle; add a release key first"
            )
        new_doc = RootDocument(
            version=doc.version + 1,
            expires_at=expires_at,
            keys=keys,
            roles={
                "root": RoleSpec(
                    keyids=tuple(root_ids),
                    threshold=root_threshold or roles["root"].threshold,
                ),
                "release": RoleSpec(keyids=tuple(release_ids), threshold=rel_threshold),
            },
            revoked_keyids=tuple(revoked),
        )
        raw = TrustRoot._sign(new_doc, (*signers, *root_signers))
        return self.verify_successor(raw)

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
        try:
            return signed_root, canonical_bytes(obj["signed"])
        except ValueError as exc:  # NaN / Infinity: no canonical form, so nothing to verify
            raise TrustRootError(f"trust root cannot be canonicalized: {exc}") from exc

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
            raise TrustRootExpiredError(
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

    def update_chain(self, raws: Sequence[bytes], *, now: datetime | None = None) -> TrustRoot:
        """Walk successors from this root (TUF's root update); return the newest trusted.

        ``raws`` are root documents in any order; versions at or below this one are
        skipped if identical to what we know of them, and versions must then follow one
        by one. The final root must not have expired. Nothing is returned half-way: any
        bad link fails the whole update, and the caller keeps its current root.
        """
        if len(raws) > MAX_ROOT_CHAIN:
            raise TrustRootError(f"{len(raws)} trust roots offered; at most {MAX_ROOT_CHAIN}")
        parsed: dict[int, bytes] = {}
        for raw in raws:
            signed_root, _ = TrustRoot._parse(raw)
            version = signed_root.signed.version
            if version in parsed and parsed[version] != raw:
                raise TrustRootError(f"two different trust roots claim version {version}")
            parsed[version] = raw
        if self.version in parsed and parsed[self.version] != self.raw:
            # a second root with our version number: someone holds root keys they should not
            raise TrustRootError(
                f"a trust root with the installed version {self.version} but different "
                "content was offered; refusing it (possible root key compromise)"
            )
        current = self
        for version in sorted(v for v in parsed if v > self.version):
            if version != current.version + 1:
                raise TrustRootError(
                    f"trust root chain jumps from version {current.version} to {version}; "
                    f"version {current.version + 1} is missing"
                )
            current = current.verify_successor(parsed[version])
        current.check_not_expired(now)
        return current
