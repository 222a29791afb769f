"""Canonical JSON: the one byte encoding that signatures cover.

Keys sorted, no insignificant whitespace, UTF-8. Floats are allowed (Python writes the
shortest repr that round-trips, so the same value always encodes the same way) but NaN and
infinities are refused: they have no JSON spelling and would make the bytes ambiguous.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_bytes"]


def canonical_bytes(obj: Any) -> bytes:
    """Encode a JSON-compatible object canonically."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
