"""Merging many small device sketches fast: the tiler's hot path.

Windows carry their input sketches in one pack (`protocol.sketchpack`); older agents send
one JSON object per feature. Either way no device byte reaches the C++ sketch library:
`protocol.sketch.SketchMerger` reads each sketch's levels with numpy (every length
checked), pools the items of all windows by weight and builds the merged sketch with one
sort per level. Packs of one model are merged together, each feature's sketches from all
windows in one vectorised pass (`merge_packs`).

Measured (benchmarks/drift.py, "fleet merge"): see the README's drift table.
"""

from __future__ import annotations

import binascii
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import SketchError
from protocol.sketch import DEFAULT_K, FeatureSketch, SketchMerger
from protocol.sketchpack import SketchPack, merge_packs, read_pack

__all__ = ["MAX_ERRORS", "PackBatch", "SketchAccumulator"]

#: reasons kept per batch for the log (the count covers the rest)
MAX_ERRORS = 5


@dataclass(slots=True)
class SketchAccumulator:
    """Collects sketches of one feature; `sketch()` merges them (all k = ``k``)."""

    k: int = DEFAULT_K
    merger: SketchMerger | None = None
    windows: int = 0
    rejected: int = 0

    def _merger(self) -> SketchMerger:
        if self.merger is None:
            self.merger = SketchMerger(self.k)
        return self.merger

    def add_wire(self, wire: Mapping[str, Any]) -> bool:
        """Add one sketch given as wire JSON; False (and counted) if it is unusable."""
        try:
            if wire.get("kind", "kll_float") != "kll_float" or int(wire.get("version", 1)) != 1:
                raise SketchError("unknown sketch kind or version")
            if int(wire.get("k", DEFAULT_K)) != self.k:
                raise SketchError(f"k={wire.get('k')} cannot merge into a k={self.k} tile")
            count = int(wire.get("count", 0))
            data = wire.get("data") or ""
            if count == 0 and data:
                raise SketchError("sketch says count 0 but carries data")
            raw = binascii.a2b_base64(data, strict_mode=True) if data else b""
            if count and not raw:
                raise SketchError(f"sketch says count {count} but carries no data")
            if raw:
                n = _declared_count(raw)
                if n != count:
                    raise SketchError(f"sketch holds {n} values but says count {count}")
            self._merger().add_kll_bytes(raw, nan_count=int(wire.get("nan_count", 0) or 0))
        except (SketchError, ValueError, TypeError, binascii.Error):
            self.rejected += 1
            return False
        self.windows += 1
        return True

    def add_sketch(self, sketch: FeatureSketch) -> None:
        """Add an already decoded sketch (a stored tile)."""
        self._merger().add_sketch(sketch)
        self.windows += 1

    def absorb(self, other: SketchAccumulator) -> None:
        """Take what ``other`` collected (a union of two scopes, merged once at the end)."""
        if other.merger is not None:
            self._merger().absorb(other.merger)
        self.windows += other.windows
        self.rejected += other.rejected

    def sketch(self) -> FeatureSketch:
        """The merged sketch."""
        return self._merger().result()


def _declared_count(raw: bytes) -> int:
    """The value count a serialized KLL sketch states (its layout is checked on merge)."""
    if len(raw) >= 12 and raw[3] & 4:
        return 1
    if len(raw) >= 16 and not raw[3] & 1:
        return int.from_bytes(raw[8:16], "little")
    return 0


@dataclass(slots=True)
class PackBatch:
    """Sketch packs of many windows, merged per feature in one pass at the end."""

    packs: list[SketchPack] = field(default_factory=list)
    rejected: int = 0
    #: why the first few unreadable packs were refused ("<where>: <reason>")
    errors: list[str] = field(default_factory=list)

    def add(self, data: object, where: str = "a window") -> bool:
        """Add one window's pack (bytes, or base64 text from a JSON-form window); False
        (counted, reason kept) if it does not read."""
        try:
            if not isinstance(data, bytes | str):
                raise SketchError(f"input_pack is a {type(data).__name__}, not bytes or text")
            self.packs.append(read_pack(data))
        except SketchError as exc:
            self.rejected += 1
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(f"{where}: {exc}")
            return False
        return True

    def merge_into(self, accs: dict[str, SketchAccumulator]) -> int:
        """Merge every pack into the accumulators by feature; returns unusable sketches."""
        if not self.packs:
            return 0
        mergers: dict[str, SketchMerger] = {}
        bad = merge_packs(self.packs, mergers)
        counts: dict[str, int] = {}
        for names, windows in Counter(p.names for p in self.packs).items():
            for name in names:
                counts[name] = counts.get(name, 0) + windows
        for name, merger in mergers.items():
            acc = accs.get(name)
            if acc is None:
                acc = accs[name] = SketchAccumulator(k=merger.k)
            if acc.merger is None and acc.k == merger.k:
                acc.merger = merger
            else:
                acc.add_sketch(merger.result())
                acc.windows -= 1
            acc.windows += counts.get(name, 0)
        self.packs.clear()
        return bad
