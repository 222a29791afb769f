"""The on-device self-test: run the bundle's golden inputs and compare with its outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.errors import AgentError
from agent.model import LoadedModel

__all__ = ["SelfTestResult", "compare_golden", "run_self_test"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfTestResult:
    passed: bool
    detail: str


def compare_golden(
    expected: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    *,
    atol: float,
    rtol: float,
    min_top1_match: float | None,
) -> SelfTestResult:
    """Pure comparison: every output within atol/rtol, and top-1 agreement (classifiers)."""
    problems: list[str] = []
    notes: list[str] = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"output {name!r} missing")
            continue
        if got.shape != want.shape:
            problems.append(f"output {name!r} shape {list(got.shape)} != {list(want.shape)}")
            continue
        g, w = got.astype(np.float64), want.astype(np.float64)
        err = np.abs(g - w)
        ok = err <= atol + rtol * np.abs(w)
        if not ok.all():
            problems.append(
                f"output {name!r}: {int((~ok).sum())}/{ok.size} values outside atol={atol} "
                f"rtol={rtol} (max abs error {float(err.max()):.3g})"
            )
        if min_top1_match is not None and w.ndim == 2 and w.shape[1] > 1:
            match = float(np.mean(g.argmax(axis=1) == w.argmax(axis=1)))
            notes.append(f"{name} top-1 match {match:.3f}")
            if match < min_top1_match:
                problems.append(
                    f"output {name!r}: top-1 matches on {match:.1%} of golden samples; "
                    f"needs {min_top1_match:.1%}"
                )
    if problems:
        return SelfTestResult(passed=False, detail="; ".join(problems))
    return SelfTestResult(passed=True, detail=", ".join(notes) or "outputs within tolerance")


def run_self_test(model: LoadedModel) -> SelfTestResult:
    """Run the golden pairs (or, without any, one smoke inference on zeros)."""
    m = model.manifest
    if m.golden is None:
        zeros = {
            s.name: np.zeros(
                [1 if not isinstance(d, int) or d < 0 else d for d in s.shape], dtype=s.dtype
            )
            for s in m.inputs
        }
        try:
            out = model.backend.run(zeros)
        except AgentError as exc:
            return SelfTestResult(passed=False, detail=f"smoke inference failed: {exc}")
        bad = [k for k, v in out.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            return SelfTestResult(passed=False, detail=f"non-finite outputs {bad} on zeros")
        return SelfTestResult(passed=True, detail="no golden pairs in bundle; smoke test only")
    try:
        with np.load(model.directory / m.golden.path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        return SelfTestResult(passed=False, detail=f"golden file unreadable: {exc}")
    inputs = {s.name: data.get(f"in:{s.name}") for s in m.inputs}
    expected = {s.name: data.get(f"out:{s.name}") for s in m.outputs}
    absent = [f"in:{k}" for k, v in inputs.items() if v is None]
    absent += [f"out:{k}" for k, v in expected.items() if v is None]
    if absent:
        return SelfTestResult(passed=False, detail=f"golden file lacks keys {absent}")
    try:
        actual = model.backend.run({k: v for k, v in inputs.items() if v is not None})
    except AgentError as exc:
        return SelfTestResult(passed=False, detail=f"golden inference failed: {exc}")
    return compare_golden(
        {k: v for k, v in expected.items() if v is not None},
        actual,
        atol=m.golden.atol,
        rtol=m.golden.rtol,
        min_top1_match=m.golden.min_top1_match,
    )
