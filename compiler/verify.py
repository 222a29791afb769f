"""Verification: the artifact against the float model on held-out samples, and the gate.

The comparison and the gate are pure functions over arrays; running models is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compiler.data import iter_batches
from compiler.model import TensorInfo
from compiler.target import Runner
from protocol.manifest import OutputCheck, VerificationReport

__all__ = [
    "MAX_SNR_DB",
    "Gate",
    "GateResult",
    "batch_size_for",
    "build_report",
    "evaluate_gate",
    "is_classifier_output",
    "run_all",
    "snr_db",
]

#: Identical outputs have infinite SNR, which JSON cannot spell: report this cap instead.
MAX_SNR_DB = 200.0
_DEFAULT_BATCH = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Gate:
    """The accuracy budget an artifact must stay within."""

    max_top1_drop_points: float
    min_snr_db: float

    def as_dict(self) -> dict[str, float]:
        return {"max_top1_drop_points": self.max_top1_drop_points, "min_snr_db": self.min_snr_db}


@dataclass(frozen=True, slots=True, kw_only=True)
class GateResult:
    passed: bool
    #: one line per breach, with the figures
    reasons: tuple[str, ...]


def _sig(x: float, digits: int = 6) -> float:
    # Rounded figures keep the manifest readable and stable against last-bit noise.
    return float(f"{x:.{digits}g}")


def batch_size_for(inputs: Sequence[TensorInfo]) -> tuple[int, bool]:
    """(batch size, pad?) to run a model: its fixed batch axis if it has one, else 64."""
    for t in inputs:
        if t.shape and isinstance(t.shape[0], int):
            return t.shape[0], True
    return _DEFAULT_BATCH, False


def run_all(
    runner: Runner,
    inputs: Mapping[str, np.ndarray],
    model_inputs: Sequence[TensorInfo],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Run every sample through `runner` in batches; outputs concatenated per output."""
    size, pad = batch_size_for(model_inputs)
    count = int(next(iter(inputs.values())).shape[0])
    chunks: list[list[np.ndarray]] = []
    for feed in iter_batches(inputs, size, pad=pad):
        outs = runner(feed)
        if not chunks:
            chunks = [[] for _ in outs]
        for i, o in enumerate(outs):
            chunks[i].append(o)
        if on_batch is not None:
            on_batch(min(size, count))
    return [np.concatenate(c)[:count] for c in chunks]


def is_classifier_output(arr: np.ndarray) -> bool:
    """[N, C] floats with C >= 2: treated as class scores (logits or probabilities)."""
    return arr.ndim == 2 and arr.shape[1] >= 2 and arr.dtype.kind == "f"


def snr_db(reference: np.ndarray, test: np.ndarray) -> float | None:
    """Signal-to-noise ratio of `test` against `reference`, in dB (capped at MAX_SNR_DB)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - test.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if signal == 0.0:
        return None
    if noise == 0.0:
        return MAX_SNR_DB
    return min(MAX_SNR_DB, 10.0 * math.log10(signal / noise))


def build_report(
    float_outputs: Sequence[np.ndarray],
    artifact_outputs: Sequence[np.ndarray],
    outputs: Sequence[TensorInfo],
    *,
    labels: np.ndarray | None,
    gate: Gate,
    runtime: str,
    notes: Sequence[str] = (),
) -> tuple[VerificationReport, GateResult]:
    """Compare per output, then apply the gate; returns the report (with passed) and reasons."""
    checks: list[OutputCheck] = []
    float_acc = art_acc = drop = None
    agreement_first: float | None = None
    for info, f, a in zip(outputs, float_outputs, artifact_outputs, strict=True):
        f64 = f.astype(np.float64)
        diff = np.abs(f64 - a.astype(np.float64))
        agreement = None
        if is_classifier_output(f):
            agreement = float(np.mean(f.argmax(axis=1) == a.argmax(axis=1)))
            if agreement_first is None:
                agreement_first = agreement
                if labels is not None:
                    float_acc = float(np.mean(f.argmax(axis=1) == labels))
                    art_acc = float(np.mean(a.argmax(axis=1) == labels))
                    drop = (float_acc - art_acc) * 100.0
        snr = snr_db(f, a)
        checks.append(
            OutputCheck(
                output=info.name,
                samples=int(f.shape[0]) if f.ndim else 1,
                top1_agreement=None if agreement is None else _sig(agreement),
                max_abs_error=_sig(float(diff.max()) if diff.size else 0.0),
                mean_abs_error=_sig(float(diff.mean()) if diff.size else 0.0),
                snr_db=None if snr is None else _sig(snr, 5),
            )
        )
    result = evaluate_gate(checks, drop_points=drop, agreement=agreement_first, gate=gate)
    all_notes = list(notes)
    if drop is None and agreement_first is not None:
        all_notes.append(
            "no held-out labels: the top-1 gate used disagreement with the float model "
            "(an upper bound on the accuracy drop)"
        )
    report = VerificationReport(
        samples=int(float_outputs[0].shape[0]) if float_outputs else 0,
        outputs=tuple(checks),
        float_top1_accuracy=None if float_acc is None else _sig(float_acc),
        artifact_top1_accuracy=None if art_acc is None else _sig(art_acc),
        top1_drop_points=None if drop is None else _sig(drop, 4),
        gate=gate.as_dict(),
        passed=result.passed,
        runtime=runtime,
        notes=tuple(all_notes),
    )
    return report, result


def evaluate_gate(
    checks: Sequence[OutputCheck],
    *,
    drop_points: float | None,
    agreement: float | None,
    gate: Gate,
) -> GateResult:
    """Pure gate: top-1 drop (or disagreement without labels) and every output's SNR."""
    reasons: list[str] = []
    if drop_points is not None:
        if drop_points > gate.max_top1_drop_points:
            reasons.append(
                f"top-1 accuracy drops {drop_points:.2f} points; the budget is "
                f"{gate.max_top1_drop_points:.2f}"
            )
    elif agreement is not None:
        disagreement = (1.0 - agreement) * 100.0
        if disagreement > gate.max_top1_drop_points:
            reasons.append(
                f"top-1 disagrees with the float model on {disagreement:.2f}% of held-out "
                f"samples; the budget is {gate.max_top1_drop_points:.2f} points"
            )
    for c in checks:
        if c.snr_db is not None and c.snr_db < gate.min_snr_db:
            reasons.append(
                f"output {c.output!r} SNR is {c.snr_db:.1f} dB; the minimum is "
                f"{gate.min_snr_db:.1f} dB"
            )
    return GateResult(passed=not reasons, reasons=tuple(reasons))
