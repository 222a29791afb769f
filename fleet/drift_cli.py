"""``edgefleet drift report``: a model version's drift, as a table (stdlib HTTP only)."""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fleet.client import FleetClient, FleetClientError

__all__ = ["DriftClient", "app", "parse_window"]

app = typer.Typer(help="Input and prediction drift of the fleet.", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@app.callback()
def _group() -> None:
    """Input and prediction drift of the fleet (a group, so ``drift report`` stays a verb)."""


def parse_window(text: str) -> int:
    """'90s', '15m', '1h', '2d' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m or int(m.group(1)) == 0:
        raise typer.BadParameter(f"window {text!r}: use e.g. 600, 15m, 1h or 2d")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


class DriftClient(FleetClient):
    """The drift routes of the fleet's REST API."""

    def drift(self, model: str, *, version: int | None = None, window_s: int | None = None) -> Any:
        """GET /api/v1/drift."""
        return self._call(
            "GET", "/api/v1/drift?" + _query(model=model, version=version, window_s=window_s)
        )

    def drift_devices(
        self, model: str, *, version: int | None = None, window_s: int | None = None
    ) -> Any:
        """GET /api/v1/drift/devices."""
        return self._call(
            "GET",
            "/api/v1/drift/devices?" + _query(model=model, version=version, window_s=window_s),
        )


def _query(**params: Any) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


@app.command()
def report(
    model: Annotated[str, typer.Option("--model", help="Model name.")],
    fleet: Annotated[
        str,
        typer.Option(
            "--fleet", envvar="EDGEFLEET_FLEET_URL", help="Base URL of the fleet service."
        ),
    ] = "http://127.0.0.1:8080",
    version: Annotated[
        int | None, typer.Option("--version", help="Model version (default: latest).")
    ] = None,
    window: Annotated[str, typer.Option("--window", help="Window: 600, 15m, 1h, 2d.")] = "1h",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON report.")] = False,
) -> None:
    """Drift of one model version over the last window, against its bundle's baseline."""
    try:
        body = DriftClient(fleet).drift(model, version=version, window_s=parse_window(window))
    except FleetClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{body.get('model')} v{body.get('version')}[/bold]  status "
        f"[bold]{body['status']}[/bold]  drifted {len(body['drifted'])}/{body['tested']} "
        f"features ({body['drift_share']:.0%})  windows {body.get('windows', 0)}"
    )
    table = Table(
        "feature", "status", "KS D", "crit", "q", "PSI", "W1/sd", "n ref", "n cur", "reason"
    )
    for r in body["results"] + body.get("prediction", {}).get("results", []):
        style = {"drifted": "red", "stable": "green"}.get(r["status"], "yellow")
        table.add_row(
            r["feature"],
            f"[{style}]{r['status']}[/{style}]",
            _f(r["statistic"]),
            _f(r["critical_value"]),
            _f(r["q_value"], ".2g"),
            _f(r["psi"]),
            _f(r["w1_norm"]),
            str(r["n_ref"]),
            str(r["n_cur"]),
            r["reason"],
        )
    console.print(table)
