"""``edgefleet rollout ...``: create, status, approve, pause, abort, rollback.

Talks to the fleet's REST API with the standard-library client (no web stack needed).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from fleet.client import FleetClient, FleetClientError

__all__ = ["app"]

DEFAULT_FLEET_URL = "http://127.0.0.1:8080"

app = typer.Typer(help="Staged rollouts: create, watch, approve, abort, roll back.")

FleetUrl = Annotated[
    str,
    typer.Option("--fleet", envvar="EDGEFLEET_FLEET_URL", help="Base URL of the fleet service."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _client(fleet: str) -> FleetClient:
    return FleetClient(fleet)


def _call(fleet: str, method: str, path: str, body: Any = None) -> Any:
    try:
        return _client(fleet)._call(method, path, body=body)
    except FleetClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _stages(text: str, bake_s: float, approval: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in text.split(","):
        part = part.strip().rstrip("%")
        try:
            percent = float(part)
        except ValueError:
            raise typer.BadParameter(f"stage {part!r} is not a percentage") from None
        out.append({"percent": percent, "bake_s": bake_s, "require_approval": approval})
    return out


def _summary(r: dict[str, Any]) -> str:
    stage = r["stage"]
    percents = r.get("stage_percents") or []
    where = (
        f"stage {stage + 1}/{r['stages']} ({percents[stage]}%)"
        if 0 <= stage < len(percents) and percents[stage] is not None
        else f"stage {stage + 1}/{r['stages']}"
    )
    devices = ", ".join(f"{k} {v}" for k, v in sorted(r.get("devices", {}).items()))
    line = (
        f"{r['id']}  {r['model_name']} v{r['model_version']}  {r['phase']:<12} {where}  [{devices}]"
    )
    if r.get("reason"):
        line += f"\n    {r['reason']}"
    return line


@app.command()
def create(
    bundle: Annotated[str, typer.Option("--bundle", help="sha256 of an uploaded bundle.")],
    stages: Annotated[
        str, typer.Option("--stages", help="Cumulative percentages, ending at 100.")
    ] = "1,10,50,100",
    bake_s: Annotated[float, typer.Option("--bake-s", help="Bake time of each stage.")] = 600.0,
    canary_device: Annotated[
        list[str] | None, typer.Option("--canary-device", help="A first stage of these devices.")
    ] = None,
    canary_tag: Annotated[
        list[str] | None, typer.Option("--canary-tag", help="A first stage of these tags.")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", help="Target: this group.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Target: all these tags.")] = None,
    profile: Annotated[str | None, typer.Option("--profile")] = None,
    device: Annotated[list[str] | None, typer.Option("--device", help="Target: these.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    spread_by_tag: Annotated[bool, typer.Option("--spread-by-tag")] = False,
    require_approval: Annotated[
        bool, typer.Option("--require-approval", help="Pause after each stage for a person.")
    ] = False,
    on_fail: Annotated[str, typer.Option("--on-fail", help="rollback | pause")] = "rollback",
    gates: Annotated[
        str | None, typer.Option("--gates", help="Gate settings as JSON (see the API docs).")
    ] = None,
    fleet: FleetUrl = DEFAULT_FLEET_URL,
    as_json: AsJson = False,
) -> None:
    """Start a staged rollout of a bundle."""
    plan = _stages(stages, bake_s, require_approval)
    if canary_device or canary_tag:
        plan.insert(
            0,
            {
                "devices": canary_device or [],
                "tags": canary_tag or [],
                "bake_s": bake_s,
                "require_approval": require_approval,
            },
        )
    gate_cfg: dict[str, Any] = json.loads(gates) if gates else {}
    gate_cfg.setdefault("on_fail", on_fail)
    target: dict[str, Any] = {"group": group, "tags": tag or [], "profile": profile}
    if device:
        target["device_ids"] = device
    body = {
        "bundle_sha256": bundle,
        "target": target,
        "stages": plan,
        "gates": gate_cfg,
        "seed": seed,
        "spread_by_tag": spread_by_tag,
    }
    result = _call(fleet, "POST", "/api/v1/rollouts", body)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else _summary(result))


@app.command()
def status(
    rollout_id: Annotated[str | None, typer.Argument(help="One rollout (default: all).")] = None,
    fleet: FleetUrl = DEFAULT_FLEET_URL,
    as_json: AsJson = False,
) -> None:
    """Show rollouts (or one, with its decisions)."""
    if rollout_id is None:
        rows = _call(fleet, "GET", "/api/v1/rollouts")
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            for r in rows:
                typer.echo(_summary(r))
        return
    detail = _call(fleet, "GET", f"/api/v1/rollouts/{rollout_id}")
    if as_json:
        typer.echo(json.dumps(detail, indent=2))
        return
    typer.echo(_summary(detail))
    for d in reversed(detail.get("decisions", [])[:20]):
        typer.echo(f"  {d['at']}  stage {d['stage']:>2}  {d['outcome']:<10} {d['reason']}")


def _action(action: str, rollout_id: str, fleet: str, reason: str, keep: bool = False) -> None:
    body = {"reason": reason, "keep_devices": keep}
    result = _call(fleet, "POST", f"/api/v1/rollouts/{rollout_id}/{action}", body)
    typer.echo(f"{action} requested ({result['id']}); the fleet applies it at its next step")


@app.command()
def approve(
    rollout_id: str,
    reason: Annotated[str, typer.Option("--reason")] = "",
    fleet: FleetUrl = DEFAULT_FLEET_URL,
) -> None:
    """Continue a paused rollout."""
    _action("approve", rollout_id, fleet, reason)


@app.command()
def pause(
    rollout_id: str,
    reason: Annotated[str, typer.Option("--reason")] = "",
    fleet: FleetUrl = DEFAULT_FLEET_URL,
) -> None:
    """Hold a rollout until approved."""
    _action("pause", rollout_id, fleet, reason)


@app.command()
def abort(
    rollout_id: str,
    reason: Annotated[str, typer.Option("--reason")] = "",
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave devices on the new version (no rollback).")
    ] = False,
    fleet: FleetUrl = DEFAULT_FLEET_URL,
) -> None:
    """Stop a rollout and roll back the devices that took it (unless --keep)."""
    _action("abort", rollout_id, fleet, reason, keep)


@app.command()
def rollback(
    rollout_id: Annotated[str | None, typer.Argument(help="Roll back this whole rollout.")] = None,
    device: Annotated[list[str] | None, typer.Option("--device", help="Or: these devices.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Or: every device with a tag.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Or: a whole group.")] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Target bundle sha256 (default: each's previous).")
    ] = None,
    reason: Annotated[str, typer.Option("--reason")] = "",
    fleet: FleetUrl = DEFAULT_FLEET_URL,
) -> None:
    """OTA rollback: a whole rollout, or devices by id, tag or group."""
    chosen = [x for x in (rollout_id, device or None, tag, group) if x is not None]
    if len(chosen) != 1:
        typer.echo("error: give one of ROLLOUT_ID, --device, --tag or --group", err=True)
        raise typer.Exit(2)
    if rollout_id is not None:
        _action("rollback", rollout_id, fleet, reason)
        return
    body = {
        "device_ids": device or None,
        "tag": tag,
        "group": group,
        "target_bundle_sha256": to,
        "reason": reason,
    }
    queued = _call(fleet, "POST", "/api/v1/rollbacks", body)
    typer.echo(f"rollback queued for {len(queued)} devices")
    for q in queued:
        typer.echo(f"  {q['device_id']}  {q['command_id']}")


if __name__ == "__main__":
    app()
