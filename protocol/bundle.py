"""The bundle container: a plain, deterministic tar.

Layout, in this order: ``manifest.json`` (canonical JSON, the signed bytes),
``signatures.json`` (a list of {keyid, sig}), then every file the manifest lists, in the
manifest's order. Standard tools can list and unpack it; our reader trusts nothing in it
until the signatures verify, and then checks each file's size and sha256 while streaming.

`verify_manifest` is pure (bytes in, manifest out); `BundleReader` is the thin file shell.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pydantic import TypeAdapter, ValidationError

from protocol.errors import (
    BundleFormatError,
    BundleIntegrityError,
    ExpiredError,
    SignatureError,
    WrongTargetError,
)
from protocol.limits import MAX_BUNDLE_BYTES, MAX_BUNDLE_FILES, MAX_MANIFEST_BYTES, MAX_SIGNATURES
from protocol.manifest import BundleManifest, manifest_bytes, parse_manifest
from protocol.signing import Signature, SigningKey, verify_threshold
from protocol.trust import TrustRoot

__all__ = [
    "BundleReader",
    "VerifiedBundle",
    "file_sha256",
    "sign_manifest",
    "verify_manifest",
    "write_bundle",
]

_SIGS = TypeAdapter(list[Signature])
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sign_manifest(manifest: BundleManifest, keys: Sequence[SigningKey]) -> list[Signature]:
    data = manifest_bytes(manifest)
    return [k.sign(data) for k in keys]


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = mtime
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def write_bundle(
    out: Path,
    manifest: BundleManifest,
    signatures: Sequence[Signature],
    files: Mapping[str, bytes | Path],
) -> str:
    """Write a bundle atomically (temp file, fsync, rename) and return its sha256.

    Byte-for-byte reproducible: fixed member order, owner, mode and mtime (the manifest's
    created_at), no compression timestamps.
    """
    out = Path(out)
    listed = [f.path for f in manifest.files]
    if sorted(listed) != sorted(files):
        raise BundleFormatError(
            f"files given {sorted(files)} do not match the manifest's {sorted(listed)}"
        )
    mtime = int(manifest.created_at.timestamp())
    mbytes = manifest_bytes(manifest)
    sbytes = json.dumps([s.model_dump() for s in signatures], sort_keys=True).encode()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(_tarinfo("manifest.json", len(mbytes), mtime), io.BytesIO(mbytes))
                tar.addfile(_tarinfo("signatures.json", len(sbytes), mtime), io.BytesIO(sbytes))
                for entry in manifest.files:
                    src = files[entry.path]
                    if isinstance(src, bytes):
                        data: IO[bytes] = io.BytesIO(src)
                        size = len(src)
                    else:
                        data = open(src, "rb")  # noqa: SIM115 - closed below
                        size = Path(src).stat().st_size
                    try:
                        if size != entry.size:
                            raise BundleFormatError(
                                f"{entry.path} is {size} bytes; the manifest says {entry.size}"
                            )
                        tar.addfile(_tarinfo(entry.path, size, mtime), data)
                    finally:
                        data.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(out)


def verify_manifest(
    manifest_raw: bytes,
    signatures_raw: bytes,
    trust: TrustRoot,
    *,
    now: datetime | None = None,
    profile: str | None = None,
    device_id: str | None = None,
    device_tags: Sequence[str] = (),
) -> BundleManifest:
    """Check signatures (threshold of release keys), expiry and target; return the manifest.

    Signatures are checked over the exact stored bytes before anything in them is parsed
    or believed.
    """
    now = now or datetime.now(UTC)
    if len(manifest_raw) > MAX_MANIFEST_BYTES:
        raise BundleFormatError(
            f"manifest is {len(manifest_raw)} bytes; the limit is {MAX_MANIFEST_BYTES}"
        )
    if len(signatures_raw) > MAX_SIGNATURES * 256:
        raise BundleFormatError("signatures.json is too large")
    try:
        sigs = _SIGS.validate_json(signatures_raw)
    except ValidationError as exc:
        raise SignatureError(f"signatures.json is malformed: {exc.errors()[0]['msg']}") from exc
    trust.check_not_expired(now)
    verify_threshold(
        manifest_raw,
        sigs,
        trust.release_keys(),
        trust.release_threshold,
        what="bundle manifest",
    )
    manifest = parse_manifest(manifest_raw)
    if manifest.expires_at <= now:
        raise ExpiredError(
            f"bundle {manifest.model.name} v{manifest.model.version} expired at "
            f"{manifest.expires_at.isoformat()}"
        )
    if profile is not None and manifest.profile != profile:
        raise WrongTargetError(
            f"bundle is for profile {manifest.profile!r}; this device is {profile!r}"
        )
    if device_id is not None and manifest.device_selectors:
        mine = {device_id, *(f"tag:{t}" for t in device_tags)}
        if not mine.intersection(manifest.device_selectors):
            raise WrongTargetError(
                f"bundle is limited to {list(manifest.device_selectors)[:5]}; "
                f"device {device_id!r} is not among them"
            )
    return manifest


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    manifest: BundleManifest
    manifest_raw: bytes
    sha256: str
    size: int


class BundleReader:
    """Reads a bundle file with hard limits; nothing is believed before it is verified."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BUNDLE_BYTES) -> None:
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except FileNotFoundError:
            raise BundleFormatError(f"bundle {self.path} does not exist") from None
        if self.size > max_bytes:
            raise BundleFormatError(f"bundle is {self.size} bytes; the limit is {max_bytes}")
        self._manifest_raw, self._signatures_raw = self._read_head()

    def _open(self) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, mode="r:")
        except (tarfile.TarError, OSError) as exc:
            raise BundleFormatError(f"{self.path} is not a bundle (not a tar file): {exc}") from exc

    def _read_head(self) -> tuple[bytes, bytes]:
        with self._open() as tar:
            try:
                first = tar.next()
                second = tar.next()
            except tarfile.TarError as exc:
                raise BundleFormatError(f"{self.path}: corrupt tar header: {exc}") from exc
            if first is None or first.name != "manifest.json" or not first.isreg():
                raise BundleFormatError(f"{self.path}: first member must be manifest.json")
            if second is None or second.name != "signatures.json" or not second.isreg():
                raise BundleFormatError(f"{self.path}: second member must be signatures.json")
            if first.size > MAX_MANIFEST_BYTES:
                raise BundleFormatError("manifest.json is larger than the limit")
            if second.size > MAX_SIGNATURES * 256:
                raise BundleFormatError("signatures.json is larger than the limit")
            m = tar.extractfile(first)
            s = tar.extractfile(second)
            assert m is not None and s is not None
            try:
                mraw, sraw = m.read(), s.read()
            except tarfile.TarError as exc:
                raise BundleFormatError(f"{self.path}: truncated bundle: {exc}") from exc
            if len(mraw) != first.size or len(sraw) != second.size:
                raise BundleFormatError(f"{self.path}: truncated bundle")
            return mraw, sraw

    @property
    def manifest_raw(self) -> bytes:
        return self._manifest_raw

    def unverified_manifest(self) -> BundleManifest:
        """For `bundle inspect` only: parse without checking signatures."""
        return parse_manifest(self._manifest_raw)

    def verify(
        self,
        trust: TrustRoot,
        *,
        now: datetime | None = None,
        profile: str | None = None,
        device_id: str | None = None,
        device_tags: Sequence[str] = (),
        extract_to: Path | None = None,
    ) -> VerifiedBundle:
        """Verify signatures, then every file's size and hash (optionally extracting)."""
        manifest = verify_manifest(
            self._manifest_raw,
            self._signatures_raw,
            trust,
            now=now,
            profile=profile,
            device_id=device_id,
            device_tags=device_tags,
        )
        try:
            self._check_files(manifest, extract_to)
        except tarfile.TarError as exc:  # truncated or corrupt after a good head
            raise BundleFormatError(f"{self.path}: corrupt bundle: {exc}") from exc
        return VerifiedBundle(
            manifest=manifest,
            manifest_raw=self._manifest_raw,
            sha256=file_sha256(self.path),
            size=self.size,
        )

    def _check_files(self, manifest: BundleManifest, dest: Path | None) -> None:
        expected = {f.path: f for f in manifest.files}
        seen: set[str] = set()
        with self._open() as tar:
            count = 0
            for member in tar:
                count += 1
                if count > MAX_BUNDLE_FILES + 2:
                    raise BundleFormatError("bundle holds more members than the limit")
                if member.name in ("manifest.json", "signatures.json") and count <= 2:
                    continue
                entry = expected.get(member.name)
                if entry is None or member.name in seen:
                    raise BundleIntegrityError(
                        f"bundle member {member.name!r} is not listed in the manifest"
                    )
                if not member.isreg():
                    raise BundleIntegrityError(f"bundle member {member.name!r} is not a file")
                if member.size != entry.size:
                    raise BundleIntegrityError(
                        f"{member.name}: {member.size} bytes, manifest says {entry.size}"
                    )
                src = tar.extractfile(member)
                assert src is not None
                self._copy_checked(src, entry.path, entry.size, entry.sha256, dest)
                seen.add(member.name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleIntegrityError(f"bundle lacks files the manifest lists: {missing}")

    @staticmethod
    def _copy_checked(src: IO[bytes], name: str, size: int, sha256: str, dest: Path | None) -> None:
        h = hashlib.sha256()
        out: IO[bytes] | None = None
        target = tmp = None
        if dest is not None:
            target = Path(dest) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            out = open(tmp, "wb")  # noqa: SIM115 - closed below
        n = 0
        try:
            while chunk := src.read(_CHUNK):
                n += len(chunk)
                if n > size:
                    raise BundleIntegrityError(f"{name}: more bytes than the manifest declares")
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
            if n != size:
                raise BundleIntegrityError(f"{name}: {n} bytes, manifest says {size} (truncated)")
            if h.hexdigest() != sha256:
                raise BundleIntegrityError(
                    f"{name}: sha256 {h.hexdigest()[:16]}... does not match the manifest's "
                    f"{sha256[:16]}... (the file was changed)"
                )
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            if out is not None:
                out.close()
                out = None
                assert tmp is not None
                tmp.unlink(missing_ok=True)
            raise
        finally:
            if out is not None:
                out.close()
        if tmp is not None and target is not None:
            os.replace(tmp, target)
