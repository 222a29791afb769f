"""`edgefleet compile` as a real process: stdout, exit codes, no tracebacks, no partial files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.signing import generate_signing_key, save_signing_key

pytestmark = pytest.mark.integration

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"
# The lead's edgefleet/cli.py mounts this same app; calling it directly keeps the test
# independent of that file.
CLI = [sys.executable, "-c", "from compiler.cli import app; app()"]


def _run(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
        env={**os.environ, **env},
        check=False,
    )


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "release.pem"
    save_signing_key(generate_signing_key(), path)
    return path


def _args(key: Path, out: Path, model: Path = DIGITS / "model.onnx") -> list[str]:
    return [
        str(model),
        "--profile",
        "x86-cpu",
        "--calibration",
        str(DIGITS / "calibration.npz"),
        "--heldout",
        str(DIGITS / "heldout.npz"),
        "--key",
        str(key),
        "--out",
        str(out),
        "--model-name",
        "digits",
        "--latency-runs",
        "3",
    ]


def test_json_summary_and_reproducible_sha(tmp_path: Path, key: Path) -> None:
    first = _run([*_args(key, tmp_path / "a"), "--json"], tmp_path, SOURCE_DATE_EPOCH="1735689600")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["ok"] and summary["precision"] == "int8" and summary["reproducible"]
    assert summary["verification"]["passed"]
    bundle = Path(summary["bundle"])
    assert bundle.name == "digits-v1-x86-cpu.efb" and bundle.is_file()
    second = _run(
        [*_args(key, tmp_path / "b"), "--quiet"], tmp_path, SOURCE_DATE_EPOCH="1735689600"
    )
    assert second.returncode == 0, second.stderr
    path, sha = second.stdout.split()
    assert Path(path).name == bundle.name and sha == summary["sha256"]


def test_errors_are_one_clear_line_without_traceback(tmp_path: Path, key: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 not a model")
    res = _run(_args(key, tmp_path / "out", model=bad), tmp_path)
    assert res.returncode == 1
    assert "is not an ONNX model" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_gate_refusal_exits_3_with_json_figures(tmp_path: Path, key: Path) -> None:
    res = _run([*_args(key, tmp_path / "out"), "--min-snr-db", "90", "--json"], tmp_path)
    assert res.returncode == 3, res.stderr
    payload = json.loads(res.stdout)
    assert payload["error"] == "gate_refused" and not payload["verification"]["passed"]
    assert not (tmp_path / "out").exists()
