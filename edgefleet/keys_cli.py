"""`edgefleet keys`: release keys and the trust root (the release engineer's side)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from protocol.errors import ProtocolError
from protocol.signing import generate_signing_key, load_signing_key, save_signing_key
from protocol.trust import TrustRoot

__all__ = ["app", "init_keys"]

app = typer.Typer(help="Release keys and the trust root.", no_args_is_help=True)
_err = Console(stderr=True)

ROOT_KEY = "root.key"
RELEASE_KEY = "release.key"
TRUST_ROOT = "trust-root.json"


def _passphrase() -> bytes | None:
    value = os.environ.get("EDGEFLEET_KEY_PASSPHRASE")
    return value.encode() if value else None


def init_keys(out: Path, *, root_days: int = 365, reuse: bool = False) -> Path:
    """Create root.key, release.key and a trust root signed by the root key in `out`.

    With reuse=True an existing complete set is kept as it is (used by `make demo`).
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / ROOT_KEY, out / RELEASE_KEY, out / TRUST_ROOT]
    if all(p.exists() for p in paths) and reuse:
        TrustRoot.load(out / TRUST_ROOT)  # still valid?
        return out / TRUST_ROOT
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ProtocolError(f"refusing to overwrite existing key material: {existing}")
    passphrase = _passphrase()
    root, release = generate_signing_key(), generate_signing_key()
    save_signing_key(root, out / ROOT_KEY, passphrase)
    save_signing_key(release, out / RELEASE_KEY, passphrase)
    trust = TrustRoot.create(
        root_keys=[root],
        release_keys=[release],
        expires_at=datetime.now(UTC).replace(microsecond=0) + timedelta(days=root_days),
    )
    tmp = out / f".{TRUST_ROOT}.tmp"
    tmp.write_bytes(trust.raw)
    os.replace(tmp, out / TRUST_ROOT)
    return out / TRUST_ROOT


@app.command("init")
def init_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory for the keys and trust root.")],
    root_days: Annotated[int, typer.Option(help="Days until the trust root expires.")] = 365,
    reuse: Annotated[bool, typer.Option(help="Keep an existing complete key set.")] = False,
) -> None:
    """Make a root key, a release key and a trust root (passphrase: EDGEFLEET_KEY_PASSPHRASE)."""
    try:
        trust_path = init_keys(out, root_days=root_days, reuse=reuse)
        root = TrustRoot.load(trust_path)
    except ProtocolError as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"trust root: {trust_path} (version {root.version})")
    typer.echo(f"release key: {out / RELEASE_KEY}  (keep it on the release machine only)")
    for kid in root.release_keys():
        typer.echo(f"release key id: {kid}")


@app.command("show")
def show_cmd(
    trust: Annotated[Path, typer.Option("--trust", help="Trust-root file.")],
) -> None:
    """Print a trust root's keys, roles and expiry."""
    try:
        root = TrustRoot.load(trust)
    except ProtocolError as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    doc = root.document
    typer.echo(f"version {doc.version}, expires {doc.expires_at.isoformat()}")
    for role, spec in doc.roles.items():
        typer.echo(f"{role}: threshold {spec.threshold} of {len(spec.keyids)}")
        for kid in spec.keyids:
            mark = " (revoked)" if kid in doc.revoked_keyids else ""
            typer.echo(f"  {kid}{mark}")


@app.command("check")
def check_cmd(
    key: Annotated[Path, typer.Option("--key", help="Private key file.")],
) -> None:
    """Check that a private key file loads; print its key id."""
    try:
        k = load_signing_key(key, _passphrase())
    except ProtocolError as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(k.keyid)
