"""The drift tests, pure: two sketches (or two class histograms) in, a `DriftResult` out.

Numeric features (KLL sketches; the two sides may have different k):

- Each sketch is read as a weighted sample: its retained items with their weights
  (``Distribution``). Its CDF is right-continuous, ``F(x) = weight(items <= x) / n``.
- KS distance ``D = max |F_ref(x) - F_cur(x)|`` over x in the union of both sketches'
  retained items. Both CDFs are step functions that jump only there, so this is the exact
  supremum of the two sketched CDFs, ties included (discrete data: both sides are evaluated
  at the same split points, so an atom of mass 0.4 at 0 is compared as 0.4 vs 0.4).
- Sketch error: ``eps = kll_floats_sketch.get_normalized_rank_error(k, False)`` (1.33% at
  k=200, 99% confidence) for a sketch in estimation mode, and 0 for one that never
  compacted (it holds every value; the bundle's baselines are such sketches).
- Effective sample size ``n_e = n*m / (n+m)``. With the Kolmogorov survival function
  ``Q(lam) = 2 * sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lam^2)``:
  ``critical_value = lam_alpha / sqrt(n_e) + eps_ref + eps_cur`` where ``Q(lam_alpha) =
  alpha``, and ``p_value = Q(sqrt(n_e) * max(0, D - eps_ref - eps_cur))``. That is: the
  part of D the sketches' own error could explain is taken away first, and what is left
  is judged as a plain two-sample KS on n and m values (asymptotic; conservative for small
  samples and for discrete data). ``p < alpha`` exactly when ``D > critical_value``.
- PSI on the reference's quantile bins: edges = the reference's quantiles at 1/B..(B-1)/B
  (deciles), duplicates dropped (atoms), bins ``(-inf, e1], (e1, e2], ..., (e_last, inf)``;
  each side's bin mass from its CDF at the edges; proportions smoothed as
  ``(p + s) / (1 + B*s)`` (s = 1e-4); ``PSI = sum (c - r) * ln(c / r)``.
- Normalized Wasserstein-1: ``W1 = mean_i |Q_ref(p_i) - Q_cur(p_i)|`` over G midpoints
  ``p_i = (i + 0.5) / G`` (G = 200), i.e. the midpoint rule for the integral of the
  quantile-function gap over (0, 1); divided by the reference's scale: IQR / 1.349 (a
  robust SD), else the SD of its quantile grid, else the range of both sides together,
  else 1 (both constant).
- Decision: ``drifted`` iff significant (p, or the BH-adjusted q over a bank, < alpha)
  AND the effect is worth telling (PSI >= psi_min or W1_norm >= w1_min).
- ``severity = max(0, D - eps_ref - eps_cur)``: the KS distance the sketch error cannot
  explain; results and devices are ranked by it.

Categorical (class histograms, exact counts): chi-square test of homogeneity on the 2 x K
table (classes empty on both sides dropped, df = K - 1), Jensen-Shannon distance (base 2,
in [0, 1]) and PSI on the class proportions; drifted iff significant AND (PSI >= psi_min
or JS >= js_min); severity = JS distance.

Nothing here raises on bad data: empty, NaN-only or small samples are "not_enough_data";
a wrong kind is "incompatible". All floats in a result are finite (JSON-safe).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from fleet.drift.config import DriftConfig
from protocol.sketch import FeatureSketch

__all__ = [
    "Distribution",
    "DriftResult",
    "Status",
    "benjamini_hochberg",
    "chi2_sf",
    "compare_histograms",
    "compare_sketches",
    "compare_to_pool",
    "kolmogorov_sf",
    "ks_critical_lambda",
    "sketch_eps",
]

Status = Literal["drifted", "stable", "not_enough_data", "incompatible"]
Kind = Literal["numeric", "categorical"]
#: caps a ratio whose denominator vanished, so results stay JSON-safe
_RATIO_CAP = 1e6


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftResult:
    """One feature's verdict, with every figure that led to it."""

    feature: str
    kind: Kind = "numeric"
    status: Status
    #: KS distance D (numeric) or the chi-square statistic (categorical)
    statistic: float | None = None
    p_value: float | None = None
    #: Benjamini-Hochberg adjusted p over the bank (equals p_value for a single test)
    q_value: float | None = None
    #: the D above which the KS test is significant at alpha (numeric only)
    critical_value: float | None = None
    psi: float | None = None
    w1_norm: float | None = None
    js_distance: float | None = None
    #: effect used for ranking: D minus sketch error (numeric), JS distance (categorical)
    severity: float = 0.0
    n_ref: int = 0
    n_cur: int = 0
    eps_ref: float = 0.0
    eps_cur: float = 0.0
    #: why the status is what it is, for people
    reason: str = ""

    @property
    def testable(self) -> bool:
        return self.p_value is not None


# -- distributions from sketches ----------------------------------------------------------


def sketch_eps(sketch: FeatureSketch) -> float:
    """The sketch's rank-error bound: 0 while it holds every value (never compacted)."""
    kll = sketch._kll  # protocol exposes no estimation-mode flag; read the KLL directly
    if kll.is_empty() or not kll.is_estimation_mode():
        return 0.0
    return float(sketch.rank_error)


@dataclass(frozen=True, slots=True)
class Distribution:
    """A sketch as a weighted sample: sorted distinct values and the CDF at each of them."""

    values: np.ndarray  # float64, sorted, distinct
    cum: np.ndarray  # F(values[i]) = weight(items <= values[i]) / n; cum[-1] == 1
    n: int
    eps: float

    @staticmethod
    def of(sketch: FeatureSketch) -> Distribution:
        """Read a non-empty sketch's retained items and weights."""
        pairs = list(sketch._kll)  # (item, weight) for every retained item
        items = np.fromiter((p[0] for p in pairs), dtype=np.float64, count=len(pairs))
        weights = np.fromiter((p[1] for p in pairs), dtype=np.float64, count=len(pairs))
        return Distribution.from_weighted(items, weights, eps=sketch_eps(sketch))

    @staticmethod
    def from_weighted(items: np.ndarray, weights: np.ndarray, *, eps: float = 0.0) -> Distribution:
        """From raw items and weights (any order, repeats allowed)."""
        values, inverse = np.unique(items, return_inverse=True)
        mass = np.bincount(inverse, weights=weights, minlength=values.size)
        total = float(mass.sum())
        cum = np.cumsum(mass) / total
        cum[-1] = 1.0
        return Distribution(values=values, cum=cum, n=round(total), eps=eps)

    def cdf(self, points: np.ndarray) -> np.ndarray:
        """F(x) = P(X <= x) at each point."""
        idx = np.searchsorted(self.values, points, side="right")
        padded = np.concatenate(([0.0], self.cum))
        return padded[idx]

    def quantile(self, ps: np.ndarray) -> np.ndarray:
        """The smallest value whose CDF reaches p (inclusive quantile)."""
        idx = np.searchsorted(self.cum, ps, side="left")
        return self.values[np.clip(idx, 0, self.values.size - 1)]


# -- reference distributions of the test statistics ---------------------------------------


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution (the KS statistic's limit)."""
    if lam <= 0.0:
        return 1.0
    if lam < 0.2:  # Q(0.2) = 1 - 3e-11: the series would converge slowly for nothing
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * lam * lam)
        total += term if j % 2 else -term
        if term < 1e-16:
            break
    return min(1.0, max(0.0, 2.0 * total))


def ks_critical_lambda(alpha: float) -> float:
    """lam_alpha with Q(lam_alpha) = alpha (bisection; Q is decreasing)."""
    lo, hi = 0.2, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if kolmogorov_sf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def _gammaincc(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series below a+1, continued fraction above)."""
    if x <= 0.0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's continued fraction (Numerical Recipes, gcf)
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def chi2_sf(stat: float, df: int) -> float:
    """P(X > stat) for a chi-square variable with ``df`` degrees of freedom."""
    if df < 1:
        return 1.0
    return _gammaincc(df / 2.0, stat / 2.0)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """BH-adjusted p-values (q-values), in the input order."""
    m = len(p_values)
    if m == 0:
        return []
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    q = np.empty(m)
    q[order] = q_sorted
    return [float(x) for x in q]


# -- numeric ------------------------------------------------------------------------------


def _finite(x: float) -> float:
    if math.isnan(x):
        return 0.0
    return max(-_RATIO_CAP, min(_RATIO_CAP, x))


def _not_enough(feature: str, ref: FeatureSketch, cur: FeatureSketch, config: DriftConfig) -> str:
    parts = []
    for side, s in (("reference", ref), ("current", cur)):
        if s.count < config.min_count:
            nan = f" ({s.nan_count} NaN/inf dropped)" if s.nan_count else ""
            parts.append(f"{side} has {s.count} finite values{nan}; need {config.min_count}")
    return "; ".join(parts)


def _psi(ref_p: np.ndarray, cur_p: np.ndarray, smoothing: float) -> float:
    b = ref_p.size
    r = (np.clip(ref_p, 0.0, None) + smoothing) / (1.0 + b * smoothing)
    c = (np.clip(cur_p, 0.0, None) + smoothing) / (1.0 + b * smoothing)
    return float(np.sum((c - r) * np.log(c / r)))


def _numeric_figures(
    ref: Distribution, cur: Distribution, config: DriftConfig
) -> tuple[float, float, float]:
    """(D, PSI, W1_norm) of two distributions."""
    points = np.union1d(ref.values, cur.values)
    d = float(np.max(np.abs(ref.cdf(points) - cur.cdf(points))))

    qs = np.arange(1, config.psi_bins) / config.psi_bins
    edges = np.unique(ref.quantile(qs))
    ref_p = np.diff(np.concatenate(([0.0], ref.cdf(edges), [1.0])))
    cur_p = np.diff(np.concatenate(([0.0], cur.cdf(edges), [1.0])))
    psi = _psi(ref_p, cur_p, config.psi_smoothing)

    grid = (np.arange(config.w1_grid) + 0.5) / config.w1_grid
    q_ref, q_cur = ref.quantile(grid), cur.quantile(grid)
    w1 = float(np.mean(np.abs(q_ref - q_cur)))
    return d, psi, w1 / _scale(ref, cur, q_ref)


def _scale(ref: Distribution, cur: Distribution, q_ref: np.ndarray) -> float:
    q25, q75 = ref.quantile(np.array([0.25, 0.75]))
    iqr = float(q75 - q25) / 1.349
    if iqr > 0.0:
        return iqr
    sd = float(np.std(q_ref))
    if sd > 0.0:
        return sd
    spread = float(max(ref.values[-1], cur.values[-1]) - min(ref.values[0], cur.values[0]))
    return spread if spread > 0.0 else 1.0


def _ks_verdict(
    *,
    feature: str,
    d: float,
    psi: float,
    w1_norm: float,
    n: int,
    m: int,
    eps_ref: float,
    eps_cur: float,
    config: DriftConfig,
) -> DriftResult:
    ne = n * m / (n + m)
    eps = eps_ref + eps_cur
    d_eff = max(0.0, d - eps)
    p = kolmogorov_sf(math.sqrt(ne) * d_eff)
    crit = ks_critical_lambda(config.alpha) / math.sqrt(ne) + eps
    result = DriftResult(
        feature=feature,
        kind="numeric",
        status="stable",
        statistic=_finite(d),
        p_value=p,
        q_value=p,
        critical_value=_finite(crit),
        psi=_finite(psi),
        w1_norm=_finite(w1_norm),
        severity=_finite(d_eff),
        n_ref=n,
        n_cur=m,
        eps_ref=eps_ref,
        eps_cur=eps_cur,
    )
    return decide(result, config)


def decide(result: DriftResult, config: DriftConfig) -> DriftResult:
    """Set status and reason from q_value and the effect sizes (after BH, call again)."""
    if result.q_value is None:
        return result
    significant = result.q_value < config.alpha
    effects = []
    if result.psi is not None and result.psi >= config.psi_min:
        effects.append(f"PSI {result.psi:.3f} >= {config.psi_min}")
    if result.w1_norm is not None and result.w1_norm >= config.w1_min:
        effects.append(f"W1_norm {result.w1_norm:.3f} >= {config.w1_min}")
    if result.js_distance is not None and result.js_distance >= config.js_min:
        effects.append(f"JS {result.js_distance:.3f} >= {config.js_min}")
    test = "KS" if result.kind == "numeric" else "chi-square"
    if significant and effects:
        status: Status = "drifted"
        reason = f"{test} q={result.q_value:.2g} < {config.alpha} and " + ", ".join(effects)
    elif significant:
        status = "stable"
        reason = f"{test} significant (q={result.q_value:.2g}) but the effect is too small"
    else:
        status = "stable"
        reason = f"{test} not significant (q={result.q_value:.2g} >= {config.alpha})"
    return replace(result, status=status, reason=reason)


def compare_sketches(
    feature: str, ref: FeatureSketch, cur: FeatureSketch, config: DriftConfig
) -> DriftResult:
    """KS (with sketch error), PSI and W1 of one numeric feature; never raises on bad data."""
    if not isinstance(ref, FeatureSketch) or not isinstance(cur, FeatureSketch):
        return DriftResult(
            feature=feature, status="incompatible", reason="both sides must be numeric sketches"
        )
    if ref.count < config.min_count or cur.count < config.min_count:
        return DriftResult(
            feature=feature,
            status="not_enough_data",
            n_ref=ref.count,
            n_cur=cur.count,
            reason=_not_enough(feature, ref, cur, config),
        )
    dr, dc = Distribution.of(ref), Distribution.of(cur)
    d, psi, w1 = _numeric_figures(dr, dc, config)
    return _ks_verdict(
        feature=feature,
        d=d,
        psi=psi,
        w1_norm=w1,
        n=ref.count,
        m=cur.count,
        eps_ref=dr.eps,
        eps_cur=dc.eps,
        config=config,
    )


def compare_to_pool(
    feature: str, part: FeatureSketch, pool: FeatureSketch, config: DriftConfig
) -> DriftResult:
    """One member (a device) against the rest of a pool that includes it.

    Sketches cannot be subtracted, but CDFs can: with w = n_part / n_pool,
    ``F_pool = w F_part + (1 - w) F_rest``, so ``F_part - F_rest = (F_part - F_pool) / (1 - w)``
    exactly. D against the rest is D against the pool divided by (1 - w); the sketch error
    is scaled the same way; n_rest = n_pool - n_part. PSI and W1 are measured against the
    pool (diluted by about (1 - w); small when the member is a small share). The result
    says "ref" for the rest of the pool and "cur" for the member.
    """
    n_rest = pool.count - part.count
    if part.count < config.min_count or n_rest < config.min_count:
        return DriftResult(
            feature=feature,
            status="not_enough_data",
            n_ref=max(0, n_rest),
            n_cur=part.count,
            reason=(
                f"member has {part.count} values and the rest {max(0, n_rest)}; "
                f"need {config.min_count} each"
            ),
        )
    dp, dpool = Distribution.of(part), Distribution.of(pool)
    d_pool, psi, w1 = _numeric_figures(dpool, dp, config)
    keep = 1.0 - part.count / pool.count
    return _ks_verdict(
        feature=feature,
        d=min(1.0, d_pool / keep),
        psi=psi,
        w1_norm=w1,
        n=n_rest,
        m=part.count,
        eps_ref=dpool.eps / keep,
        eps_cur=dp.eps / keep,
        config=config,
    )


# -- categorical --------------------------------------------------------------------------


def compare_histograms(
    feature: str, ref_counts: Sequence[int], cur_counts: Sequence[int], config: DriftConfig
) -> DriftResult:
    """Chi-square, JS distance and PSI of two class histograms (padded to one length)."""
    try:
        r = np.asarray(ref_counts, dtype=np.float64).ravel()
        c = np.asarray(cur_counts, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return DriftResult(
            feature=feature, kind="categorical", status="incompatible", reason="counts not numeric"
        )
    if (r.size and (not np.isfinite(r).all() or r.min() < 0)) or (
        c.size and (not np.isfinite(c).all() or c.min() < 0)
    ):
        return DriftResult(
            feature=feature,
            kind="categorical",
            status="incompatible",
            reason="class counts must be finite and non-negative",
        )
    size = max(r.size, c.size)
    r = np.pad(r, (0, size - r.size))
    c = np.pad(c, (0, size - c.size))
    n, m = int(r.sum()), int(c.sum())
    if n < config.min_count or m < config.min_count:
        return DriftResult(
            feature=feature,
            kind="categorical",
            status="not_enough_data",
            n_ref=n,
            n_cur=m,
            reason=f"reference has {n} and current {m} counted outputs; need {config.min_count}",
        )
    keep = (r + c) > 0
    r, c = r[keep], c[keep]
    total = r + c
    stat = 0.0
    for obs, side_n in ((r, n), (c, m)):
        expected = total * side_n / (n + m)
        stat += float(np.sum((obs - expected) ** 2 / expected))
    p = chi2_sf(stat, int(keep.sum()) - 1)
    pr, pc = r / n, c / m
    mid = 0.5 * (pr + pc)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_r = np.where(pr > 0, pr * np.log2(pr / mid), 0.0)
        kl_c = np.where(pc > 0, pc * np.log2(pc / mid), 0.0)
    js = math.sqrt(max(0.0, min(1.0, 0.5 * float(kl_r.sum() + kl_c.sum()))))
    result = DriftResult(
        feature=feature,
        kind="categorical",
        status="stable",
        statistic=_finite(stat),
        p_value=p,
        q_value=p,
        psi=_finite(_psi(pr, pc, config.psi_smoothing)),
        js_distance=js,
        severity=js,
        n_ref=n,
        n_cur=m,
    )
    return decide(result, config)
