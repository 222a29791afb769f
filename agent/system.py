"""Readings of the device itself: battery, CPU temperature, load and memory.

Everything comes from sysfs/procfs under configurable roots (tests point them at a fake
tree). A value that cannot be read is None, never a guess: a device without a battery
reports no battery, not a full one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from protocol.messages import BatteryReading

__all__ = ["SystemProbe", "SystemReading"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemReading:
    battery: BatteryReading | None
    cpu_temp_c: float | None
    load_1m: float | None
    mem_rss_bytes: int | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _num(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


_CHARGING = {"Charging": True, "Full": True, "Discharging": False, "Not charging": False}
# Zone types that measure the CPU/SoC, in preference order (x86, Raspberry Pi, Jetson).
_CPU_ZONES = ("x86_pkg_temp", "cpu-thermal", "cpu_thermal", "CPU-therm", "soc_thermal", "cpu")


class SystemProbe:
    """Reads the device's state from ``sysfs_root`` (/sys) and ``procfs_root`` (/proc)."""

    def __init__(self, *, sysfs_root: Path = Path("/sys"), procfs_root: Path = Path("/proc")):
        self.sysfs_root = Path(sysfs_root)
        self.procfs_root = Path(procfs_root)

    def read(self) -> SystemReading:
        """One reading of everything; each part is None when unavailable."""
        return SystemReading(
            battery=self.battery(),
            cpu_temp_c=self.cpu_temp_c(),
            load_1m=self.load_1m(),
            mem_rss_bytes=self.mem_rss_bytes(),
        )

    def battery(self) -> BatteryReading | None:
        """The first power supply of type Battery with a capacity, else None."""
        root = self.sysfs_root / "class" / "power_supply"
        try:
            supplies = sorted(root.iterdir())
        except OSError:
            return None
        for supply in supplies:
            if _read(supply / "type") != "Battery":
                continue
            capacity = _num(_read(supply / "capacity"))
            if capacity is None:
                continue
            power_uw = _num(_read(supply / "power_now"))
            return BatteryReading(
                level_pct=min(100.0, max(0.0, capacity)),
                charging=_CHARGING.get(_read(supply / "status") or ""),
                power_w=None if power_uw is None else power_uw / 1e6,
            )
        return None

    def cpu_temp_c(self) -> float | None:
        """The CPU/SoC thermal zone in degrees C (hottest zone when none is named CPU)."""
        zones: dict[str, float] = {}
        for zone in sorted((self.sysfs_root / "class" / "thermal").glob("thermal_zone*")):
            milli = _num(_read(zone / "temp"))
            if milli is not None:
                zones[_read(zone / "type") or zone.name] = milli / 1000.0
        for kind in _CPU_ZONES:
            for name, value in zones.items():
                if name.lower().startswith(kind.lower()):
                    return value
        return max(zones.values()) if zones else None

    def load_1m(self) -> float | None:
        try:
            return os.getloadavg()[0]
        except OSError:
            return None

    def mem_rss_bytes(self) -> int | None:
        fields = (_read(self.procfs_root / "self" / "statm") or "").split()
        if len(fields) < 2 or not fields[1].isdigit():
            return None
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
