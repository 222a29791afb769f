"""The shared sketch encoding: exact counts, NaNs apart, merges, and refusal of bad bytes."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import SketchError
from protocol.features import FeatureExtractor, FeatureSpec
from protocol.sketch import FeatureSketch, SketchBank, SketchWire


def test_counts_min_max_and_nans() -> None:
    s = FeatureSketch.of([1.0, 2.0, np.nan, np.inf, 3.0])
    assert s.count == 3
    assert s.nan_count == 2
    assert (s.min, s.max) == (1.0, 3.0)


def test_wire_round_trip_preserves_quantiles() -> None:
    rng = np.random.default_rng(0)
    s = FeatureSketch.of(rng.normal(size=10_000))
    w = s.to_wire()
    back = FeatureSketch.from_wire(SketchWire.model_validate_json(w.model_dump_json()))
    assert back.count == 10_000
    for q in (0.01, 0.5, 0.99):
        assert back.quantile(q) == s.quantile(q)
    assert len(w.data) < 4 * 1024  # a few KB per feature per window


def test_merge_equals_union() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=5000), rng.normal(loc=3, size=5000)
    sa, sb = FeatureSketch.of(a), FeatureSketch.of(b)
    sa.merge(sb)
    assert sa.count == 10_000
    true_median = float(np.median(np.r_[a, b]))
    # KLL k=200 rank error ~1.3%: the merged median lies within a few percent in rank.
    assert abs(sa.rank(true_median) - 0.5) < 0.03


def test_empty_sketch_wire() -> None:
    w = FeatureSketch().to_wire()
    assert w.count == 0 and w.data == ""
    assert FeatureSketch.from_wire(w).empty
    with pytest.raises(SketchError):
        FeatureSketch().quantile(0.5)


def test_corrupt_sketches_are_refused() -> None:
    w = FeatureSketch.of(np.arange(100.0)).to_wire()
    with pytest.raises(SketchError, match="base64"):
        FeatureSketch.from_wire(w.model_copy(update={"data": "!!!"}))
    with pytest.raises(SketchError):
        FeatureSketch.from_wire(w.model_copy(update={"data": "AAAA"}))
    with pytest.raises(SketchError, match="count"):
        FeatureSketch.from_wire(w.model_copy(update={"count": 5}))
    with pytest.raises(SketchError):
        FeatureSketch(200).merge(FeatureSketch(100))


def test_bank_updates_per_feature() -> None:
    bank = SketchBank(["a", "b"])
    bank.update_rows(np.array([[1, 10], [2, 20], [3, np.nan]]))
    wires = bank.to_wire()
    assert wires["a"].count == 3 and wires["b"].count == 2 and wires["b"].nan_count == 1
    with pytest.raises(SketchError, match="columns"):
        bank.update_rows(np.zeros((2, 3)))
    other = SketchBank.from_wire(wires)
    other.merge(bank)
    assert other.sketches["a"].count == 6


def test_feature_specs_direct_and_summary() -> None:
    small = FeatureSpec.for_input("input", (1, 8, 8))
    assert small.mode == "direct" and len(small.names) == 64
    rows = FeatureExtractor(small)(np.zeros((5, 1, 8, 8)))
    assert rows.shape == (5, 64)
    big = FeatureSpec.for_input("image", (3, 32, 32), projection_dim=8, seed=7)
    assert big.mode == "summary" and len(big.names) == 3 + 3 + 8
    x = np.random.default_rng(0).random((4, 3, 32, 32))
    r1, r2 = FeatureExtractor(big)(x), FeatureExtractor(big)(x)
    assert r1.shape == (4, 14)
    np.testing.assert_array_equal(r1, r2)  # same seed, same projection on both sides
    with pytest.raises(SketchError, match="shape"):
        FeatureExtractor(big)(np.zeros((4, 3, 16, 16)))
    # the projection is float32 end to end (a float64 matrix made every flush an 8x
    # slower float64 matmul) and agrees with the float64 arithmetic to float32 precision
    ex = FeatureExtractor(big)
    assert ex._proj is not None and ex._proj.dtype == np.float32 and r1.dtype == np.float32
    proj64 = np.random.default_rng(7).standard_normal((3 * 32 * 32, 8)) / np.sqrt(3 * 32 * 32)
    want = x.reshape(4, -1).astype(np.float32).astype(np.float64) @ proj64
    np.testing.assert_allclose(r1[:, 6:], want, rtol=1e-4, atol=1e-5)


def test_mutated_sketch_bytes_never_crash_the_process() -> None:
    # The C++ binding segfaulted on mutated bytes before protocol/sketch.py checked the
    # layout itself; sketches come from devices, so this must hold for any bytes.
    import base64
    import random

    from protocol.errors import SketchError

    rng = random.Random(7)
    sources = [FeatureSketch.of(np.random.default_rng(n).normal(size=n)) for n in (1, 50, 5000)]
    for _ in range(3000):
        src = rng.choice(sources)
        wire = src.to_wire()
        raw = bytearray(base64.b64decode(wire.data))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        bad = wire.model_copy(update={"data": base64.b64encode(bytes(raw)).decode()})
        try:
            s = FeatureSketch.from_wire(bad)
        except SketchError:
            continue
        s.merge(src)
        s.quantile(0.5)
