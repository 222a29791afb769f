"""The ``edgefleet`` command. Each part's commands are imported only when used.

An agent on a Raspberry Pi should not pay for importing the fleet's web stack or the
compiler's ONNX tooling, and may not even have them installed; so the root app knows each
subcommand only by the module that holds it, and imports just the one being run.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import typer

__all__ = ["COMMANDS", "build_app", "main"]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Lazy:
    target: str  # "module:attribute" naming a typer.Typer
    help: str
    extra: str | None = None  # the pip extra that provides the module's dependencies


COMMANDS: dict[str, _Lazy] = {
    "keys": _Lazy(target="edgefleet.keys_cli:app", help="Release keys and the trust root."),
    "bundle": _Lazy(target="edgefleet.bundle_cli:app", help="Inspect and verify bundles."),
    "compile": _Lazy(
        target="compiler.cli:app",
        help="Compile an ONNX model into a verified, signed bundle.",
        extra="compiler",
    ),
    "agent": _Lazy(target="agent.cli:app", help="The on-device agent.", extra="agent"),
    "fleet": _Lazy(target="fleet.cli:app", help="The fleet service.", extra="fleet"),
    "devices": _Lazy(target="fleet.cli:devices_app", help="List the fleet's devices."),
    "rollout": _Lazy(target="fleet.rollout_cli:app", help="Staged rollouts.", extra="fleet"),
    "drift": _Lazy(target="fleet.drift_cli:app", help="Input drift reports.", extra="fleet"),
    "demo": _Lazy(target="edgefleet.demo:app", help="Run the end-to-end demo.", extra="all"),
    "loadgen": _Lazy(
        target="edgefleet.loadgen:app",
        help="Simulate many devices speaking the real protocol.",
        extra="agent",
    ),
}


def _load(name: str, spec: _Lazy) -> typer.Typer:
    module_name, attr = spec.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = f" (pip install 'edgefleet[{spec.extra}]')" if spec.extra else ""
        typer.echo(
            f"error: `edgefleet {name}` needs the module {exc.name!r}, which is not "
            f"installed{hint}",
            err=True,
        )
        raise SystemExit(2) from exc
    sub = getattr(module, attr)
    assert isinstance(sub, typer.Typer), f"{spec.target} is not a typer.Typer"
    return sub


def _selected(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_app(argv: list[str]) -> typer.Typer:
    """The root app, with only the subcommand that argv selects really imported."""
    root = typer.Typer(
        help="EdgeFleet: compile models for edge devices, ship them, and watch the fleet.",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
    )
    chosen = _selected(argv)
    for name, spec in COMMANDS.items():
        if name == chosen:
            sub = _load(name, spec)
            single = len(sub.registered_commands) == 1 and not sub.registered_groups
            if single and sub.registered_callback is None:
                info = sub.registered_commands[0]
                root.command(name, help=info.help or spec.help)(info.callback)  # type: ignore[arg-type]
            else:
                root.add_typer(sub, name=name, help=spec.help)
        else:
            # A placeholder that only shows up in the listing; never imported or run.
            root.command(name, help=spec.help, add_help_option=False)(_placeholder)

    @root.callback(invoke_without_command=True)
    def _root(
        ctx: typer.Context,
        version: bool = typer.Option(False, "--version", help="Show the version and exit."),
    ) -> None:
        if version:
            from edgefleet import __version__

            typer.echo(f"edgefleet {__version__}")
            raise typer.Exit()
        if ctx.invoked_subcommand is None:
            typer.echo(ctx.get_help())
            raise typer.Exit()

    return root


def _placeholder() -> None:  # pragma: no cover - replaced before it can run
    raise typer.Exit(2)


def main() -> None:
    """Console entry point."""
    argv = sys.argv[1:]
    build_app(argv)(args=argv, prog_name="edgefleet")


if __name__ == "__main__":  # pragma: no cover
    main()
