"""Rich renderings of a compile: the verification table (also used by `bundle inspect`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from compiler.pipeline import Attempt, CompileResult
    from compiler.sensitivity import NodeSensitivity
    from protocol.manifest import BundleManifest, VerificationReport

__all__ = [
    "attempts_table",
    "manifest_verification_table",
    "render_result",
    "sensitivity_table",
    "verification_table",
]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def verification_table(report: VerificationReport, *, title: str = "Verification") -> Table:
    """The artifact-vs-float figures of a manifest's `verification`, one row per output."""
    from rich.markup import escape
    from rich.table import Table

    status = "[green]passed[/]" if report.passed else "[red]refused[/]"
    gate = ", ".join(f"{k}={v:g}" for k, v in sorted(report.gate.items()))
    caption = [f"{report.samples} held-out samples; gate {gate or '-'}: {status}"]
    if report.float_top1_accuracy is not None:
        caption.append(
            f"top-1 accuracy float {report.float_top1_accuracy:.4f} -> artifact "
            f"{_fmt(report.artifact_top1_accuracy, '.4f')} "
            f"(drop {_fmt(report.top1_drop_points, '.2f')} points)"
        )
    if report.runtime:
        caption.append(f"run on {escape(report.runtime)}")
    # Notes quote ORT and shapes ("float32[?, 8]"): escaped, or rich reads them as markup.
    caption.extend(escape(n) for n in report.notes)
    table = Table(title=title, caption="\n".join(caption), caption_justify="left")
    table.add_column("output")
    table.add_column("samples", justify="right")
    table.add_column("top-1 agreement", justify="right")
    table.add_column("max |err|", justify="right")
    table.add_column("mean |err|", justify="right")
    table.add_column("SNR dB", justify="right")
    for c in report.outputs:
        table.add_row(
            c.output,
            str(c.samples),
            _fmt(c.top1_agreement, ".4f"),
            f"{c.max_abs_error:.4g}",
            f"{c.mean_abs_error:.4g}",
            _fmt(c.snr_db, ".1f"),
        )
    return table


def manifest_verification_table(manifest: BundleManifest) -> Table | None:
    """The verification table of a bundle's manifest (None if it carries no report)."""
    if manifest.verification is None:
        return None
    return verification_table(
        manifest.verification,
        title=f"{manifest.model.name} v{manifest.model.version} on {manifest.profile} "
        f"({manifest.artifact.precision}, {manifest.artifact.runtime})",
    )


def attempts_table(attempts: Sequence[Attempt]) -> Table:
    from rich.table import Table

    table = Table(title="Attempts (--auto)")
    for col in ("attempt", "precision", "config", "bytes", "drop pts", "min SNR dB", "result"):
        table.add_column(col)
    for a in attempts:
        result = "[green]pass[/]" if a.passed else "[red]fail[/]"
        if a.chosen:
            result += " (kept)"
        table.add_row(
            a.label,
            a.precision,
            a.description,
            str(a.size_bytes),
            _fmt(a.top1_drop_points, ".2f"),
            _fmt(a.min_snr_db, ".1f"),
            result,
        )
    return table


def sensitivity_table(rows: Sequence[NodeSensitivity]) -> Table:
    from rich.table import Table

    mode = rows[0].mode if rows else "only"
    what = "only this node quantized" if mode == "only" else "all but this node quantized"
    table = Table(title=f"Per-node sensitivity ({what}; worst first)")
    for col in ("node", "op", "min SNR dB", "max |err|", "top-1 agreement"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.node,
            r.op_type,
            f"{r.min_snr_db:.1f}",
            f"{r.max_abs_error:.4g}",
            _fmt(r.top1_agreement, ".4f"),
        )
    return table


def render_result(result: CompileResult, console: Any) -> None:
    """Print everything a person wants after a compile."""
    m = result.manifest
    if m.verification is not None:
        console.print(manifest_verification_table(m))
    if len(result.attempts) > 1:
        console.print(attempts_table(result.attempts))
    if result.sensitivity:
        console.print(sensitivity_table(result.sensitivity))
    from rich.markup import escape

    for issue in result.op_issues:
        console.print(
            f"[yellow]{issue.severity}[/]: "
            + escape(f"{issue.node} ({issue.op_type}): {issue.reason}")
        )
    h = result.host_figures
    line = (
        f"size {h['float_bytes']} -> {h['artifact_bytes']} bytes (x{h['size_ratio']}), "
        f"{h['parameter_count']} parameters"
    )
    if "artifact_latency_ms_median" in h:
        line += (
            f"; host latency (median of {h['latency_runs']}, batch 1, "
            f"{h.get('latency_threads', h['threads'])} threads) "
            f"float {h['float_latency_ms_median']:.3f} ms, artifact "
            f"{h['artifact_latency_ms_median']:.3f} ms"
        )
    console.print(line)
