"""`edgefleet keys`: release keys and the trust root (the release engineer's side).

    keys init        root key, release key, trust root version 1
    keys add         a new release key; root N+1 signed by the current root keys
    keys revoke      a key id may never sign again; root N+1
    keys rotate-root new root keys; root N+1 signed by the old AND the new root keys

Every new root is written to ``trust-root.json`` and kept as ``roots/<N>.root.json``: the
fleet (``POST /api/v1/trust-root``) and devices walk that chain one version at a time.
Private keys stay in this directory (optionally encrypted with EDGEFLEET_KEY_PASSPHRASE);
the fleet server never holds one.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from protocol.errors import ProtocolError
from protocol.signing import (
    SigningKey,
    generate_signing_key,
    load_signing_key,
    save_signing_key,
)
from protocol.trust import TrustRoot

__all__ = ["add_release_key", "app", "init_keys", "revoke_key", "rotate_root"]

app = typer.Typer(help="Release keys and the trust root.", no_args_is_help=True)
_err = Console(stderr=True)

ROOT_KEY = "root.key"
RELEASE_KEY = "release.key"
TRUST_ROOT = "trust-root.json"
ROOTS_DIR = "roots"


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
    _write_root(out, trust)
    return out / TRUST_ROOT


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_root(out: Path, trust: TrustRoot) -> Path:
    """Keep root N as roots/N.root.json (the chain) and make it the current trust-root.json."""
    (out / ROOTS_DIR).mkdir(exist_ok=True)
    _atomic_write(out / ROOTS_DIR / f"{trust.version}.root.json", trust.raw)
    _atomic_write(out / TRUST_ROOT, trust.raw)
    return out / TRUST_ROOT


def _expiry(days: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


def _root_signers(keys_dir: Path, root_keys: list[Path] | None) -> list[SigningKey]:
    paths = root_keys or [keys_dir / ROOT_KEY]
    return [load_signing_key(p, _passphrase()) for p in paths]


def add_release_key(
    keys_dir: Path,
    *,
    new_key: Path | None = None,
    root_keys: list[Path] | None = None,
    root_days: int = 365,
) -> tuple[TrustRoot, SigningKey]:
    """Add a release key (made at ``new_key``, or loaded if that file exists); root N+1."""
    current = TrustRoot.load(keys_dir / TRUST_ROOT)
    target = new_key or keys_dir / f"release-v{current.version + 1}.key"
    if target.exists():
        key = load_signing_key(target, _passphrase())
    else:
        key = generate_signing_key()
        save_signing_key(key, target, _passphrase())
    new = current.successor(
        signers=_root_signers(keys_dir, root_keys),
        expires_at=_expiry(root_days),
        add_release=[key.public],
    )
    _write_root(keys_dir, new)
    return new, key


def revoke_key(
    keys_dir: Path, keyid: str, *, root_keys: list[Path] | None = None, root_days: int = 365
) -> TrustRoot:
    """Revoke a key id (a prefix of 8+ hex digits is enough when unique); root N+1."""
    current = TrustRoot.load(keys_dir / TRUST_ROOT)
    matches = [k for k in current.document.keys if k.startswith(keyid.lower())]
    if len(keyid) < 8 or len(matches) != 1:
        raise ProtocolError(
            f"key id {keyid!r} matches {len(matches)} keys of the root; give 8+ hex digits "
            "of exactly one (see `edgefleet keys show`)"
        )
    new = current.successor(
        signers=_root_signers(keys_dir, root_keys),
        expires_at=_expiry(root_days),
        revoke=matches,
    )
    _write_root(keys_dir, new)
    return new


def rotate_root(
    keys_dir: Path,
    *,
    root_keys: list[Path] | None = None,
    new_root_key: Path | None = None,
    root_days: int = 365,
) -> TrustRoot:
    """Replace the root key; root N+1 is signed by the old and the new root keys."""
    current = TrustRoot.load(keys_dir / TRUST_ROOT)
    target = new_root_key or keys_dir / f"root-v{current.version + 1}.key"
    if target.exists():
        fresh = load_signing_key(target, _passphrase())
    else:
        fresh = generate_signing_key()
        save_signing_key(fresh, target, _passphrase())
    new = current.successor(
        signers=_root_signers(keys_dir, root_keys),
        expires_at=_expiry(root_days),
        new_root_keys=[fresh],
    )
    _write_root(keys_dir, new)
    # the default root key name now means the new key; the old one is kept beside it
    if new_root_key is None and not root_keys:
        old = keys_dir / ROOT_KEY
        os.replace(old, keys_dir / f"root-v{current.version}.key")
        os.replace(target, old)
    return new


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
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
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
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
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
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    typer.echo(k.keyid)


KeysDir = Annotated[
    Path, typer.Option("--dir", help="Key directory (from `keys init`): trust-root.json, keys.")
]
RootKeys = Annotated[
    list[Path] | None,
    typer.Option("--root-key", help="Current root key file (repeat for a threshold)."),
]
RootDays = Annotated[int, typer.Option(help="Days until the new trust root expires.")]


def _report(root: TrustRoot, keys_dir: Path) -> None:
    typer.echo(
        f"trust root version {root.version} written to {keys_dir / TRUST_ROOT} "
        f"(and {keys_dir / ROOTS_DIR / f'{root.version}.root.json'})"
    )
    typer.echo(
        "install it on the fleet: curl -X POST -H 'Authorization: Bearer $TOKEN' "
        "--data-binary @trust-root.json $FLEET/api/v1/trust-root  (the fleet pushes it to devices)"
    )


@app.command("add")
def add_cmd(
    keys_dir: KeysDir,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Release key file to add (created if it does not exist)."),
    ] = None,
    root_key: RootKeys = None,
    root_days: RootDays = 365,
) -> None:
    """Add a release key: trust root N+1, signed by the current root keys."""
    try:
        root, new = add_release_key(keys_dir, new_key=key, root_keys=root_key, root_days=root_days)
    except ProtocolError as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    typer.echo(f"added release key {new.keyid}")
    _report(root, keys_dir)


@app.command("revoke")
def revoke_cmd(
    keyid: Annotated[str, typer.Argument(help="Key id (or a unique prefix of 8+ hex digits).")],
    keys_dir: KeysDir,
    root_key: RootKeys = None,
    root_days: RootDays = 365,
) -> None:
    """Revoke a key: trust root N+1 in which it can sign nothing."""
    try:
        root = revoke_key(keys_dir, keyid, root_keys=root_key, root_days=root_days)
    except ProtocolError as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    typer.echo(f"revoked {keyid}")
    _report(root, keys_dir)


@app.command("rotate-root")
def rotate_root_cmd(
    keys_dir: KeysDir,
    root_key: RootKeys = None,
    new_root_key: Annotated[
        Path | None,
        typer.Option("--new-root-key", help="New root key file (created if it does not exist)."),
    ] = None,
    root_days: RootDays = 365,
) -> None:
    """Replace the root key: trust root N+1, signed by the old AND the new root keys."""
    try:
        root = rotate_root(
            keys_dir, root_keys=root_key, new_root_key=new_root_key, root_days=root_days
        )
    except ProtocolError as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    typer.echo(f"root keys now {sorted(root.document.roles['root'].keyids)}")
    _report(root, keys_dir)
