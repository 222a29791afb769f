"""`edgefleet bundle`: inspect and verify bundle files (needs only protocol/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.bundle import BundleReader, file_sha256
from protocol.errors import ProtocolError
from protocol.manifest import BundleManifest
from protocol.trust import TrustRoot

__all__ = ["app", "render_manifest"]

app = typer.Typer(help="Inspect and verify bundles.", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True)


def render_manifest(m: BundleManifest, sha256: str, console: Console) -> None:
    """Print a manifest and its verification report for a person."""
    console.print(f"[bold]{m.model.name}[/bold] v{m.model.version} for [bold]{m.profile}[/bold]")
    console.print(f"bundle sha256 {sha256}")
    a = m.artifact
    console.print(
        f"artifact {a.path}: {a.format}, {a.precision}, runtime {a.runtime}, "
        f"providers {list(a.execution_providers) or '-'}"
    )
    console.print(f"created {m.created_at.isoformat()}  expires {m.expires_at.isoformat()}")
    files = Table(title="files", show_edge=False)
    for col in ("path", "role", "bytes", "sha256"):
        files.add_column(col)
    for f in m.files:
        files.add_row(f.path, f.role, f"{f.size:,}", f.sha256[:16])
    console.print(files)
    sig = Table(title="signature", show_edge=False)
    for col in ("", "name", "dtype", "shape"):
        sig.add_column(col)
    for t in m.inputs:
        sig.add_row("in", t.name, t.dtype, str(list(t.shape)))
    for t in m.outputs:
        sig.add_row("out", t.name, t.dtype, str(list(t.shape)))
    console.print(sig)
    v = m.verification
    if v is not None:
        rep = Table(title=f"verification ({v.samples} held-out samples, {v.runtime})")
        for col in ("output", "top-1 agree", "max |err|", "mean |err|", "SNR dB"):
            rep.add_column(col, justify="right")
        for o in v.outputs:
            rep.add_row(
                o.output,
                "-" if o.top1_agreement is None else f"{o.top1_agreement:.2%}",
                f"{o.max_abs_error:.4g}",
                f"{o.mean_abs_error:.4g}",
                "-" if o.snr_db is None else f"{o.snr_db:.1f}",
            )
        console.print(rep)
        if v.float_top1_accuracy is not None:
            console.print(
                f"top-1 accuracy: float {v.float_top1_accuracy:.2%}, artifact "
                f"{v.artifact_top1_accuracy:.2%}, drop {v.top1_drop_points:.2f} points"
            )
        for note in v.notes:
            console.print(f"note: {escape(note)}")
        console.print(f"gate {v.gate}: {'[green]passed' if v.passed else '[red]failed'}")
    if m.quantization:
        console.print(f"quantization: {json.dumps(m.quantization, sort_keys=True)[:400]}")
    if m.host_figures:
        console.print(f"host figures: {json.dumps(m.host_figures, sort_keys=True)[:400]}")


@app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="Bundle file (.efb).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print a bundle's manifest and report (signatures are not checked: use verify)."""
    try:
        reader = BundleReader(file)
        manifest = reader.unverified_manifest()
    except ProtocolError as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    sha = file_sha256(file)
    if as_json:
        typer.echo(
            json.dumps({"sha256": sha, "manifest": manifest.model_dump(mode="json")}, indent=2)
        )
    else:
        render_manifest(manifest, sha, _out)


@app.command("verify")
def verify_cmd(
    file: Annotated[Path, typer.Argument(help="Bundle file (.efb).")],
    trust: Annotated[Path, typer.Option("--trust", help="Trust-root file.")],
    profile: Annotated[
        str | None, typer.Option(help="Also require the bundle to target this profile.")
    ] = None,
) -> None:
    """Verify signatures, expiry, target and every file's hash; exit 1 when it fails."""
    try:
        root = TrustRoot.load(trust)
        verified = BundleReader(file).verify(root, profile=profile)
    except ProtocolError as exc:
        _err.print(f"[red]verification failed ({exc.code}):[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    m = verified.manifest
    typer.echo(
        f"OK {m.model.name} v{m.model.version} for {m.profile}: signatures, expiry and "
        f"{len(m.files)} file hashes verified; sha256 {verified.sha256}"
    )
