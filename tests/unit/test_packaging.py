"""The agent install stays small: `pip install edgefleet[agent]` pulls no server or compiler.

The closure is computed from installed distributions' metadata (the project is installed
editable with its dev extra, which holds every other extra), evaluating markers per extra.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

PROJECT = "edgefleet"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
AGENT_FORBIDDEN = ("fastapi", "sqlmodel", "uvicorn", "starlette", "onnx", "torch")


def _applies(marker: Marker | None, extras: frozenset[str]) -> bool:
    if marker is None:
        return True
    # The base requirements are evaluated with no extra; each requested extra in turn.
    return any(marker.evaluate({"extra": extra}) for extra in {"", *extras})


def requirement_closure(
    name: str, extras: frozenset[str] = frozenset()
) -> tuple[set[NormalizedName], set[NormalizedName]]:
    """(installed distributions pulled by ``name[extras]``, required ones not installed)."""
    done: dict[NormalizedName, frozenset[str]] = {}
    missing: set[NormalizedName] = set()
    queue = [(canonicalize_name(name), extras)]
    while queue:
        key, wanted = queue.pop()
        if key in done and wanted <= done[key]:
            continue
        done[key] = done.get(key, frozenset()) | wanted
        try:
            requires = distribution(key).requires or []
        except PackageNotFoundError:
            missing.add(key)
            continue
        for line in requires:
            requirement = Requirement(line)
            if _applies(requirement.marker, wanted):
                queue.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return set(done) - missing, missing


def _closure_or_fail(extras: frozenset[str]) -> set[NormalizedName]:
    pulled, missing = requirement_closure(PROJECT, extras)
    if missing:
        pytest.fail(
            f"cannot see the whole closure of {PROJECT}{sorted(extras)}: not installed: "
            f"{sorted(missing)}; run `make venv` (pip install -e '.[dev]')"
        )
    return pulled


def test_installed_metadata_matches_pyproject() -> None:
    """Guard against a stale editable install, which would make the checks below lie."""
    declared = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    expected = {str(Requirement(line)) for line in declared["dependencies"]}
    for extra, lines in declared["optional-dependencies"].items():
        for line in lines:
            requirement = Requirement(line)
            marker = f'extra == "{extra}"'
            if requirement.marker is not None:
                marker = f"({requirement.marker}) and {marker}"
            requirement.marker = Marker(marker)
            expected.add(str(requirement))
    installed = {str(Requirement(line)) for line in distribution(PROJECT).requires or []}
    assert installed == expected, (
        "the installed edgefleet metadata differs from pyproject.toml: run `make venv`"
    )


def test_agent_extra_pulls_no_server_or_compiler_dependencies() -> None:
    pulled = _closure_or_fail(frozenset({"agent"}))
    assert {"paho-mqtt", "onnxruntime", "numpy", "pydantic"} <= pulled
    forbidden = sorted(pulled & {canonicalize_name(n) for n in AGENT_FORBIDDEN})
    assert not forbidden, f"edgefleet[agent] would install {forbidden}: {sorted(pulled)}"


def test_fleet_extra_does_pull_fastapi() -> None:
    """The check above can fail: the closure does see the server's dependencies."""
    pulled = _closure_or_fail(frozenset({"fleet"}))
    assert {"fastapi", "starlette", "uvicorn", "sqlmodel"} <= pulled


def test_base_install_is_lean() -> None:
    pulled = _closure_or_fail(frozenset())
    heavy = {"onnxruntime", "paho-mqtt", "fastapi", "onnx", "torch"}
    assert not pulled & heavy, sorted(pulled & heavy)


def test_wheel_ships_every_subpackage_and_profile(tmp_path: Path) -> None:
    """A wheel (what a device installs) must hold every package the source tree has."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(root), "-w", str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("edgefleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    parts = ("edgefleet", "protocol", "compiler", "agent", "fleet", "hardware_profiles")
    expected = {
        str(p.relative_to(root))
        for part in parts
        for p in (root / part).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert expected <= names, sorted(expected - names)
    profiles = {p.name for p in (root / "hardware_profiles").glob("*.toml")}
    assert {f"hardware_profiles/{n}" for n in profiles} <= names
