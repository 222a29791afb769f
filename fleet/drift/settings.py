"""The drift service's settings (``EDGEFLEET_DRIFT_*``), read once where the fleet starts."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.drift.config import DriftConfig

__all__ = ["DriftSettings"]


class DriftSettings(BaseSettings):
    """The drift service inside the fleet process (``EDGEFLEET_DRIFT_*``)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_DRIFT_", frozen=True, extra="ignore")

    #: run the background loop (tiling + alert evaluation) at all
    enabled: bool = True
    #: seconds between loop ticks; the first tick comes one interval after start
    interval_s: float = Field(default=60.0, gt=0.0)
    #: tile width: device windows are merged into tiles of this many seconds
    tile_s: int = Field(default=60, ge=1, le=86_400)
    #: alert windows: tumbling, non-overlapping, a multiple of tile_s
    alert_window_s: int = Field(default=600, ge=1)
    #: default sliding window of the REST report
    report_window_s: int = Field(default=3600, ge=1)
    #: telemetry rows younger than this are left for the next tick (late commits)
    tile_grace_s: float = Field(default=5.0, ge=0.0)
    #: rows read per tiling batch
    tile_batch_rows: int = Field(default=2000, ge=1)
    alpha: float = Field(default=0.01, gt=0.0, lt=1.0)
    min_count: int = Field(default=200, ge=1)
    psi_min: float = Field(default=0.1, ge=0.0)
    w1_min: float = Field(default=0.05, ge=0.0)
    js_min: float = Field(default=0.05, ge=0.0)
    consecutive: int = Field(default=2, ge=1)
    resolve_after: int = Field(default=2, ge=1)

    def config(self) -> DriftConfig:
        """The pure tests' thresholds."""
        return DriftConfig(
            alpha=self.alpha,
            min_count=self.min_count,
            psi_min=self.psi_min,
            w1_min=self.w1_min,
            js_min=self.js_min,
            consecutive=self.consecutive,
            resolve_after=self.resolve_after,
        )
