"""`make demo` is the main job: it must tell the whole story and leave nothing running."""

from __future__ import annotations

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
    assert "serving_v1: 4" in out.stdout
    # The summary is honest: every device serves v1 and has counted inferences.
    assert "devices: 4" in out.stdout
    logs = tmp_path / "run" / "logs"
    assert {p.stem for p in logs.glob("*.log")} >= {"mosquitto", "fleet", "demo-x86-00"}
