"""Crash points for the kill tests: SIGKILL this process at the Nth checkpoint it passes.

Set ``EDGEFLEET_FLEET_CRASH_AT_CHECKPOINT=N``. Checkpoints sit where a crash hurts most:
between deciding and committing, between committing and sending, in the middle of sending,
and between sending and recording it. Each hit is logged with its number, so a test can run
once without a crash to learn how many there are, then kill at each.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

__all__ = ["CrashPoints"]

log = logging.getLogger(__name__)


class CrashPoints:
    def __init__(self, crash_at: int | None) -> None:
        self._crash_at = crash_at
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def hit(self, name: str) -> None:
        """Count one checkpoint; at the chosen one, die as ``kill -9`` would."""
        if self._crash_at is None:
            return
        with self._lock:
            self._count += 1
            n = self._count
        log.info("checkpoint %d: %s", n, name)
        if n == self._crash_at:
            log.warning("crash point %d (%s): SIGKILL", n, name)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
