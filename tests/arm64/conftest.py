"""The arm64 tests' marker, registered here until pyproject lists it."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``arm64`` marker (the suite runs with --strict-markers)."""
    config.addinivalue_line(
        "markers",
        "arm64: runs the agent in an arm64 Debian userland under qemu (make test-arm64)",
    )
