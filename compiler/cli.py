"""`edgefleet compile`: a Typer app with one command (so it acts as the command itself)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True)

#: exit codes: 1 any compile error, 3 refused by the accuracy gate
EXIT_ERROR = 1
EXIT_GATE = 3


class Method(StrEnum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class PrecisionChoice(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class _RichProgress:
    """Progress bars on stderr (stdout stays for results)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._console = console
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        self._progress.start()

    def stage(self, text: str) -> None:
        self._console.log(text)

    def task(self, text: str, total: int) -> Callable[[int], None]:
        tid = self._progress.add_task(text, total=total)
        return lambda n: self._progress.advance(tid, n)

    def done(self) -> None:
        self._progress.stop()


def _parse_created_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)",
            param_hint="--created-at",
        ) from exc


@app.command("compile")
def compile_command(
    model: Annotated[Path, typer.Argument(help="Float ONNX model to compile.")],
    profile: Annotated[str, typer.Option(help="Hardware profile name or .toml path.")],
    calibration: Annotated[
        Path, typer.Option(help="Calibration data: .npz keyed by input name, or a dir of .npy.")
    ],
    heldout: Annotated[
        Path, typer.Option(help="Held-out data for verification (optional 'label' key).")
    ],
    key: Annotated[
        Path,
        typer.Option(help="Release signing key (PEM; passphrase from EDGEFLEET_KEY_PASSPHRASE)."),
    ],
    out: Annotated[Path, typer.Option(help="Directory for the bundle file.")],
    model_name: Annotated[str | None, typer.Option(help="Default: the model file's stem.")] = None,
    model_version: Annotated[int, typer.Option(min=1)] = 1,
    description: Annotated[str, typer.Option()] = "",
    expires_days: Annotated[int, typer.Option(min=1)] = 90,
    created_at: Annotated[
        str | None,
        typer.Option(help="Creation time (ISO 8601); default SOURCE_DATE_EPOCH, else now."),
    ] = None,
    precision: Annotated[
        PrecisionChoice | None, typer.Option(help="Default: the profile's preferred precision.")
    ] = None,
    calibration_method: Annotated[Method, typer.Option()] = Method.minmax,
    per_channel: Annotated[
        bool | None, typer.Option("--per-channel/--per-tensor", help="Default: the profile's.")
    ] = None,
    reduce_range: Annotated[
        bool, typer.Option(help="7-bit weights (AVX2 CPUs without VNNI).")
    ] = False,
    exclude_node: Annotated[
        list[str] | None, typer.Option(help="Keep this node in float (repeatable).")
    ] = None,
    max_top1_drop: Annotated[
        float | None, typer.Option(help="Gate: max top-1 drop in points (default: profile).")
    ] = None,
    min_snr_db: Annotated[
        float | None, typer.Option(help="Gate: min output SNR in dB (default: profile).")
    ] = None,
    auto: Annotated[
        bool, typer.Option(help="Try alternatives; keep the smallest artifact within budget.")
    ] = False,
    sensitivity: Annotated[bool, typer.Option(help="Rank nodes by quantization error.")] = False,
    class_names: Annotated[
        str | None, typer.Option(help="Comma-separated class names for the manifest.")
    ] = None,
    latency_runs: Annotated[int, typer.Option(min=0, help="0 skips host latency.")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only path and sha256.")] = False,
) -> None:
    """Quantize/convert MODEL for a hardware profile, verify it, and write a signed bundle."""
    from rich.console import Console
    from rich.markup import escape

    from compiler.errors import CompileError, GateRefusedError
    from compiler.pipeline import CompileOptions, NullProgress, compile_model
    from compiler.report import render_result, verification_table

    out_console = Console()
    err_console = Console(stderr=True, log_path=False)
    options = CompileOptions(
        model_path=model,
        profile=profile,
        calibration_path=calibration,
        heldout_path=heldout,
        key_path=key,
        out_dir=out,
        model_name=model_name,
        model_version=model_version,
        description=description,
        expires_days=expires_days,
        created_at=_parse_created_at(created_at),
        precision=precision.value if precision else None,
        calibration_method=calibration_method.value,
        per_channel=per_channel,
        reduce_range=reduce_range,
        exclude_nodes=tuple(exclude_node or ()),
        max_top1_drop_points=max_top1_drop,
        min_snr_db=min_snr_db,
        auto=auto,
        sensitivity=sensitivity,
        class_names=tuple(c.strip() for c in class_names.split(",")) if class_names else (),
        latency_runs=latency_runs,
    )
    show_progress = not (json_out or quiet) and sys.stderr.isatty()
    progress = _RichProgress(err_console) if show_progress else NullProgress()
    try:
        result = compile_model(options, progress=progress)
    except CompileError as exc:
        progress.done()
        if json_out:
            payload: dict[str, Any] = {"ok": False, "error": exc.code, "message": str(exc)}
            if isinstance(exc, GateRefusedError):
                payload["verification"] = exc.report.model_dump(mode="json")
            typer.echo(json.dumps(payload, indent=2, sort_keys=True))
        else:
            if isinstance(exc, GateRefusedError) and not quiet:
                err_console.print(verification_table(exc.report))
            # Messages hold shapes (float32[?, 1, 8, 8]): escaped, or rich eats them as markup.
            err_console.print(f"[red]error[/]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_GATE if isinstance(exc, GateRefusedError) else EXIT_ERROR) from None
    if json_out:
        typer.echo(json.dumps({"ok": True, **result.summary()}, indent=2, sort_keys=True))
        return
    if not quiet:
        render_result(result, out_console)
    typer.echo(f"{result.bundle_path} {result.sha256}")
