"""A small time-to-live cache for figures that are costly to compute on every live refresh
(drift ranks read every window of a model version). One per dashboard app, thread-safe."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["TtlCache"]

T = TypeVar("T")


class TtlCache:
    """Values by key, recomputed when older than ``ttl_s``; at most ``max_items`` kept."""

    def __init__(self, *, ttl_s: float, max_items: int = 256) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: dict[Hashable, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value, or ``compute()`` stored (two racing callers may both compute)."""
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]  # type: ignore[no-any-return]
        value = compute()
        with self._lock:
            if len(self._items) >= self.max_items:
                oldest = min(self._items, key=lambda k: self._items[k][0])
                del self._items[oldest]
            self._items[key] = (now, value)
        return value
