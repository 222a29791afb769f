"""Thresholds of the drift tests: one frozen value, passed down.

Defaults and why:

- ``alpha = 0.01``: the Benjamini-Hochberg false-discovery level over one window's features.
- ``min_count = 200`` values per side: below that the asymptotic KS/chi-square p-values and
  the decile bins of PSI are too coarse to say anything; the result is "not_enough_data".
- ``psi_min = 0.1``: the usual "moderate shift" line for PSI.
- ``w1_min = 0.05``: a shift of the distribution by 5% of the reference's (robust) standard
  deviation. Significance alone fires on trivial shifts once windows hold 1e5+ values; the
  effect gate says a shift must also be worth an operator's time. 0.05 (not Evidently's 0.1)
  so that a 0.1-SD shift, which sits exactly on 0.1, is caught reliably.
- ``js_min = 0.05``: Jensen-Shannon distance (base 2, in [0, 1]) for class histograms.
- ``consecutive = 2``: windows in a row that must drift before an alert fires;
  ``resolve_after = 2`` stable windows in a row resolve it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DriftConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftConfig:
    """What counts as drift; see the module docstring for the defaults' reasons."""

    alpha: float = 0.01
    min_count: int = 200
    psi_min: float = 0.1
    w1_min: float = 0.05
    js_min: float = 0.05
    #: PSI bins: reference quantiles at 1/bins, 2/bins, ... (deciles by default)
    psi_bins: int = 10
    #: added to every bin's proportion before the log (then renormalized)
    psi_smoothing: float = 1e-4
    #: midpoints on p in (0, 1) used to integrate |Q_ref(p) - Q_cur(p)|
    w1_grid: int = 200
    consecutive: int = 2
    resolve_after: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}")
        if self.min_count < 1 or self.psi_bins < 2 or self.w1_grid < 2:
            raise ValueError("min_count >= 1, psi_bins >= 2 and w1_grid >= 2 are required")
        if self.consecutive < 1 or self.resolve_after < 1:
            raise ValueError("consecutive and resolve_after must be at least 1")
