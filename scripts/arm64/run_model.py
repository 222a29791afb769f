"""Run inputs through a bundle's model exactly as the agent would, and save the outputs.

Used for cross-architecture agreement: the same file runs inside the arm64 userland (with
the arm64 venv's python) and on the host, and the two output files are compared there.

    python run_model.py BUNDLE.efb --trust-root root.json --profile jetson-orin-nano \\
        --inputs heldout.npz:input --inputs golden.npz:in:input --out outputs.npz

It verifies the bundle (signature, files, target) and loads the artifact with the agent's
own loader and backend (agent.model.load_model), so what runs is what the agent serves.
Output file: an .npz with ``<i>:<output name>`` per --inputs (in order), plus ``meta`` (JSON
text: machine, backend, runtime versions). Needs only ``edgefleet[agent]`` installed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from agent.model import load_model
from hardware_profiles import load_profile
from protocol.bundle import BundleReader
from protocol.trust import TrustRoot

#: the agent serves small batches; run the held-out set in batches of this size
BATCH = 32


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _parse_inputs(spec: str) -> tuple[Path, str]:
    path, _, key = spec.partition(":")
    if not key:
        raise SystemExit(f"--inputs {spec!r}: want FILE.npz:KEY")
    return Path(path), key


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--trust-root", type=Path, required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--inputs", action="append", default=[], help="FILE.npz:KEY")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    with tempfile.TemporaryDirectory(prefix="run-model-") as tmp:
        verified = BundleReader(args.bundle).verify(
            TrustRoot.load(args.trust_root), profile=profile.name, extract_to=Path(tmp)
        )
        model = load_model(Path(tmp), verified.manifest, verified.sha256, profile)
        try:
            (spec,) = verified.manifest.inputs  # the digits model: one input
            arrays: dict[str, np.ndarray] = {}
            for i, item in enumerate(args.inputs):
                path, key = _parse_inputs(item)
                with np.load(path, allow_pickle=False) as npz:
                    x = np.asarray(npz[key], dtype=spec.dtype)
                chunks = [
                    model.backend.run({spec.name: x[s : s + BATCH]})
                    for s in range(0, len(x), BATCH)
                ]
                for name in chunks[0]:
                    arrays[f"{i}:{name}"] = np.concatenate([c[name] for c in chunks])
            meta = {
                "machine": platform.machine(),
                "python": platform.python_version(),
                "backend": model.backend.description,
                "runtime": verified.manifest.artifact.runtime,
                "numpy": np.__version__,
                "onnxruntime": _version("onnxruntime"),
                "ai-edge-litert": _version("ai-edge-litert"),
            }
        finally:
            model.backend.close()
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(args.out, **arrays)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
