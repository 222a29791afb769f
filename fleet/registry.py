"""The bundle registry: receive an upload, verify it against the trust root, store it.

The fleet never signs: a bundle is stored only if a threshold of the trust root's release
keys signed it and every file matches its manifest. Stored bundles are named by the sha256
of the whole file (``<bundle_dir>/<sha256>.efb``), the identity used everywhere.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from fleet.errors import BundleRejected, BundleTooLarge
from fleet.models import Bundle, utcnow
from protocol.bundle import BundleReader
from protocol.errors import ProtocolError
from protocol.trust import TrustRoot

__all__ = ["BundleStore"]

log = logging.getLogger(__name__)

BUNDLE_SUFFIX = ".efb"


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleStore:
    """Files under ``bundle_dir``; rows in the ``bundle`` table."""

    bundle_dir: Path
    trust: TrustRoot
    max_upload_bytes: int

    @property
    def incoming_dir(self) -> Path:
        return self.bundle_dir / ".incoming"

    def prepare(self) -> None:
        """Create the directories and sweep uploads a crash left half-written."""
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming_dir.glob("*.part"):
            stale.unlink(missing_ok=True)

    def path_of(self, sha256: str) -> Path:
        return self.bundle_dir / f"{sha256}{BUNDLE_SUFFIX}"

    def new_upload_path(self) -> Path:
        """A fresh temp path on the same file system as the store (so rename is atomic)."""
        return self.incoming_dir / f"{secrets.token_hex(8)}.part"

    def check_size(self, size: int) -> None:
        """Raise BundleTooLarge if ``size`` bytes exceed the upload limit."""
        if size > self.max_upload_bytes:
            raise BundleTooLarge(
                f"bundle is larger than the upload limit of {self.max_upload_bytes} bytes "
                "(raise EDGEFLEET_FLEET_MAX_UPLOAD_BYTES if this bundle is right)",
                extra={"limit_bytes": self.max_upload_bytes},
            )

    def receive(self, chunks: Iterable[bytes]) -> Path:
        """Write chunks to a new temp file under the size limit; return its path."""
        tmp = self.new_upload_path()
        n = 0
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    n += len(chunk)
                    self.check_size(n)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def add(self, session: Session, tmp: Path) -> tuple[Bundle, bool]:
        """Verify the uploaded file at ``tmp`` and store it; (row, created). Consumes ``tmp``.

        Idempotent: the same bundle again returns the existing row with created False.
        """
        try:
            try:
                verified = BundleReader(tmp, max_bytes=self.max_upload_bytes).verify(self.trust)
            except ProtocolError as exc:
                raise BundleRejected(f"bundle rejected: {exc}", extra={"reason": exc.code}) from exc
            final = self.path_of(verified.sha256)
            existing = session.get(Bundle, verified.sha256)
            if existing is not None and final.exists():
                return existing, False
            _install(tmp, final)
            if existing is not None:
                return existing, False  # the row survived; its file was gone and is back
            m = verified.manifest
            row = Bundle(
                sha256=verified.sha256,
                model_name=m.model.name,
                model_version=m.model.version,
                profile=m.profile,
                size=verified.size,
                created_at=m.created_at,
                expires_at=m.expires_at,
                uploaded_at=utcnow(),
                manifest=m.model_dump(mode="json"),
                path=str(final),
            )
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                # another fleet process stored the same bundle at the same moment
                session.rollback()
                again = session.get(Bundle, verified.sha256)
                if again is None:
                    raise
                return again, False
            session.refresh(row)
            log.info(
                "stored bundle %s (%s v%d, %s, %d bytes)",
                row.sha256,
                row.model_name,
                row.model_version,
                row.profile,
                row.size,
            )
            return row, True
        finally:
            tmp.unlink(missing_ok=True)


def _install(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    # the rename is durable only once the directory entry is
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
