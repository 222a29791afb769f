"""A small run of benchmarks/fuzz.py in the suite: decoders, bundle reader and REST API.

The full run (``.venv/bin/python benchmarks/fuzz.py``, ~100,000 cases) is the benchmark;
this one (~1,000 cases) keeps the harness and the properties it checks from rotting.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fuzz():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("edgefleet_fuzz", ROOT / "benchmarks" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_untrusted_input_never_crashes(fuzz, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.CRITICAL)
    tallies = fuzz.run(1_000)
    assert {t.name for t in tallies} >= {
        "decode_message",
        "decode_command",
        "parse_manifest",
        "trust_root",
        "bundle_reader",
        "rest_api",
    }
    for t in tallies:
        assert t.seed_accepted, f"{t.name}: the valid seed was refused (harness broken?)"
        assert t.cases > 0 and t.rejected > 0, t
        assert t.crashes == 0, f"{t.name}: {t.crashes} crashes, e.g.\n" + "\n".join(t.examples)
