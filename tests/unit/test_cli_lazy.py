"""The one CLI imports only the part that runs: an agent must not load the fleet's stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ["fastapi", "sqlmodel", "uvicorn", "onnx", "onnxruntime", "torch", "ai_edge_litert"]


def _modules_after(argv: list[str]) -> set[str]:
    code = (
        "import sys, json\n"
        "from edgefleet.cli import build_app\n"
        f"argv = {argv!r}\n"
        "try:\n"
        "    build_app(argv)(args=argv, prog_name='edgefleet', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_root_help_imports_no_part() -> None:
    mods = _modules_after(["--help"])
    assert not [m for m in HEAVY if m in mods]
    assert "agent" not in mods and "fleet" not in mods and "compiler" not in mods


def test_keys_command_needs_only_protocol(tmp_path: Path) -> None:
    mods = _modules_after(["keys", "init", "--out", str(tmp_path / "k")])
    assert (tmp_path / "k" / "trust-root.json").exists()
    assert not [m for m in HEAVY if m in mods]
    assert "fleet" not in mods and "compiler" not in mods


@pytest.mark.parametrize("part", ["agent"])
def test_agent_help_does_not_load_fleet_or_compiler(part: str) -> None:
    mods = _modules_after([part, "--help"])
    assert "fleet" not in mods and "compiler" not in mods
    assert "fastapi" not in mods and "sqlmodel" not in mods and "onnx" not in mods
