"""fleet CLI: the stdlib client commands against a real HTTP server (MQTT faked)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from fleet.app import create_app
from fleet.cli import app, devices_app
from tests.unit.test_fleet_api import FakePublisher, make_bundle, make_keys, make_settings


@dataclass
class Served:
    url: str
    publisher: FakePublisher
    tmp: Path
    release: object


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    keys = make_keys(tmp_path)
    port = _free_port()
    settings = make_settings(tmp_path, keys, http_port=port, public_url="")
    publisher = FakePublisher()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, publisher=publisher), host="127.0.0.1", port=port, log_config=None
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Served(
            url=f"http://127.0.0.1:{port}", publisher=publisher, tmp=tmp_path, release=keys.release
        )
    finally:
        server.should_exit = True
        thread.join(20)


def test_upload_deploy_and_devices(served: Served) -> None:
    runner = CliRunner()
    bundle = make_bundle(served.tmp / "b.efb", served.release)  # type: ignore[arg-type]

    up = runner.invoke(app, ["upload", "--fleet", served.url, str(bundle)])
    assert up.exit_code == 0, up.output
    sha = json.loads(up.stdout)["sha256"]

    import urllib.request

    req = urllib.request.Request(
        f"{served.url}/api/v1/devices",
        method="POST",
        data=json.dumps({"id": "dev-1", "profile": "x86-cpu"}).encode(),
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).close()

    dep = runner.invoke(
        app, ["deploy", "--fleet", served.url, "--bundle", sha, "--device", "dev-1"]
    )
    assert dep.exit_code == 0, dep.output
    [cmd] = served.publisher.sent
    assert cmd.bundle_url == f"{served.url}/api/v1/bundles/{sha}/download"  # type: ignore[union-attr]

    listed = runner.invoke(devices_app, ["--fleet", served.url, "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert row["id"] == "dev-1" and row["desired_bundle_sha256"] == sha

    table = runner.invoke(devices_app, ["--fleet", served.url])
    assert table.exit_code == 0 and "dev-1" in table.stdout and "x86-cpu" in table.stdout


def test_client_errors_are_one_line_with_status(served: Served) -> None:
    runner = CliRunner()
    r = runner.invoke(
        app, ["deploy", "--fleet", served.url, "--bundle", "f" * 64, "--device", "nope"]
    )
    assert r.exit_code == 1
    assert "HTTP 404" in r.stderr and "not in the registry" in r.stderr


def test_unreachable_fleet_says_so() -> None:
    r = CliRunner().invoke(devices_app, ["--fleet", f"http://127.0.0.1:{_free_port()}"])
    assert r.exit_code == 1 and "cannot reach the fleet" in r.stderr


def test_serve_refuses_bad_settings_before_starting(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "serve",
            "--trust-root",
            str(tmp_path / "missing.json"),
            "--db",
            f"sqlite:///{tmp_path / 'f.db'}",
            "--bundle-dir",
            str(tmp_path / "b"),
        ],
    )
    assert r.exit_code == 2 and "missing.json" in r.stderr
    r = CliRunner().invoke(app, ["serve", "--trust-root", "x", "--db", "mysql://nope"])
    assert r.exit_code == 2 and "database_url" in r.stderr
