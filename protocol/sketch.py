"""The shared sketch encoding: one KLL float sketch per feature, plus count, min, max, NaNs.

Agent and fleet use this one module, so a sketch built on a device merges with any other
on the server. KLL sketches are mergeable and their rank error is known (about 1.33% at
k=200, 99% confidence), which the drift tests add to their critical values.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
from datasketches import kll_floats_sketch
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import SketchError
from protocol.limits import MAX_SKETCH_BYTES

__all__ = ["DEFAULT_K", "FeatureSketch", "SketchBank", "SketchWire"]

DEFAULT_K = 200
_B64_LIMIT = (MAX_SKETCH_BYTES * 4) // 3 + 4


class SketchWire(BaseModel):
    """A sketch as it travels: the KLL bytes (base64) and exact count/min/max/NaN count."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: Literal["kll_float"] = "kll_float"
    version: Literal[1] = 1
    k: int = Field(default=DEFAULT_K, ge=8, le=65535)
    count: int = Field(ge=0)
    nan_count: int = Field(default=0, ge=0)
    min: float | None = None
    max: float | None = None
    data: str = Field(default="", max_length=_B64_LIMIT)


class FeatureSketch:
    """A mergeable sketch of one numeric feature. NaNs are counted, not sketched."""

    __slots__ = ("_kll", "k", "nan_count")

    def __init__(self, k: int = DEFAULT_K) -> None:
        self.k = k
        self._kll = kll_floats_sketch(k)
        self.nan_count = 0

    # -- building ------------------------------------------------------------------------
    def update(self, values: ArrayLike) -> None:
        """Add many values at once (vectorised; a per-value loop costs ~30x more)."""
        arr = np.asarray(values, dtype=np.float32).ravel()
        if arr.size == 0:
            return
        finite = np.isfinite(arr)
        n_bad = int(arr.size - np.count_nonzero(finite))
        if n_bad:
            self.nan_count += n_bad
            arr = arr[finite]
        if arr.size:
            self._kll.update(np.ascontiguousarray(arr))

    @classmethod
    def of(cls, values: ArrayLike, k: int = DEFAULT_K) -> FeatureSketch:
        s = cls(k)
        s.update(values)
        return s

    def merge(self, other: FeatureSketch) -> None:
        if other.k != self.k:
            raise SketchError(f"cannot merge a k={other.k} sketch into a k={self.k} sketch")
        self._kll.merge(other._kll)
        self.nan_count += other.nan_count

    # -- reading -------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of finite values sketched."""
        return int(self._kll.n)

    @property
    def empty(self) -> bool:
        return bool(self._kll.is_empty())

    @property
    def min(self) -> float | None:
        return None if self.empty else float(self._kll.get_min_value())

    @property
    def max(self) -> float | None:
        return None if self.empty else float(self._kll.get_max_value())

    @property
    def rank_error(self) -> float:
        """Normalized rank error bound (99% confidence) for this sketch's k, single-sided."""
        return float(kll_floats_sketch.get_normalized_rank_error(self.k, False))

    def quantile(self, q: float) -> float:
        if self.empty:
            raise SketchError("quantile of an empty sketch")
        return float(self._kll.get_quantile(q))

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        return [self.quantile(q) for q in qs]

    def cdf(self, split_points: ArrayLike) -> np.ndarray:
        """Normalized ranks at the (sorted, unique) split points; last entry is 1.0."""
        pts = np.asarray(split_points, dtype=np.float32)
        if self.empty:
            raise SketchError("cdf of an empty sketch")
        return np.asarray(self._kll.get_cdf(pts.tolist()), dtype=np.float64)

    def rank(self, value: float) -> float:
        return float(self._kll.get_rank(value))

    # -- wire ----------------------------------------------------------------------------
    def to_wire(self) -> SketchWire:
        data = base64.b64encode(self._kll.serialize()).decode("ascii") if not self.empty else ""
        return SketchWire(
            k=self.k,
            count=self.count,
            nan_count=self.nan_count,
            min=self.min,
            max=self.max,
            data=data,
        )

    @classmethod
    def from_wire(cls, wire: SketchWire) -> FeatureSketch:
        s = cls(wire.k)
        s.nan_count = wire.nan_count
        if wire.count == 0:
            if wire.data:
                raise SketchError("sketch says count 0 but carries data")
            return s
        try:
            raw = base64.b64decode(wire.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SketchError(f"sketch data is not base64: {exc}") from exc
        if len(raw) > MAX_SKETCH_BYTES:
            raise SketchError(f"sketch is {len(raw)} bytes; the limit is {MAX_SKETCH_BYTES}")
        _check_kll_layout(raw)
        try:
            kll = kll_floats_sketch.deserialize(raw)
        except Exception as exc:  # the C++ binding raises several unrelated types
            raise SketchError(f"sketch bytes do not decode as a KLL float sketch: {exc}") from exc
        if int(kll.n) != wire.count:
            raise SketchError(f"sketch holds {kll.n} values but says count {wire.count}")
        if kll.k != wire.k:
            raise SketchError(f"sketch has k={kll.k} but says k={wire.k}")
        s._kll = kll
        return s

    def __repr__(self) -> str:
        return f"FeatureSketch(k={self.k}, count={self.count}, nan_count={self.nan_count})"


class SketchBank:
    """One sketch per named feature, updated a batch of rows at a time."""

    __slots__ = ("features", "k", "sketches")

    def __init__(self, features: Iterable[str], k: int = DEFAULT_K) -> None:
        self.features = tuple(features)
        self.k = k
        self.sketches = {f: FeatureSketch(k) for f in self.features}

    def update_rows(self, rows: ArrayLike) -> None:
        """rows: [n, n_features]; one vectorised update per feature."""
        arr = np.asarray(rows, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.shape[1] != len(self.features):
            raise SketchError(
                f"rows have {arr.shape[1]} columns; this bank has {len(self.features)} features"
            )
        for i, f in enumerate(self.features):
            self.sketches[f].update(arr[:, i])

    def to_wire(self) -> dict[str, SketchWire]:
        return {f: s.to_wire() for f, s in self.sketches.items()}

    @classmethod
    def from_wire(cls, wires: Mapping[str, SketchWire]) -> SketchBank:
        ks = {w.k for w in wires.values()} or {DEFAULT_K}
        if len(ks) != 1:
            raise SketchError(f"sketches in one bank must share k; got {sorted(ks)}")
        bank = cls(wires.keys(), k=ks.pop())
        bank.sketches = {f: FeatureSketch.from_wire(w) for f, w in wires.items()}
        return bank

    def merge(self, other: SketchBank) -> None:
        for f, s in other.sketches.items():
            mine = self.sketches.get(f)
            if mine is None:
                self.sketches[f] = mine = FeatureSketch(s.k)
                self.features = (*self.features, f)
            mine.merge(s)

    @property
    def total_count(self) -> int:
        return sum(s.count for s in self.sketches.values())

    def __len__(self) -> int:
        return len(self.sketches)


def _level_capacity(k: int, m: int, num_levels: int, height: int) -> int:
    depth = num_levels - height - 1
    # k * (2/3)^depth, rounded the way the C++ library does (kll_helper::int_cap_aux).
    if depth <= 30:
        cap = (((2 * k) << depth) // int(3**depth) + 1) >> 1
    else:
        half = depth // 2
        rest = depth - half
        tmp = (((2 * k) << half) // int(3**half) + 1) >> 1
        cap = (((2 * tmp) << rest) // int(3**rest) + 1) >> 1
    return max(m, int(cap))


def _check_kll_layout(raw: bytes) -> None:
    """Check a serialized KLL float sketch's structure before the C++ library sees it.

    The binding trusts its input: mutated bytes made it crash the process in a fuzz run
    (segmentation fault). Sketches come from devices, so every offset is checked here.
    """
    if len(raw) < 8:
        raise SketchError("sketch bytes are shorter than the 8-byte preamble")
    pre_ints, ser_ver, family, flags = raw[0], raw[1], raw[2], raw[3]
    k = int.from_bytes(raw[4:6], "little")
    m = raw[6]
    if family != 15 or ser_ver not in (1, 2) or m != 8 or not 8 <= k <= 65535:
        raise SketchError("sketch bytes are not a KLL float sketch (bad preamble)")
    if flags & 1:  # empty
        if len(raw) != 8 or pre_ints not in (1, 2):
            raise SketchError("empty KLL sketch has a bad length")
        return
    if flags & 4:  # single item
        if len(raw) != 12 or ser_ver != 2 or pre_ints != 2:
            raise SketchError("single-item KLL sketch has a bad length")
        value = np.frombuffer(raw, dtype="<f4", count=1, offset=8)
        if not np.isfinite(value).all():
            raise SketchError("KLL sketch holds a non-finite value")
        return
    if pre_ints != 5 or len(raw) < 20:
        raise SketchError("KLL sketch has a bad preamble length")
    n = int.from_bytes(raw[8:16], "little")
    min_k = int.from_bytes(raw[16:18], "little")
    num_levels = raw[18]
    if not 1 <= num_levels <= 61 or min_k > k or n == 0:
        raise SketchError("KLL sketch header is inconsistent")
    head = 20 + 4 * num_levels
    if len(raw) < head + 8:
        raise SketchError("KLL sketch is truncated")
    levels = [int(x) for x in np.frombuffer(raw, dtype="<u4", count=num_levels, offset=20)]
    capacity = sum(_level_capacity(k, m, num_levels, h) for h in range(num_levels))
    levels.append(capacity)
    if any(b < a for a, b in itertools.pairwise(levels)) or levels[0] >= capacity:
        raise SketchError("KLL sketch level offsets are inconsistent")
    n_items = capacity - levels[0]
    if len(raw) != head + 8 + 4 * n_items:
        raise SketchError(
            f"KLL sketch is {len(raw)} bytes; its header implies {head + 8 + 4 * n_items}"
        )
    weight = sum((levels[h + 1] - levels[h]) << h for h in range(num_levels))
    if weight != n:
        raise SketchError(f"KLL sketch levels weigh {weight} values but the header says {n}")
    values = np.frombuffer(raw, dtype="<f4", offset=head)
    if not np.isfinite(values).all() or values[0] > values[1]:
        raise SketchError("KLL sketch has non-finite values or min > max")
    items = values[2:]
    lo, hi = values[0], values[1]
    if items.size and (items.min() < lo or items.max() > hi):
        raise SketchError("KLL sketch items lie outside its min and max")
    for h in range(1, num_levels):
        level = items[levels[h] - levels[0] : levels[h + 1] - levels[0]]
        if level.size > 1 and np.any(np.diff(level) < 0):
            raise SketchError("KLL sketch has an unsorted level")


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
