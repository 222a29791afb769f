"""fleet.drift statistics: exact small cases, bad input, BH, the alert machine, wire decoding."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from fleet.drift.alert import AlertState, step
from fleet.drift.api import compare, compare_banks, compare_histograms, merge, sketch_of
from fleet.drift.config import DriftConfig
from fleet.drift.stats import (
    Distribution,
    benjamini_hochberg,
    chi2_sf,
    kolmogorov_sf,
    ks_critical_lambda,
    sketch_eps,
)
from fleet.drift.wire import SketchAccumulator
from protocol.errors import SketchError
from protocol.sketch import FeatureSketch

SMALL = DriftConfig(min_count=1)


def test_kolmogorov_distribution_matches_tables() -> None:
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=2e-4)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=2e-4)
    assert kolmogorov_sf(0.0) == 1.0
    assert ks_critical_lambda(0.05) == pytest.approx(1.3581, abs=1e-3)


def test_chi_square_survival_matches_tables() -> None:
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(9.210, 2) == pytest.approx(0.01, abs=1e-4)
    assert chi2_sf(21.666, 9) == pytest.approx(0.01, abs=1e-4)
    assert chi2_sf(0.0, 3) == 1.0


def test_benjamini_hochberg_known_example() -> None:
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    assert q == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert benjamini_hochberg([]) == []


def test_ks_distance_exact_on_small_samples() -> None:
    r = compare(sketch_of([1, 2, 3, 4]), sketch_of([3, 4, 5, 6]), config=SMALL)
    # F_ref(2) = 0.5, F_cur(2) = 0: D = 0.5
    assert r.statistic == pytest.approx(0.5)
    assert r.eps_ref == r.eps_cur == 0.0


def test_ks_matches_scipy_on_exact_sketches() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=150), rng.normal(0.3, 1.0, size=180)
    r = compare(sketch_of(a), sketch_of(b), config=SMALL)
    assert r.statistic == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-6)


def test_ties_identical_discrete_data_is_zero_distance() -> None:
    rng = np.random.default_rng(1)
    a = rng.poisson(2, 180).astype(float)
    r = compare(sketch_of(a), sketch_of(rng.permutation(a)), config=SMALL)
    assert r.statistic == 0.0
    assert r.status == "stable"
    assert r.psi == pytest.approx(0.0, abs=1e-12)
    assert r.w1_norm == 0.0


def test_eps_is_zero_until_the_sketch_compacts() -> None:
    exact = sketch_of(np.arange(150.0))
    big = sketch_of(np.arange(10_000.0))
    assert sketch_eps(exact) == 0.0
    assert sketch_eps(big) == pytest.approx(big.rank_error)
    r = compare(exact, big, config=SMALL)
    assert r.critical_value is not None
    assert r.critical_value > big.rank_error


def test_clear_shift_drifts_identical_does_not() -> None:
    rng = np.random.default_rng(5)
    ref = sketch_of(rng.normal(size=50_000))
    same = compare(ref, sketch_of(rng.normal(size=50_000)))
    moved = compare(ref, sketch_of(rng.normal(0.5, 1.0, size=50_000)))
    assert same.status == "stable"
    assert moved.status == "drifted"
    assert moved.w1_norm == pytest.approx(0.5, abs=0.08)
    assert moved.p_value is not None and moved.p_value < 1e-10


def test_significant_but_tiny_effect_is_not_an_alert() -> None:
    cfg = DriftConfig(min_count=1, w1_min=1.0, psi_min=10.0)
    r = compare(sketch_of(np.arange(150.0)), sketch_of(np.arange(150.0) + 40), config=cfg)
    assert r.q_value is not None and r.q_value < cfg.alpha
    assert r.status == "stable"
    assert "too small" in r.reason


@pytest.mark.parametrize(
    ("ref", "cur", "why"),
    [
        ([], list(range(300)), "0 finite"),
        ([np.nan] * 500, list(range(300)), "NaN"),
        (list(range(300)), list(range(10)), "need 200"),
    ],
)
def test_not_enough_data_never_alarms(ref: list[float], cur: list[float], why: str) -> None:
    r = compare(sketch_of(ref), sketch_of(cur))
    assert r.status == "not_enough_data"
    assert why in r.reason
    assert r.p_value is None


def test_wrong_kind_is_incompatible() -> None:
    r = compare("nope", sketch_of([1.0]))  # type: ignore[arg-type]
    assert r.status == "incompatible"


def test_different_k_compares_but_does_not_merge() -> None:
    rng = np.random.default_rng(2)
    a, b = sketch_of(rng.normal(size=5000), k=400), sketch_of(rng.normal(size=5000))
    assert compare(a, b).status == "stable"
    with pytest.raises(SketchError):
        merge([a, b])
    assert merge([b, sketch_of([1.0, 2.0])]).count == 5002


def test_distribution_cdf_and_quantile() -> None:
    d = Distribution.from_weighted(np.array([3.0, 1.0, 1.0, 2.0]), np.ones(4))
    assert d.cdf(np.array([0.0, 1.0, 1.5, 3.0])).tolist() == [0.0, 0.5, 0.5, 1.0]
    assert d.quantile(np.array([0.25, 0.5, 0.51, 1.0])).tolist() == [1.0, 1.0, 2.0, 3.0]


def test_histograms() -> None:
    same = compare_histograms([300, 300, 400], [300, 300, 400, 0])
    assert same.status == "stable" and same.js_distance == pytest.approx(0.0)
    moved = compare_histograms([1000, 1000, 1000], [2000, 500, 500])
    assert moved.status == "drifted"
    assert compare_histograms([10, 10], [300, 300]).status == "not_enough_data"
    assert compare_histograms([-1, 500], [300, 300]).status == "incompatible"


def test_bank_missing_features_bh_and_order() -> None:
    rng = np.random.default_rng(9)
    ref = {f"f{i}": sketch_of(rng.normal(size=3000)) for i in range(4)}
    cur = {f"f{i}": sketch_of(rng.normal(size=3000)) for i in range(3)}
    cur["f1"] = sketch_of(rng.normal(1.0, 1.0, size=3000))
    cur["new"] = sketch_of(rng.normal(size=3000))
    report = compare_banks(ref, cur)
    statuses = {r.feature: r.status for r in report.results}
    assert statuses == {
        "f0": "stable",
        "f1": "drifted",
        "f2": "stable",
        "f3": "not_enough_data",
        "new": "incompatible",
    }
    assert report.results[0].feature == "f1"
    assert report.tested == 3 and report.drift_share == pytest.approx(1 / 3)
    f1 = report.results[0]
    assert f1.q_value is not None and f1.p_value is not None and f1.q_value >= f1.p_value
    assert report.to_dict()["drifted"] == ["f1"]


def test_alert_needs_consecutive_windows_and_ignores_unknown() -> None:
    s = AlertState()
    kw = {"consecutive": 2, "resolve_after": 2}
    s, t = step(s, "drifted", **kw)
    assert t is None and not s.firing
    s, t = step(s, "unknown", **kw)
    assert t is None
    s, t = step(s, "drifted", **kw)
    assert t == "fired" and s.firing
    s, t = step(s, "stable", **kw)
    assert t == "still_firing"
    s, t = step(s, "stable", **kw)
    assert t == "resolved" and not s.firing
    s, t = step(s, "drifted", **kw)
    s, t = step(s, "stable", **kw)
    s, t = step(s, "drifted", **kw)
    assert t is None  # the streak restarted


def test_accumulator_merges_small_and_compacted_sketches() -> None:
    rng = np.random.default_rng(4)
    acc = SketchAccumulator()
    values = []
    for n in (1, 60, 200, 3000, 500, 500):
        v = rng.normal(size=n).astype(np.float32)
        values.append(v)
        assert acc.add_wire(FeatureSketch.of(v).to_wire().model_dump())
    merged = acc.sketch()
    allv = np.sort(np.concatenate(values))
    assert merged.count == allv.size and acc.windows == 6
    assert merged.min == allv[0] and merged.max == allv[-1]
    for q in (-1.0, 0.0, 0.5, 1.5):
        exact = np.searchsorted(allv, q, side="right") / allv.size
        assert abs(merged.rank(q) - exact) < 0.02


def test_accumulator_rejects_lies() -> None:
    wire = FeatureSketch.of(np.arange(50.0)).to_wire().model_dump()
    raw = bytearray(base64.b64decode(wire["data"]))
    acc = SketchAccumulator()
    assert not acc.add_wire({**wire, "count": 49})  # says 49, holds 50
    assert not acc.add_wire({**wire, "data": base64.b64encode(bytes(raw[:-4])).decode()})
    assert not acc.add_wire({**wire, "data": "!!"})
    assert not acc.add_wire({**wire, "k": 100})
    assert acc.rejected == 4 and acc.windows == 0
    raw[40:44] = np.float32(np.nan).tobytes()  # a NaN item is counted as NaN, not sketched
    assert acc.add_wire({**wire, "data": base64.b64encode(bytes(raw)).decode()})
    merged = acc.sketch()
    assert merged.count == 49 and merged.nan_count == 1
