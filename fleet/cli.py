"""``edgefleet fleet ...`` (serve, upload, deploy, rollback) and ``edgefleet devices``.

Only `serve` needs the fleet extra (FastAPI, SQLModel, uvicorn, paho); it imports them when
it runs. The client commands use the standard library, so they work on any install.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fleet import security_cli as _security_cli
from fleet.client import FleetClient, FleetClientError

__all__ = ["app", "devices_app"]

DEFAULT_FLEET_URL = "http://127.0.0.1:8080"

app = typer.Typer(help="The fleet service: serve it, and talk to it.", no_args_is_help=True)
devices_app = typer.Typer(help="List the fleet's devices.")

FleetUrl = Annotated[
    str,
    typer.Option("--fleet", envvar="EDGEFLEET_FLEET_URL", help="Base URL of the fleet service."),
]

log = logging.getLogger("fleet.cli")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def serve(
    db: Annotated[
        str | None,
        typer.Option("--db", help="Database URL (sqlite:///... or postgresql+psycopg://...)."),
    ] = None,
    mqtt_host: Annotated[str | None, typer.Option("--mqtt-host")] = None,
    mqtt_port: Annotated[int | None, typer.Option("--mqtt-port")] = None,
    trust_root: Annotated[
        Path | None, typer.Option("--trust-root", help="Trust root JSON file.")
    ] = None,
    bundle_dir: Annotated[Path | None, typer.Option("--bundle-dir")] = None,
    host: Annotated[str | None, typer.Option("--host", help="HTTP listen address.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP listen port.")] = None,
    public_url: Annotated[
        str | None, typer.Option("--public-url", help="Base URL devices use to download bundles.")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    migrate_schema: Annotated[
        bool,
        typer.Option(
            "--migrate/--no-migrate",
            help="Bring the database schema up to date at start (default), or refuse to "
            "start on an old schema (run `edgefleet fleet migrate` yourself).",
        ),
    ] = True,
) -> None:
    """Run the fleet service (REST API + MQTT ingest) until SIGTERM or Ctrl-C.

    Options override EDGEFLEET_FLEET_* environment variables.
    """
    from pydantic import ValidationError

    _setup_logging(log_level)
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "database_url": db,
            "mqtt_host": mqtt_host,
            "mqtt_port": mqtt_port,
            "trust_root": trust_root,
            "bundle_dir": bundle_dir,
            "http_host": host,
            "http_port": port,
            "public_url": public_url,
        }.items()
        if value is not None
    }
    from fleet.settings import FleetSettings

    try:
        settings = FleetSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise _fail(
            f"invalid settings: {problems} (use the options or EDGEFLEET_FLEET_* variables)", 2
        ) from None

    import uvicorn

    from fleet.app import create_app
    from fleet.errors import FleetError

    try:
        _prepare_schema(settings.database_url, migrate_schema)
    except FleetError as exc:
        raise _fail(exc.message, 2) from None

    try:
        fastapi_app = create_app(settings)
    except FleetError as exc:
        raise _fail(exc.message, 2) from None
    config = uvicorn.Config(
        fastapi_app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,  # our root logger (stderr) gets uvicorn's records too
        log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, finish requests, run the
    # lifespan shutdown), then re-raises the signal to the handler it found installed.
    # Installing ours first turns a graceful stop into a normal exit (0) instead of a
    # death by signal (or a KeyboardInterrupt traceback).
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    server.run()
    if not server.started:
        raise _fail("the fleet service did not start (see the log above)", 3)
    if signal.SIGINT in stopped_by:
        raise typer.Exit(130)


def _prepare_schema(url: str, migrate_schema: bool) -> None:
    """Migrate the database to head, or check that it is there (SchemaError if not)."""
    from sqlalchemy.exc import SQLAlchemyError

    from fleet.db import check_schema, make_engine, migrate
    from fleet.errors import FleetError

    if "memory" in url or url in ("sqlite://", "sqlite:///"):
        return  # a private in-memory database: the app creates its tables
    engine = make_engine(url)
    try:
        if migrate_schema:
            result = migrate(engine)
            if result.adopted:
                log.info("database schema adopted at revision %s (made before migrations)",
                         result.after)  # fmt: skip
            elif result.changed:
                log.info("database schema migrated from %s to %s", result.before, result.after)
        else:
            check_schema(engine)
    except SQLAlchemyError as exc:
        raise FleetError(f"database {engine.url.render_as_string()}: {exc}") from exc
    finally:
        engine.dispose()


@app.command("migrate")
def migrate_command(
    db: Annotated[
        str,
        typer.Option(
            "--db",
            envvar="EDGEFLEET_FLEET_DATABASE_URL",
            help="Database URL (sqlite:///... or postgresql+psycopg://...).",
        ),
    ] = "sqlite:///./fleet.db",
    to: Annotated[str, typer.Option("--to", help="Target revision.")] = "head",
    check: Annotated[
        bool, typer.Option("--check", help="Change nothing; exit 1 unless the schema is at head.")
    ] = False,
) -> None:
    """Bring the fleet database's schema to the newest revision (Alembic ``upgrade head``).

    Safe to run while fleet processes run and from several places at once: on PostgreSQL
    migrations take an advisory lock; on SQLite the write lock.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from fleet.db import check_schema, head_revision, make_engine, migrate
    from fleet.errors import FleetError
    from fleet.settings import FleetSettings

    _setup_logging("warning")
    try:
        url = FleetSettings._database_url_ok(db)  # the same URL rules as `serve`
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    engine = make_engine(url)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if check:
            typer.echo(f"{shown}: schema at revision {check_schema(engine)} (head)")
            return
        result = migrate(engine, revision=to)
    except FleetError as exc:
        raise _fail(exc.message, 1) from None
    except SQLAlchemyError as exc:
        raise _fail(f"database {shown}: {exc}", 1) from None
    finally:
        engine.dispose()
    if result.adopted:
        typer.echo(f"{shown}: existing schema adopted at revision {result.after}")
    elif result.changed:
        typer.echo(f"{shown}: migrated from {result.before or 'empty'} to {result.after}")
    else:
        typer.echo(f"{shown}: already at revision {result.after} (head {head_revision()})")


@app.command()
def upload(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="The bundle file (.efb)."),
    ],
    fleet: FleetUrl = DEFAULT_FLEET_URL,
) -> None:
    """Upload a bundle to the registry; prints the stored bundle as JSON."""
    try:
        result = FleetClient(fleet).upload(file)
    except FleetClientError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(result, indent=2))


@app.command()
def deploy(
    bundle: Annotated[str, typer.Option("--bundle", help="sha256 of an uploaded bundle.")],
    device: Annotated[
        list[str] | None, typer.Option("--device", help="Device id (repeat for several).")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", help="Deploy to every device of this profile instead."),
    ] = None,
    fleet: FleetUrl = DEFAULT_FLEET_URL,
) -> None:
    """Deploy a bundle to devices (by id, or every device of a profile)."""
    if bool(device) == (profile is not None):
        raise _fail("give --device (one or more) or --profile, not both", 2)
    try:
        result = FleetClient(fleet).deploy(bundle, device_ids=device or None, profile=profile)
    except FleetClientError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(result, indent=2))


@app.command()
def rollback(
    device: Annotated[str, typer.Option("--device", help="Device id.")],
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="sha256 of the bundle to go back to (default: the device's previous)."
        ),
    ] = None,
    reason: Annotated[str, typer.Option("--reason")] = "",
    fleet: FleetUrl = DEFAULT_FLEET_URL,
) -> None:
    """Send one device a rollback command."""
    try:
        result = FleetClient(fleet).rollback(device, target_bundle_sha256=to, reason=reason)
    except FleetClientError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(result, indent=2))


def _ago(text: str | None, now: datetime) -> str:
    if not text:
        return "never"
    try:
        then = datetime.fromisoformat(text)
    except ValueError:
        return text
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    s = max(0, int((now - then).total_seconds()))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    if s < 172800:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


@devices_app.command()
def devices(
    fleet: FleetUrl = DEFAULT_FLEET_URL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show every device: profile, online, model@version, last seen, inferences, p95."""
    try:
        rows = FleetClient(fleet).devices()
    except FleetClientError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    now = datetime.now(UTC)
    table = Table(title=f"{len(rows)} devices")
    for column in ("device", "profile", "online", "model", "last seen"):
        table.add_column(column)
    table.add_column("inferences", justify="right")
    table.add_column("p95 ms", justify="right")
    for d in rows:
        model = f"{d['model_name']}@{d['model_version']}" if d.get("model_name") else "-"
        p95 = d.get("latency_p95_ms")
        table.add_row(
            d["id"],
            d.get("profile") or "?",
            "[green]yes[/green]" if d.get("online") else "[red]no[/red]",
            model,
            _ago(d.get("last_seen"), now),
            f"{d.get('inference_count', 0):,}",
            "-" if p95 is None else f"{p95:.1f}",
        )
    Console().print(table)


# enroll, revoke, token, audit, broker-config, trust-root (docs/security.md)
_security_cli.register(app)

if __name__ == "__main__":
    app()
