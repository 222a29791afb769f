"""Merging many small device sketches fast: the tiler's hot path.

A device window usually holds fewer values than k, so its KLL sketch never compacted: its
bytes are the raw values. Such sketches are read straight from the bytes with numpy (the
C++ deserializer never sees device bytes, so a hostile sketch cannot crash it), and all of
a tile's raw values go into the tile's sketch in one vectorised update. A sketch that did
compact (more values than k) goes through `FeatureSketch.from_wire`, which checks every
offset before the C++ library reads it, and is merged the usual way.

Measured (benchmarks/drift.py): the one-by-one path costs ~60 us per small sketch here,
most of it the layout check; the raw path a few microseconds.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.errors import SketchError
from protocol.sketch import DEFAULT_K, FeatureSketch, SketchWire

__all__ = ["SketchAccumulator", "decode_raw_values"]

_KLL_FAMILY = 15
_FLAG_EMPTY = 1
_FLAG_SINGLE = 4
#: bytes 8..16 n (u64), 16..18 min_k, 18 num_levels, 19 unused, 20.. level offsets (u32)
_HEADER = struct.Struct("<QHBx")


def _raw_payload(wire: Mapping[str, Any]) -> bytes | None:
    """The little-endian float32 values a sketch stands for, or None for a large one.

    Finiteness is not checked here (the caller checks all payloads at once).
    """
    count = int(wire.get("count", 0))
    data = wire.get("data") or ""
    if count == 0:
        if data:
            raise SketchError("sketch says count 0 but carries data")
        return b""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SketchError(f"sketch data is not base64: {exc}") from exc
    if len(raw) < 8 or raw[2] != _KLL_FAMILY or raw[6] != 8:
        raise SketchError("sketch bytes are not a KLL float sketch (bad preamble)")
    flags = raw[3]
    if flags & _FLAG_EMPTY:
        raise SketchError(f"sketch says count {count} but is empty")
    if flags & _FLAG_SINGLE:
        if len(raw) != 12 or count != 1:
            raise SketchError("single-item KLL sketch has a bad length or count")
        return raw[8:12]
    if raw[0] != 5 or len(raw) < 24:
        raise SketchError("KLL sketch has a bad preamble length")
    n, _min_k, num_levels = _HEADER.unpack_from(raw, 8)
    if n != count:
        raise SketchError(f"sketch holds {n} values but says count {count}")
    if num_levels != 1:
        return _expand_levels(raw, n, num_levels)
    # one level: the level offset (u32), min and max (2 x f32), then the n items
    if len(raw) != 32 + 4 * n:
        raise SketchError("KLL sketch length does not match its count")
    return raw[32:]


#: a compacted sketch of at most this many values is expanded (items repeated by weight)
#: instead of deserialized and merged: cheaper, and no device bytes reach the C++ library
EXPAND_MAX_VALUES = 16_384


def _expand_levels(raw: bytes, n: int, num_levels: int) -> bytes | None:
    """Items of a compacted sketch, each repeated by its weight (2^level), as f32 bytes.

    Feeding these to a KLL sketch is, like a merge, a sketch of the union whose error adds
    the source sketch's own (bounded) error. Large sketches return None (real merge).
    """
    if n > EXPAND_MAX_VALUES or num_levels > 30:
        return None
    head = 20 + 4 * num_levels
    n_items, rest = divmod(len(raw) - head - 8, 4)
    if rest or n_items <= 0:
        raise SketchError("KLL sketch length is not a whole number of items")
    offsets = np.frombuffer(raw, dtype="<u4", count=num_levels, offset=20).astype(np.int64)
    bounds = np.append(offsets - offsets[0], n_items)
    sizes = np.diff(bounds)
    if np.any(sizes < 0):
        raise SketchError("KLL sketch level offsets are inconsistent")
    weights = np.left_shift(1, np.arange(num_levels, dtype=np.int64))
    if int(np.sum(sizes * weights)) != n:
        raise SketchError("KLL sketch levels do not weigh its count")
    items = np.frombuffer(raw, dtype="<f4", count=n_items, offset=head + 8)
    return np.repeat(items, np.repeat(weights, sizes)).tobytes()


def decode_raw_values(wire: Mapping[str, Any]) -> np.ndarray | None:
    """The values a small sketch stands for (compacted items repeated by weight), or None
    for a sketch too large to expand (merge it instead).

    Raises SketchError when the bytes do not match the declared count or layout.
    """
    payload = _raw_payload(wire)
    if payload is None:
        return None
    values = np.frombuffer(payload, dtype="<f4")
    if not np.isfinite(values).all():
        raise SketchError("KLL sketch holds a non-finite value")
    return values


@dataclass(slots=True)
class SketchAccumulator:
    """Collects device sketches of one feature; `sketch()` merges them (all k = ``k``)."""

    k: int = DEFAULT_K
    raw: list[bytes] = field(default_factory=list)
    base: FeatureSketch | None = None
    nan_count: int = 0
    windows: int = 0
    rejected: int = 0

    def add_wire(self, wire: Mapping[str, Any]) -> bool:
        """Add one sketch given as wire JSON; False (and counted) if it is unusable."""
        try:
            if wire.get("kind", "kll_float") != "kll_float" or int(wire.get("version", 1)) != 1:
                raise SketchError("unknown sketch kind or version")
            payload = _raw_payload(wire)
            if payload is None:
                sketch = FeatureSketch.from_wire(SketchWire.model_validate(wire))
                if sketch.k != self.k:
                    raise SketchError(f"k={sketch.k} cannot merge into a k={self.k} tile")
                self._base().merge(sketch)
            elif payload:
                self.raw.append(payload)
            self.nan_count += int(wire.get("nan_count", 0) or 0)
        except (SketchError, ValueError, TypeError):
            self.rejected += 1
            return False
        self.windows += 1
        return True

    def add_sketch(self, sketch: FeatureSketch) -> None:
        """Add an already decoded sketch (a stored tile)."""
        self._base().merge(sketch)  # merge carries the sketch's NaN count
        self.windows += 1

    def _base(self) -> FeatureSketch:
        if self.base is None:
            self.base = FeatureSketch(self.k)
        return self.base

    def sketch(self) -> FeatureSketch:
        """The merged sketch (raw values in one vectorised update)."""
        out = self._base()
        if self.raw:
            # writable buffer: the binding refuses read-only arrays
            values = np.frombuffer(bytearray().join(self.raw), dtype="<f4")
            self.raw.clear()
            # a non-finite value inside a sketch is malformed; update() counts it as NaN
            # rather than sketching it, so it cannot poison the tile
            out.update(values)
        out.nan_count += self.nan_count
        self.nan_count = 0
        return out
