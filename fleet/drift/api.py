"""The public drift API: build and merge sketches, compare features, banks and histograms.

Pure (numpy + protocol): usable from a notebook, the fleet service or a rollout gate.

    >>> from fleet.drift.api import sketch_of, compare
    >>> r = compare(sketch_of(ref_values), sketch_of(cur_values))
    >>> r.status, r.statistic, r.p_value, r.psi, r.w1_norm

See `fleet.drift.stats` for the exact formulas and `fleet.drift.config` for the defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from numpy.typing import ArrayLike

from fleet.drift.config import DriftConfig
from fleet.drift.stats import (
    DriftResult,
    benjamini_hochberg,
    compare_sketches,
    decide,
)
from fleet.drift.stats import compare_histograms as _compare_histograms
from protocol.errors import SketchError
from protocol.sketch import DEFAULT_K, FeatureSketch

__all__ = [
    "DriftConfig",
    "DriftReport",
    "DriftResult",
    "compare",
    "compare_banks",
    "compare_histograms",
    "finalize",
    "merge",
    "sketch_of",
]

_ORDER = {"drifted": 0, "stable": 1, "not_enough_data": 2, "incompatible": 3}


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftReport:
    """Per-feature results of one comparison, BH-adjusted, most severe first."""

    results: tuple[DriftResult, ...]
    alpha: float
    #: features with a p-value (enough data on both sides, compatible)
    tested: int
    drifted: tuple[str, ...]
    #: drifted / tested (0 when nothing could be tested)
    drift_share: float
    #: the largest severity among drifted features, else among tested ones
    max_severity: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """ "drifted" if any feature drifted, "stable" if any was tested, else "not_enough_data"."""
        if self.drifted:
            return "drifted"
        return "stable" if self.tested else "not_enough_data"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (every float is finite)."""
        return {
            "status": self.status,
            "alpha": self.alpha,
            "tested": self.tested,
            "drifted": list(self.drifted),
            "drift_share": self.drift_share,
            "max_severity": self.max_severity,
            "results": [_result_dict(r) for r in self.results],
            **self.extra,
        }


def _result_dict(r: DriftResult) -> dict[str, Any]:
    return {name: getattr(r, name) for name in DriftResult.__slots__}


def sketch_of(values: ArrayLike, *, k: int = DEFAULT_K) -> FeatureSketch:
    """A KLL sketch of ``values`` (NaN and inf are counted, not sketched)."""
    return FeatureSketch.of(values, k=k)


def merge(sketches: Iterable[FeatureSketch]) -> FeatureSketch:
    """One sketch of the union; every sketch must share k (SketchError otherwise)."""
    items = list(sketches)
    ks = {s.k for s in items}
    if len(ks) > 1:
        raise SketchError(
            f"cannot merge sketches with different k {sorted(ks)}; compare them instead "
            "(comparison works across k)"
        )
    out = FeatureSketch(ks.pop() if ks else DEFAULT_K)
    for s in items:
        out.merge(s)
    return out


def compare(
    ref: FeatureSketch,
    cur: FeatureSketch,
    *,
    feature: str = "value",
    config: DriftConfig | None = None,
    alpha: float | None = None,
) -> DriftResult:
    """Compare one numeric feature (a single test: q_value == p_value)."""
    cfg = _config(config, alpha)
    return compare_sketches(feature, ref, cur, cfg)


def compare_histograms(
    ref_counts: Sequence[int],
    cur_counts: Sequence[int],
    *,
    feature: str = "classes",
    config: DriftConfig | None = None,
    alpha: float | None = None,
) -> DriftResult:
    """Compare two class histograms (chi-square, JS distance, PSI)."""
    return _compare_histograms(feature, ref_counts, cur_counts, _config(config, alpha))


def compare_banks(
    ref: Mapping[str, FeatureSketch],
    cur: Mapping[str, FeatureSketch],
    *,
    config: DriftConfig | None = None,
    alpha: float | None = None,
) -> DriftReport:
    """Compare every feature of two banks; BH over the tested ones at alpha.

    A feature only in ``cur`` is "incompatible" (the reference never saw it); one only in
    ``ref`` is "not_enough_data" (nothing arrived for it).
    """
    cfg = _config(config, alpha)
    results = []
    for name in sorted(set(ref) | set(cur)):
        if name not in ref:
            results.append(
                DriftResult(
                    feature=name,
                    status="incompatible",
                    n_cur=cur[name].count,
                    reason="the reference has no such feature",
                )
            )
        elif name not in cur:
            results.append(
                DriftResult(
                    feature=name,
                    status="not_enough_data",
                    n_ref=ref[name].count,
                    reason="no current data for this feature",
                )
            )
        else:
            results.append(compare_sketches(name, ref[name], cur[name], cfg))
    return finalize(results, cfg)


def finalize(results: Iterable[DriftResult], config: DriftConfig) -> DriftReport:
    """Apply Benjamini-Hochberg over the testable results, decide, sort, summarize."""
    items = list(results)
    idx = [i for i, r in enumerate(items) if r.p_value is not None]
    qs = benjamini_hochberg([items[i].p_value for i in idx])  # type: ignore[misc]
    for i, q in zip(idx, qs, strict=True):
        items[i] = decide(replace(items[i], q_value=q), config)
    items.sort(key=lambda r: (_ORDER[r.status], -r.severity, r.feature))
    drifted = tuple(r.feature for r in items if r.status == "drifted")
    tested = len(idx)
    pool = [r.severity for r in items if r.status == "drifted"] or [items[i].severity for i in idx]
    return DriftReport(
        results=tuple(items),
        alpha=config.alpha,
        tested=tested,
        drifted=drifted,
        drift_share=len(drifted) / tested if tested else 0.0,
        max_severity=max(pool, default=0.0),
    )


def _config(config: DriftConfig | None, alpha: float | None) -> DriftConfig:
    cfg = config or DriftConfig()
    return cfg if alpha is None else replace(cfg, alpha=alpha)
