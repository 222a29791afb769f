"""The arm64 userland that `make test-arm64` prepared: paths in and out, and commands in it.

Every command goes through scripts/arm64/chroot-run.sh, which makes its mounts (/proc with
an aarch64 cpuinfo, /sys, /dev) in a private mount namespace of that one process: they go
away with it, however it ends, and the host never sees them. Files the tests put in the
rootfs live in a work directory that ``work_dir`` deletes afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOTFS_ENV", "Userland", "userland_from_env"]

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "scripts" / "arm64" / "chroot-run.sh"
ROOTFS_ENV = "EDGEFLEET_ARM64_ROOTFS"
#: where the tests' files go inside the rootfs
_WORK_PARENT = "var/tmp/edgefleet-tests"


@dataclass(frozen=True, slots=True, kw_only=True)
class Userland:
    """A prepared arm64 rootfs on the host, with the agent's venv inside it."""

    rootfs: Path
    venv: str  # path inside the rootfs

    def argv(self, *cmd: str) -> list[str]:
        """A host argv that runs ``cmd`` (paths as seen inside) in the userland."""
        return [str(LAUNCHER), str(self.rootfs), *cmd]

    def edgefleet(self, *args: str) -> list[str]:
        """The arm64 ``edgefleet`` CLI from the venv."""
        return self.argv(f"{self.venv}/bin/edgefleet", *args)

    def python(self, *args: str) -> list[str]:
        """The arm64 venv's python."""
        return self.argv(f"{self.venv}/bin/python", *args)

    def inside(self, host_path: Path) -> str:
        """The path, as seen inside the userland, of a host path under the rootfs."""
        return "/" + str(host_path.resolve().relative_to(self.rootfs))

    def run(self, *cmd: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside and wait; the result has text stdout and stderr."""
        return subprocess.run(
            self.argv(*cmd), capture_output=True, text=True, timeout=timeout_s, check=False
        )

    @contextlib.contextmanager
    def work_dir(self, name: str) -> Iterator[Path]:
        """A fresh directory inside the rootfs (host path); deleted on exit, even on failure."""
        path = self.rootfs / _WORK_PARENT / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def userland_from_env() -> Userland | None:
    """The userland named by EDGEFLEET_ARM64_ROOTFS, or None when it is not set."""
    raw = os.environ.get(ROOTFS_ENV)
    if not raw:
        return None
    rootfs = Path(raw).resolve()
    venv = os.environ.get("EDGEFLEET_ARM64_VENV", "/opt/edgefleet-venv")
    return Userland(rootfs=rootfs, venv=venv)
