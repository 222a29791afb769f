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
import struct
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
from datasketches import kll_floats_sketch
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import SketchError
from protocol.limits import MAX_SKETCH_BYTES

__all__ = [
    "DEFAULT_K",
    "FeatureSketch",
    "SketchBank",
    "SketchMerger",
    "SketchWire",
    "wire_quantiles",
]

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
        s = cls.from_kll_bytes(raw, k=wire.k, nan_count=wire.nan_count)
        if s.count != wire.count:
            raise SketchError(f"sketch holds {s.count} values but says count {wire.count}")
        return s

    @classmethod
    def from_kll_bytes(cls, raw: bytes, *, k: int, nan_count: int = 0) -> FeatureSketch:
        """A sketch from serialized KLL bytes (checked before the C++ library reads them).

        Empty ``raw`` is an empty sketch. Raises SketchError naming what is wrong.
        """
        s = cls(k)
        s.nan_count = nan_count
        if not raw:
            return s
        if len(raw) > MAX_SKETCH_BYTES:
            raise SketchError(f"sketch is {len(raw)} bytes; the limit is {MAX_SKETCH_BYTES}")
        _check_kll_layout(raw)
        try:
            kll = kll_floats_sketch.deserialize(raw)
        except Exception as exc:  # the C++ binding raises several unrelated types
            raise SketchError(f"sketch bytes do not decode as a KLL float sketch: {exc}") from exc
        if kll.k != k:
            raise SketchError(f"sketch has k={kll.k} but says k={k}")
        s._kll = kll
        return s

    def kll_bytes(self) -> bytes:
        """The serialized KLL sketch; empty bytes for an empty sketch."""
        return b"" if self.empty else bytes(self._kll.serialize())

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


_KLL_FAMILY = 15
_FLAG_EMPTY = 1
_FLAG_SINGLE = 4
#: bytes 8..20 of a full KLL sketch: n (u64), min_k (u16), num_levels (u8), unused
_KLL_HEAD = struct.Struct("<QHBx")
#: 4-byte words before a full sketch's level offsets; levels read in one vectorised pass
_HEAD_WORDS = 5
_MANY_LEVELS = 12


class SketchMerger:
    """Merges many KLL sketches of one feature at once, in numpy.

    Merging sketch by sketch through the C++ library costs a deserialization and a merge
    call per sketch (tens of microseconds with the layout check); a fleet merges hundreds of
    thousands of small device sketches per tile. This reads each sketch's levels straight
    from its bytes (no device byte reaches the C++ library), pools the items by weight, and
    builds the merged sketch in one pass:

    level by level from the lightest, the pool of weight-2^h items (the sketches' own
    level-h items plus what the level below promoted) is sorted; while the total weight
    needs more than ``k`` items at the top, an odd item stays at level h and the rest is
    compacted (every other item, random offset) into level h+1. A compaction of a sorted
    run at weight w moves any rank by at most w, so the result's rank error (beyond the
    inputs' own) is below 2^H / n < 2/k (1% at k=200), about what one KLL update path has
    (1.33% at 99% confidence), for a sort per level instead of a merge per sketch.

    Already decoded sketches (stored tiles) are merged with the library (`add_sketch`).
    """

    __slots__ = ("_base", "_hi", "_levels", "_lo", "k", "nan_count", "sketches")

    def __init__(self, k: int = DEFAULT_K) -> None:
        self.k = k
        self._levels: dict[int, list[np.ndarray]] = {}
        self._lo = math.inf
        self._hi = -math.inf
        self._base: FeatureSketch | None = None
        self.nan_count = 0
        #: sketches added (of any kind)
        self.sketches = 0

    # -- input ---------------------------------------------------------------------------
    def add_values(self, values: np.ndarray, *, lo: float | None = None,
                   hi: float | None = None) -> None:  # fmt: skip
        """Raw values (weight 1). ``lo``/``hi``: their exact min/max when already known."""
        arr = np.asarray(values, dtype=np.float32).ravel()
        if arr.size:
            self._levels.setdefault(0, []).append(arr)
            if lo is None or hi is None:
                lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            self._bounds(lo, hi)

    def add_level(self, height: int, items: np.ndarray) -> None:
        """Items that each stand for 2^height values (min/max are the caller's business)."""
        if items.size:
            self._levels.setdefault(height, []).append(items)

    def add_bounds(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Exact minima and maxima of sketches whose items came through `add_level`."""
        lo = lo[np.isfinite(lo)]
        hi = hi[np.isfinite(hi)]
        if lo.size:
            self._lo = min(self._lo, float(lo.min()))
        if hi.size:
            self._hi = max(self._hi, float(hi.max()))

    def _bounds(self, lo: float, hi: float) -> None:
        if math.isfinite(lo) and lo < self._lo:
            self._lo = lo
        if math.isfinite(hi) and hi > self._hi:
            self._hi = hi

    def add_kll_bytes(self, raw: bytes | memoryview, *, nan_count: int = 0) -> None:
        """One serialized KLL float sketch (device bytes: every length is checked)."""
        m = len(raw)
        if m == 0:
            self.sketches += 1
            self.nan_count += nan_count
            return
        if m > MAX_SKETCH_BYTES:
            raise SketchError(f"sketch is {m} bytes; the limit is {MAX_SKETCH_BYTES}")
        if m < 8 or raw[2] != _KLL_FAMILY or raw[6] != 8:
            raise SketchError("sketch bytes are not a KLL float sketch (bad preamble)")
        k = raw[4] | (raw[5] << 8)
        if k != self.k:
            raise SketchError(f"a k={k} sketch cannot merge into a k={self.k} one")
        flags = raw[3]
        if flags & _FLAG_EMPTY:
            if m != 8:
                raise SketchError("empty KLL sketch has a bad length")
        elif flags & _FLAG_SINGLE:
            if m != 12:
                raise SketchError("single-item KLL sketch has a bad length")
            item = np.frombuffer(raw, dtype="<f4", count=1, offset=8)
            self.add_values(item)
        else:
            self._add_full(raw, m)
        self.sketches += 1
        self.nan_count += nan_count

    def _add_full(self, raw: bytes | memoryview, m: int) -> None:
        if raw[0] != 5 or m < 32:
            raise SketchError("KLL sketch has a bad preamble length")
        n, _min_k, num_levels = _KLL_HEAD.unpack_from(raw, 8)
        if not 1 <= num_levels <= 61 or n == 0:
            raise SketchError("KLL sketch header is inconsistent")
        head = 20 + 4 * num_levels
        n_items, rest = divmod(m - head - 8, 4)
        if rest or n_items <= 0:
            raise SketchError("KLL sketch length is not a whole number of items")
        lo, hi = (float(x) for x in np.frombuffer(raw, dtype="<f4", count=2, offset=head))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise SketchError("KLL sketch has non-finite or crossed min and max")
        items = np.frombuffer(raw, dtype="<f4", count=n_items, offset=head + 8)
        if num_levels == 1:
            if n_items != n:
                raise SketchError(f"KLL sketch holds {n_items} items but says {n} values")
            self._levels.setdefault(0, []).append(items)
        else:
            offsets = np.frombuffer(raw, dtype="<u4", count=num_levels, offset=20)
            bounds = np.append(offsets.astype(np.int64) - int(offsets[0]), n_items)
            sizes = np.diff(bounds)
            if np.any(sizes < 0):
                raise SketchError("KLL sketch level offsets are inconsistent")
            if sum(int(s) << h for h, s in enumerate(sizes.tolist())) != n:
                raise SketchError(f"KLL sketch levels do not weigh its {n} values")
            for h in range(num_levels):
                if sizes[h]:
                    self._levels.setdefault(h, []).append(items[bounds[h] : bounds[h + 1]])
        self._bounds(lo, hi)

    def add_kll_many(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> int:
        """Many serialized sketches lying in one byte buffer (``buf``: uint8, whole words).

        ``starts`` and ``lengths`` are byte offsets and sizes, multiples of 4 (a KLL float
        sketch is whole 4-byte words); 0 bytes is an empty sketch. Full sketches of up to
        `_MANY_LEVELS` levels (every device window) are read with a few vectorised
        operations for all of them at once; single-item and odd ones go one by one
        through `add_kll_bytes`. Returns how many were unusable (skipped, not merged).
        """
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if starts.size == 0:
            return 0
        if buf.size % 4 or np.any(starts % 4) or np.any(lengths % 4):
            raise SketchError("sketch offsets and sizes must be whole 4-byte words")
        if np.any(starts < 0) or np.any(lengths < 0) or int((starts + lengths).max()) > buf.size:
            raise SketchError("sketch offsets lie outside their buffer")
        words = buf.view("<u4")
        present = lengths > 0
        self.sketches += int(np.count_nonzero(~present))  # empty sketches
        done = np.zeros_like(present)
        full = np.flatnonzero(lengths >= 4 * (_HEAD_WORDS + _MANY_LEVELS))
        if full.size:
            ok = self._add_full_many(words, starts[full] // 4, lengths[full] // 4)
            done[full[ok]] = True
        bad = 0
        for i in np.flatnonzero(present & ~done).tolist():
            start, length = int(starts[i]), int(lengths[i])
            try:
                self.add_kll_bytes(buf[start : start + length].tobytes())
            except SketchError:
                bad += 1
        return bad

    def _add_full_many(self, words: np.ndarray, at: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Vectorised `_add_full` for sketches at word offsets ``at`` (``size`` words each).

        Returns which ones were taken; the others (a different layout, or inconsistent)
        are left for the one-by-one path, which accepts them or says what is wrong.
        """
        head = words[at[:, None] + np.arange(_HEAD_WORDS)]
        w0 = head[:, 0]
        pre, fam, flags = w0 & 0xFF, (w0 >> 16) & 0xFF, w0 >> 24
        k, m = head[:, 1] & 0xFFFF, (head[:, 1] >> 16) & 0xFF
        n = head[:, 2].astype(np.int64) | (head[:, 3].astype(np.int64) << 32)
        levels = ((head[:, 4] >> 16) & 0xFF).astype(np.int64)
        n_items = size - (_HEAD_WORDS + 2) - levels
        ok: np.ndarray = (
            (pre == 5) & (fam == _KLL_FAMILY) & (m == 8) & (k == self.k) & (n > 0)
            & ((flags & (_FLAG_EMPTY | _FLAG_SINGLE)) == 0)
            & (levels >= 1) & (levels <= _MANY_LEVELS) & (head[:, 3] >> 31 == 0)
            & (n_items > 0)
        )  # fmt: skip
        # one level (a device window of up to k values): its items are its n values
        ok &= (levels > 1) | (n_items == n)
        first = at + _HEAD_WORDS + levels  # min and max, then the items
        cand = np.flatnonzero(ok)
        bounds = words[np.stack([first[cand], first[cand] + 1], axis=1)].view("<f4")
        good = np.isfinite(bounds).all(axis=1) & (bounds[:, 0] <= bounds[:, 1])
        ok[cand[~good]] = False
        multi = np.flatnonzero(ok & (levels > 1))
        sizes = np.zeros((0, _MANY_LEVELS), np.int64)
        if multi.size:
            # level offsets (relative to level 0), then the item count closes the last level
            offs = words[at[multi, None] + _HEAD_WORDS + np.arange(_MANY_LEVELS)].astype(np.int64)
            offs = np.concatenate([offs, np.zeros((multi.size, 1), np.int64)], axis=1)
            offs -= offs[:, :1]
            cols = np.arange(_MANY_LEVELS + 1)
            offs = np.where(cols < levels[multi, None], offs, n_items[multi, None])
            sizes = np.diff(offs, axis=1)
            fits = (sizes >= 0).all(axis=1)
            fits &= (sizes << np.arange(_MANY_LEVELS)).sum(axis=1) == n[multi]
            ok[multi[~fits]] = False
            multi, sizes = multi[fits], sizes[fits]
        single = np.flatnonzero(ok & (levels == 1))
        for run in _gather_runs(words, first[single] + 2, n_items[single]):
            self.add_level(0, run.ravel().view("<f4"))
        if multi.size:
            total = int(n_items[multi].sum())
            # word index of every item: start of its run plus its place in the run
            runs = n_items[multi]
            run_at = np.repeat(first[multi] + 2 - (np.cumsum(runs) - runs), runs)
            values = words[run_at + np.arange(total)].view("<f4")
            height = np.repeat(np.tile(np.arange(_MANY_LEVELS), len(sizes)), sizes.ravel())
            for h in np.unique(height).tolist():
                self.add_level(h, values[height == h])
        taken = bounds[ok[cand]].astype(np.float64)
        self.add_bounds(taken[:, 0], taken[:, 1])
        self.sketches += int(np.count_nonzero(ok))
        return ok

    def add_sketch(self, sketch: FeatureSketch) -> None:
        """An already decoded sketch (merged with the library; carries its NaN count)."""
        if sketch.k != self.k:
            raise SketchError(f"a k={sketch.k} sketch cannot merge into a k={self.k} one")
        if self._base is None:
            self._base = FeatureSketch(self.k)
        self._base.merge(sketch)
        self.sketches += 1

    def absorb(self, other: SketchMerger) -> None:
        """Take everything ``other`` collected (it is left as it was; its arrays shared)."""
        if other.k != self.k:
            raise SketchError(f"a k={other.k} merger cannot join a k={self.k} one")
        for h, parts in other._levels.items():
            self._levels.setdefault(h, []).extend(parts)
        self._bounds(other._lo, other._hi)
        if other._base is not None:
            if self._base is None:
                self._base = FeatureSketch(self.k)
            self._base.merge(other._base)
        self.nan_count += other.nan_count
        self.sketches += other.sketches

    # -- output --------------------------------------------------------------------------
    def result(self, rng: np.random.Generator | None = None) -> FeatureSketch:
        """The merged sketch. Non-finite items (malformed input) are counted as NaN."""
        rng = rng or np.random.default_rng()
        pools: dict[int, np.ndarray] = {}
        n = 0
        nan = self.nan_count
        for h, parts in self._levels.items():
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
            finite = np.isfinite(arr)
            if not finite.all():
                nan += int(arr.size - np.count_nonzero(finite)) << h
                arr = arr[finite]
            if arr.size:
                pools[h] = arr
                n += int(arr.size) << h
        out = FeatureSketch(self.k)
        if n:
            lo = min(self._lo, *(float(p.min()) for p in pools.values()))
            hi = max(self._hi, *(float(p.max()) for p in pools.values()))
            out = FeatureSketch.from_kll_bytes(
                _compact_to_kll(pools, n, lo, hi, self.k, rng), k=self.k
            )
        if self._base is not None:
            out.merge(self._base)
        out.nan_count = nan + (self._base.nan_count if self._base is not None else 0)
        return out


def _gather_runs(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """``words[s : s + n]`` for every run, as a few 2-D blocks (runs grouped by length).

    Runs of one length are rows of a sliding-window view of ``words``, so a group is one
    fancy index of whole rows (a memcpy each) instead of an index per item: ~13x faster
    for 10,000 windows of 60 values than building the item index with ``np.repeat``.
    """
    if starts.size == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    cuts = np.flatnonzero(np.diff(lengths[order])) + 1
    blocks = []
    for group in np.split(order, cuts):
        n = int(lengths[group[0]])
        blocks.append(sliding_window_view(words, n)[starts[group]])
    return blocks


def _compact_to_kll(
    pools: dict[int, np.ndarray], n: int, lo: float, hi: float, k: int,
    rng: np.random.Generator,
) -> bytes:  # fmt: skip
    """Serialized KLL float sketch of ``n`` values given as items pooled by weight 2^h."""
    if n == 1:
        item = next(iter(pools.values()))
        return struct.pack("<BBBBHBBf", 2, 2, _KLL_FAMILY, _FLAG_SINGLE, k, 8, 0, float(item[0]))
    # the top level holds at most n / 2^top items: the smallest top that fits k of them,
    # but never below the heaviest input level
    top = max(pools)
    while n > (k << top):
        top += 1
    levels: list[np.ndarray] = []
    carry = np.empty(0, dtype=np.float32)
    for h in range(top + 1):
        own = pools.get(h)
        if own is None:
            pool = carry  # already sorted: it is every other item of a sorted run
        elif carry.size:
            pool = np.sort(np.concatenate((own, carry)))
        else:
            pool = np.sort(own)
        if h == top:
            levels.append(pool)
            break
        if pool.size % 2:
            j = int(rng.integers(pool.size))
            levels.append(pool[j : j + 1])
            pool = np.delete(pool, j)
        else:
            levels.append(pool[:0])
        carry = pool[int(rng.integers(2)) :: 2]
    num_levels = len(levels)
    sizes = [int(x.size) for x in levels]
    capacity = sum(_level_capacity(k, 8, num_levels, h) for h in range(num_levels))
    free = capacity - sum(sizes)
    if free < 0 or sizes[-1] > k:  # cannot happen by construction; refuse rather than corrupt
        raise SketchError(f"merged sketch does not fit its levels ({sizes}, capacity {capacity})")
    offsets = np.cumsum([free, *sizes[:-1]], dtype=np.int64).astype("<u4")
    head = struct.pack("<BBBBHBBQHBx", 5, 1, _KLL_FAMILY, 0, k, 8, 0, n, k, num_levels)
    bounds = np.asarray([lo, hi], dtype="<f4")
    items = np.concatenate(levels).astype("<f4", copy=False)
    return b"".join((head, offsets.tobytes(), bounds.tobytes(), items.tobytes()))


#: up to this many values, `wire_quantiles` sorts in Python (~3 us for 20, numpy ~15 us)
_SMALL_N = 64


def wire_quantiles(wire: SketchWire, qs: Iterable[float]) -> tuple[int, list[float]]:
    """(count, quantiles) of a wire sketch, read with numpy: no C++ deserialization.

    The fleet needs three latency quantiles of every window it ingests; deserializing the
    sketch for them (with the layout check) cost more than the rest of the window. Same
    answers as the library's `get_quantile` (the first item whose cumulative weight
    exceeds q * n; 300 random sketches compared equal). Raises SketchError for a sketch
    that does not read or lies about its count; an empty sketch gives (0, []).
    """
    if wire.count == 0:
        if wire.data:
            raise SketchError("sketch says count 0 but carries data")
        return 0, []
    try:
        raw = binascii.a2b_base64(wire.data, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise SketchError(f"sketch data is not base64: {exc}") from exc
    qs = list(qs)
    if len(raw) >= 32 and raw[0] == 5 and raw[2] == _KLL_FAMILY and raw[18] == 1:
        # one level (a window that never compacted): the items are the values
        if raw[6] != 8 or raw[3] & (_FLAG_EMPTY | _FLAG_SINGLE):
            raise SketchError("sketch bytes are not a KLL float sketch (bad preamble)")
        if raw[4] | (raw[5] << 8) != wire.k:
            raise SketchError(f"sketch bytes have another k than the {wire.k} it says")
        n = int.from_bytes(raw[8:16], "little")
        if n != wire.count or len(raw) != 32 + 4 * n:
            raise SketchError(f"sketch holds {(len(raw) - 32) // 4} values but says {wire.count}")
        if n <= _SMALL_N:  # a window's few values: plain Python beats numpy's call overhead
            small = sorted(struct.unpack_from(f"<{n}f", raw, 32))
            if not all(map(math.isfinite, small)):
                raise SketchError("sketch holds a non-finite value")
            return n, [small[min(int(q * n), n - 1)] for q in qs]
        values = np.sort(np.frombuffer(raw, dtype="<f4", count=n, offset=32))
        if not (np.isfinite(values[0]) and np.isfinite(values[-1])):  # NaN sorts last
            raise SketchError("sketch holds a non-finite value")
        return n, [float(values[min(int(q * n), n - 1)]) for q in qs]
    merger = SketchMerger(wire.k)
    merger.add_kll_bytes(raw)
    pools = [(h, np.concatenate(p)) for h, p in merger._levels.items()]
    items = np.concatenate([p for _, p in pools])
    weights = np.concatenate([np.full(p.size, 1 << h, dtype=np.int64) for h, p in pools])
    n = int(weights.sum())
    if n != wire.count:
        raise SketchError(f"sketch holds {n} values but says count {wire.count}")
    finite = np.isfinite(items)
    if not finite.all():
        raise SketchError("sketch holds a non-finite value")
    order = np.argsort(items, kind="stable")
    items, cum = items[order], np.cumsum(weights[order])
    idx = np.searchsorted(cum, np.asarray(qs, dtype=np.float64) * n, side="right")
    return n, [float(items[min(int(i), items.size - 1)]) for i in idx]
