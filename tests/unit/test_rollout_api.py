"""Rollout REST routes, /metrics figures and OpenAPI, on SQLite with a fake broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet.app import create_app
from fleet.rollout_cli import _stages
from fleet.rollout_cli import app as rollout_app
from protocol.messages import InstallState, StatusEvent, encode_message
from tests.unit.test_fleet_api import (
    FakePublisher,
    TestClient,
    make_bundle,
    make_keys,
    make_settings,
)

OLD = "0" * 64


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, FakePublisher, str]]:
    keys = make_keys(tmp_path)
    settings = make_settings(tmp_path, keys, auth_enabled=False)
    publisher = FakePublisher()
    with TestClient(create_app(settings, publisher=publisher)) as client:
        bundle = make_bundle(tmp_path / "b.efb", keys.release)
        r = client.post(
            "/api/v1/bundles",
            content=bundle.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
        for i in range(5):
            r = client.post(
                "/api/v1/devices",
                json={"id": f"d{i}", "profile": "x86-cpu", "tags": ["lab"] if i < 2 else []},
            )
            assert r.status_code == 201, r.text
        yield client, publisher, r.json() and client.get("/api/v1/bundles").json()[0]["sha256"]


def _ingest(client: TestClient, msg: Any) -> None:
    from sqlmodel import Session

    from fleet.ingest import handle
    from protocol.topics import Channel, device_topic

    channel = Channel.STATUS if msg.kind == "status" else Channel.HEARTBEAT
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        assert (
            handle(device_topic(msg.device_id, channel), encode_message(msg), session).reason
            is None
        )
        session.commit()


def test_rollout_over_rest(api: tuple[TestClient, FakePublisher, str]) -> None:
    client, publisher, sha = api
    runner = client.app.state.rollout_runner  # type: ignore[attr-defined]
    body = {
        "bundle_sha256": sha,
        "stages": [{"tags": ["lab"], "bake_s": 0}, {"percent": 100, "bake_s": 0}],
        "gates": {"min_inferences": 0},
        "seed": 1,
    }
    r = client.post("/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert r.json()["devices"] == {"planned": 5}
    assert r.json()["stage_devices"] == [{"planned": 2}, {"planned": 3}]
    # overlapping rollout: 409, with the devices and the rollout that holds them
    again = client.post("/api/v1/rollouts", json=body)
    assert again.status_code == 409 and again.json()["rollout_ids"] == [rid]
    runner.tick()
    assert sorted(c.device_id for c in publisher.sent) == ["d0", "d1"]
    for c in publisher.sent:
        _ingest(
            client,
            StatusEvent(
                device_id=c.device_id,
                command_id=c.command_id,
                state=InstallState.COMMITTED,
                active_bundle_sha256=sha,
            ),
        )
    runner.tick()
    runner.tick()
    detail = client.get(f"/api/v1/rollouts/{rid}").json()
    assert detail["stage"] == 1 and detail["phase"] == "deploying"
    assert [d["outcome"] for d in detail["decisions"]][::-1] == ["created", "advance"]
    # an approve while deploying is a 409; a pause is accepted (202) and applied
    assert client.post(f"/api/v1/rollouts/{rid}/approve").status_code == 409
    assert client.post(f"/api/v1/rollouts/{rid}/pause", json={"reason": "lunch"}).status_code == 202
    runner.tick()
    assert client.get(f"/api/v1/rollouts/{rid}").json()["phase"] == "paused"
    devices = client.get(f"/api/v1/rollouts/{rid}/devices", params={"stage": 0}).json()
    assert {d["phase"] for d in devices} == {"committed"}
    metrics = client.get("/metrics").text
    assert (
        f'edgefleet_rollout_state{{model="digits",rollout="{rid}",state="paused",version="3"}} 1.0'
        in metrics
    )
    assert "edgefleet_rollout_stage" in metrics and "edgefleet_command_outbox_unsent" in metrics
    lineage = client.get(f"/api/v1/bundles/{sha}/lineage").json()
    assert lineage["desired"] == 5 and [v["sha256"] for v in lineage["versions"]] == [sha]
    rb = client.post("/api/v1/rollbacks", json={"tag": "lab", "reason": "test"})
    assert rb.status_code == 202 and {q["device_id"] for q in rb.json()} == {"d0", "d1"}
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/v1/rollouts", "/api/v1/rollouts/{rollout_id}/rollback", "/api/v1/rollbacks"):
        assert p in paths


def test_bad_rollouts_are_refused(api: tuple[TestClient, FakePublisher, str]) -> None:
    client, _, sha = api
    r = client.post("/api/v1/rollouts", json={"bundle_sha256": "e" * 64})
    assert r.status_code == 422 and "upload it first" in r.json()["detail"]
    r = client.post("/api/v1/rollouts", json={"bundle_sha256": sha, "target": {"group": "none"}})
    assert r.status_code == 422 and "target set is empty" in r.json()["detail"]
    r = client.post("/api/v1/rollouts", json={"bundle_sha256": sha, "stages": [{"percent": 50}]})
    assert r.status_code == 422 and "last stage" in r.text
    assert client.get("/api/v1/rollouts").json() == []


def test_metrics_per_model_version_and_burn_rate(
    api: tuple[TestClient, FakePublisher, str],
) -> None:
    from datetime import timedelta

    from protocol.messages import TelemetryWindow, utcnow
    from protocol.sketch import FeatureSketch

    client, _, sha = api
    now = utcnow()
    msg = TelemetryWindow(
        device_id="d0",
        seq=1,
        window_start=now - timedelta(seconds=10),
        window_end=now,
        bundle_sha256=sha,
        model_name="digits",
        model_version=3,
        inference_count=1000,
        error_counts={"x": 2},
        latency_ms=FeatureSketch.of([5.0] * 900 + [500.0] * 100).to_wire(),
    )
    from sqlmodel import Session

    from fleet.ingest import handle
    from protocol.topics import Channel, device_topic

    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        handle(device_topic("d0", Channel.TELEMETRY), encode_message(msg), session)
        session.commit()
    text = client.get("/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("edgefleet_model_error_budget_burn_rate") and 'slo="success"' in x
    )
    # 0.2 % errors against a 0.1 % budget: burning twice as fast as allowed
    assert float(line.split()[-1]) == pytest.approx(2.0)
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("edgefleet_model_error_budget_burn_rate") and 'slo="latency"' in x
    )
    assert float(line.split()[-1]) == pytest.approx(2.0, rel=0.1)  # 10 % slow vs 5 % allowed


def test_cli_stage_parsing_and_help() -> None:
    assert [s["percent"] for s in _stages("1, 10%,100", 5, False)] == [1, 10, 100]
    result = CliRunner().invoke(rollout_app, ["rollback", "--help"])
    assert result.exit_code == 0 and "--tag" in result.output
    result = CliRunner().invoke(rollout_app, ["rollback"])
    assert result.exit_code == 2
