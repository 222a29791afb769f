"""`make demo` is the main job: it must tell the whole story and leave nothing running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet.demo",
            "--no-wait",
            "--out",
            str(tmp_path),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    # The story's outcomes, as the demo's summary records them.
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["v2_rollouts"] == {
        "x86": "completed",
        "rpi5": "completed",
        "jetson": "completed",
    }
    assert summary["v3_rollout"] == "rolled_back"
    assert summary["drift_named"] == ["demo-rpi5-00", "demo-rpi5-01"]
    assert summary["ota_rollback"] == "demo-jetson-00"
    assert summary["devices"] == summary["online"] == 12
    logs = tmp_path / "run" / "logs"
    assert {p.stem for p in logs.glob("*.log")} >= {"mosquitto", "fleet", "demo-x86-00"}
