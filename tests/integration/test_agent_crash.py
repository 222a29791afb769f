"""Crash safety, proven the hard way: SIGKILL the agent process at crash points and random
times during installs (20 trials of benchmarks/crash_stress.py), restart it, and check it
serves a verified model and tells the fleet a consistent story."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.crash_stress import run

pytestmark = pytest.mark.integration


def test_sigkill_during_installs_never_bricks(tmp_path: Path) -> None:
    res = run(20, seed=7, work=tmp_path / "crash")
    assert res["failed"] == 0, res["failures"]
    assert res["killed"] >= 10  # most trials really died mid-install
    # every trial ends on a verified model: the old one or the new one, never nothing
    assert all(k.startswith(("old", "new")) for k in res["outcomes"])
