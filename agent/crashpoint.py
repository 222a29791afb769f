"""A test hook that kills the agent with SIGKILL at a named point of an install.

``EDGEFLEET_AGENT_CRASH_AT=<point>:<n>`` (read by the CLI into ``AgentConfig.crash_at``)
kills the process the n-th time it passes ``<point>``. The crash-stress benchmark uses it to
prove that no crash point leaves the device without a verified model. Points, in install
order: ``download`` (after each chunk written), ``verifying``, ``installing``, ``self_test``,
``promote`` (between the two renames that fill a slot), ``switched``, ``health`` (each health
probe), ``commit`` (before writing the committed state), ``committed`` (after it).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Final

from agent.errors import ConfigError

__all__ = ["CRASH_POINTS", "CrashPoints", "parse_crash_at"]

log = logging.getLogger(__name__)

CRASH_POINTS: Final = (
    "download",
    "verifying",
    "installing",
    "self_test",
    "promote",
    "switched",
    "health",
    "commit",
    "committed",
)


def parse_crash_at(spec: str | None) -> tuple[str, int] | None:
    """``"point:n"`` (n defaults to 1) -> (point, n); None for an empty spec."""
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in CRASH_POINTS:
        raise ConfigError(f"crash point {point!r} is unknown; one of {', '.join(CRASH_POINTS)}")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ConfigError(f"crash point count {count!r} is not an integer") from None
    if n < 1:
        raise ConfigError(f"crash point count must be >= 1; got {n}")
    return point, n


class CrashPoints:
    """Counts passes of each point and kills the process at the configured one."""

    def __init__(self, spec: str | None = None) -> None:
        self.target = parse_crash_at(spec)
        self.passes: dict[str, int] = {}

    def hit(self, point: str) -> None:
        """Pass ``point``; dies here (SIGKILL, no cleanup) if this is the configured pass."""
        n = self.passes.get(point, 0) + 1
        self.passes[point] = n
        if self.target is not None and self.target == (point, n):
            log.warning("crash point %s:%d reached: SIGKILL", point, n)
            os.kill(os.getpid(), signal.SIGKILL)
