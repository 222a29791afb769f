"""Getting a bundle file onto the device: the fetcher seam and its plain-HTTP implementation.

A `Fetcher` writes the bundle named by a deploy command to a local file and returns its
path; the sha256 of the whole file is checked here, against the command, before anything
else reads it. The chunked, resumable MQTT transfer plugs in as another `Fetcher`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.errors import DownloadError
from protocol.messages import DeployCommand, ReasonCode

__all__ = ["Fetcher", "HttpFetcher", "ProgressFn", "check_declared_size"]

log = logging.getLogger(__name__)

#: called with the fraction done (0..1) now and then while fetching
ProgressFn = Callable[[float], None]

_CHUNK = 256 * 1024


class Fetcher(Protocol):
    """Fetches a deploy command's bundle into ``dest_dir`` and returns the file's path."""

    def fetch(self, command: DeployCommand, dest_dir: Path, progress: ProgressFn) -> Path: ...


def check_declared_size(command: DeployCommand, max_bytes: int) -> None:
    """Refuse before downloading when the declared size is over the device's limit."""
    if command.bundle_size > max_bytes:
        raise DownloadError(
            f"bundle is {command.bundle_size} bytes; this device accepts at most {max_bytes}",
            reason=ReasonCode.TOO_LARGE,
        )


class HttpFetcher:
    """HTTP(S) GET of ``bundle_url`` (file:// works too), streamed, limited, hashed."""

    def __init__(self, *, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def fetch(self, command: DeployCommand, dest_dir: Path, progress: ProgressFn) -> Path:
        check_declared_size(command, self.max_bytes)
        size = command.bundle_size
        part = Path(dest_dir) / f"{command.bundle_sha256}.part"
        h = hashlib.sha256()
        n = 0
        next_report = 0.25
        try:
            req = urllib.request.Request(command.bundle_url, headers={"Accept": "*/*"})
            with (
                urllib.request.urlopen(req, timeout=self.timeout_s) as resp,
                open(part, "wb") as out,
            ):
                while chunk := resp.read(_CHUNK):
                    n += len(chunk)
                    if n > size:
                        raise DownloadError(
                            f"server sent more than the declared {size} bytes; aborted",
                            reason=ReasonCode.TOO_LARGE,
                        )
                    h.update(chunk)
                    out.write(chunk)
                    if n / size >= next_report:
                        progress(n / size)
                        next_report += 0.25
                out.flush()
                os.fsync(out.fileno())
        except DownloadError:
            part.unlink(missing_ok=True)
            raise
        except OSError as exc:
            # URLError and HTTPError are OSErrors too.
            part.unlink(missing_ok=True)
            if getattr(exc, "errno", None) == errno.ENOSPC:
                raise DownloadError(
                    f"disk full while writing {part}", reason=ReasonCode.DISK_FULL
                ) from exc
            raise DownloadError(f"GET {command.bundle_url} failed: {exc}") from exc
        if n != size:
            part.unlink(missing_ok=True)
            raise DownloadError(f"got {n} bytes; the command declared {size} (truncated)")
        if h.hexdigest() != command.bundle_sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"downloaded file has sha256 {h.hexdigest()[:16]}..., the command says "
                f"{command.bundle_sha256[:16]}...",
                reason=ReasonCode.BAD_HASH,
            )
        return part
