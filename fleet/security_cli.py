"""``edgefleet fleet enroll | revoke | token | audit | broker-config | trust-root``.

Registered on `fleet.cli.app`. Commands that talk to a running fleet use the standard-
library client (token from ``--token`` or $EDGEFLEET_TOKEN); the bootstrap commands
(``token create --db``, ``audit verify --db``, ``broker-config``) work on the database or on
files directly and import the fleet's stack only when they run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet.client import FleetClient, FleetClientError

__all__ = ["audit_app", "register", "token_app", "trust_app"]

DEFAULT_FLEET_URL = "http://127.0.0.1:8080"

FleetUrl = Annotated[
    str,
    typer.Option("--fleet", envvar="EDGEFLEET_FLEET_URL", help="Base URL of the fleet service."),
]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="API bearer token.", show_default=False),
]
DbUrl = Annotated[
    str,
    typer.Option(
        "--db", envvar="EDGEFLEET_FLEET_DATABASE_URL", help="Database URL (works without a server)."
    ),
]

token_app = typer.Typer(help="API tokens (roles: viewer, operator, admin).", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
trust_app = typer.Typer(help="The fleet's trust root.", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def enroll(
    device: Annotated[str, typer.Option("--device", help="Device id (its MQTT user name).")],
    profile: Annotated[str, typer.Option("--profile", help="The device's hardware profile.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the agent's --credentials file here (mode 0600)."),
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Device tag (repeat).")] = None,
    certificate: Annotated[
        bool, typer.Option("--certificate", help="Also issue a client certificate (mTLS).")
    ] = False,
    fleet: FleetUrl = DEFAULT_FLEET_URL,
    token: Token = None,
) -> None:
    """Enroll a device: its broker identity (admin). The password is shown/written once."""
    try:
        result = FleetClient(fleet, token=token).enroll(
            device, profile=profile, tags=tag or [], certificate=certificate
        )
    except FleetClientError as exc:
        raise _fail(str(exc)) from None
    if out is None:
        typer.echo(json.dumps(result, indent=2))
        return
    creds = {"username": result["username"], "password": result["password"]}
    _write_private(out, json.dumps(creds).encode())
    if result.get("certificate_pem"):
        _write_private(out.with_suffix(".key"), result["private_key_pem"].encode())
        out.with_suffix(".crt").write_text(result["certificate_pem"])
        out.with_suffix(".ca.pem").write_text(result["ca_pem"])
    typer.echo(
        f"enrolled {device}; credentials in {out} (mode 0600): agent run --credentials {out}"
    )


def revoke(
    device: Annotated[str, typer.Option("--device", help="Device id.")],
    fleet: FleetUrl = DEFAULT_FLEET_URL,
    token: Token = None,
) -> None:
    """Revoke a device's identity (admin); the broker disconnects it on reload."""
    try:
        result = FleetClient(fleet, token=token).revoke_device(device)
    except FleetClientError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(result, indent=2))


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")],
    name: Annotated[str, typer.Option("--name", help="Who holds it (shown in the audit log).")],
    db: Annotated[
        str | None,
        typer.Option("--db", help="Create it directly in this database (bootstrap the admin)."),
    ] = None,
    fleet: FleetUrl = DEFAULT_FLEET_URL,
    token: Token = None,
) -> None:
    """Create an API token; prints it once (only its sha256 is stored)."""
    if db is not None:
        from sqlmodel import Session

        from fleet.auth import create_token
        from fleet.errors import FleetError

        engine = _engine(db)
        try:
            with Session(engine) as session:
                _row, secret = create_token(session, name=name, role=role, created_by="cli")
        except (FleetError, ValueError) as exc:
            raise _fail(str(exc), 2) from None
        finally:
            engine.dispose()
        typer.echo(secret)
        return
    try:
        result = FleetClient(fleet, token=token).create_token(name, role)
    except FleetClientError as exc:
        raise _fail(str(exc)) from None
    typer.echo(result["token"])


def _engine(db: str) -> Any:
    from fleet.db import make_engine, migrate
    from fleet.settings import FleetSettings

    url = FleetSettings._database_url_ok(db)  # the same URL rules as `serve`
    engine = make_engine(url)
    # The schema's owner is the migration history, here as in `serve`: a database this
    # command creates first (the first admin token, before the fleet ever ran) must be one
    # `serve` accepts, with every table of this version.
    migrate(engine)
    return engine


@audit_app.command("verify")
def audit_verify(db: DbUrl) -> None:
    """Recompute the audit chain; exit 1 and name the first bad row if it was tampered with."""
    from sqlmodel import Session

    from fleet.audit import verify_chain

    engine = _engine(db)
    try:
        with Session(engine) as session:
            report = verify_chain(session)
    finally:
        engine.dispose()
    if not report.ok:
        typer.echo(
            f"TAMPERED: {report.problem} (first bad row {report.first_bad_seq}; "
            f"{report.rows} rows verified before it)",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"OK: {report.rows} rows, head hash {report.head_hash}")


def broker_config(
    out: Annotated[Path, typer.Option("--out", help="Directory for the broker's files.")],
    port: Annotated[int, typer.Option("--port", help="MQTT listener port.")] = 1883,
    host: Annotated[str, typer.Option("--host", help="Listen address.")] = "127.0.0.1",
    tls_port: Annotated[
        int | None, typer.Option("--tls-port", help="Also a TLS listener requiring client certs.")
    ] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="Fleet database: include its enrolled devices.")
    ] = None,
) -> None:
    """Write mosquitto.conf, passwd, acl and the fleet's service credentials into --out."""
    from fleet.broker_config import TlsFiles, write_broker_config

    hashes: dict[str, str] = {}
    if db is not None:
        from sqlmodel import Session, select

        from fleet.enroll import DeviceIdentity

        engine = _engine(db)
        try:
            with Session(engine) as session:
                rows = session.exec(select(DeviceIdentity)).all()
                hashes = {r.device_id: r.password_hash for r in rows if r.revoked_at is None}
        finally:
            engine.dispose()
    tls = None
    if tls_port is not None:
        from fleet.enroll import CertificateAuthority

        ca = CertificateAuthority(out / "ca")
        cert, key, _ = ca.issue(host, server_names=(host, "localhost"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "server.crt").write_bytes(cert)
        _write_private(out / "server.key", key)
        tls = TlsFiles(
            port=tls_port,
            cafile=ca.cert_path,
            certfile=out / "server.crt",
            keyfile=out / "server.key",
        )
    files, creds = write_broker_config(out, port=port, host=host, tls=tls, device_hashes=hashes)
    typer.echo(f"broker config: {files.conf}")
    typer.echo(f"start it:      mosquitto -c {files.conf}")
    typer.echo(
        f"fleet account: {files.service_credentials} (user {creds['username']}); serve with "
        f"EDGEFLEET_FLEET_MQTT_USERNAME/PASSWORD and EDGEFLEET_FLEET_BROKER_DIR={out}"
    )


@trust_app.command("install")
def trust_install(
    roots: Annotated[
        list[Path], typer.Argument(help="Root files in version order (e.g. keys/roots/*.json).")
    ],
    fleet: FleetUrl = DEFAULT_FLEET_URL,
    token: Token = None,
) -> None:
    """Install newer trust roots on the fleet (admin), which pushes them to devices."""
    client = FleetClient(fleet, token=token)

    def version(p: Path) -> int:
        return int(json.loads(p.read_bytes())["signed"]["version"])

    for path in sorted(roots, key=version):
        try:
            result = client.install_trust_root(path.read_bytes())
        except FleetClientError as exc:
            raise _fail(f"{path}: {exc}") from None
        typer.echo(
            f"{path}: fleet at version {result['version']}; pushed to "
            f"{len(result['pushed'])} devices, {len(result['failed'])} failed"
        )


def register(app: typer.Typer) -> None:
    """Add these commands to ``edgefleet fleet``."""
    app.command("enroll")(enroll)
    app.command("revoke")(revoke)
    app.command("broker-config")(broker_config)
    app.add_typer(token_app, name="token")
    app.add_typer(audit_app, name="audit")
    app.add_typer(trust_app, name="trust-root")
