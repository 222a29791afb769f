"""fleet settings: environment names, defaults, and clear refusals of bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.settings import FleetSettings


def test_trust_root_is_required() -> None:
    with pytest.raises(ValidationError, match="trust_root"):
        FleetSettings()  # type: ignore[call-arg]


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFLEET_FLEET_TRUST_ROOT", str(tmp_path / "root.json"))
    monkeypatch.setenv("EDGEFLEET_FLEET_MQTT_PORT", "18830")
    monkeypatch.setenv("EDGEFLEET_FLEET_MQTT_PASSWORD", "s3cret")
    monkeypatch.setenv("EDGEFLEET_FLEET_HTTP_PORT", "9000")
    s = FleetSettings()  # type: ignore[call-arg]
    assert s.trust_root == tmp_path / "root.json" and s.mqtt_port == 18830
    assert s.public_url == "http://127.0.0.1:9000"
    assert s.mqtt_password is not None and "s3cret" not in repr(s)
    # keyword arguments (CLI options) win over the environment
    assert FleetSettings(http_port=9100).http_port == 9100  # type: ignore[call-arg]


def test_settings_are_frozen() -> None:
    s = FleetSettings(trust_root=Path("r.json"))
    with pytest.raises(ValidationError):
        s.http_port = 1


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///./fleet.db", "sqlite:///./fleet.db"),
        ("sqlite://", "sqlite://"),
        ("postgresql+psycopg://u:p@db/fleet", "postgresql+psycopg://u:p@db/fleet"),
        ("postgresql://u:p@db/fleet", "postgresql+psycopg://u:p@db/fleet"),
        ("postgres://u@db/fleet", "postgresql+psycopg://u@db/fleet"),
    ],
)
def test_database_urls(given: str, expected: str) -> None:
    assert FleetSettings(trust_root=Path("r"), database_url=given).database_url == expected


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("database_url", "mysql://x/y", "not supported"),
        ("mqtt_port", 0, "mqtt_port"),
        ("http_port", 70000, "http_port"),
        ("public_url", "fleet.example.com", "http"),
        ("mqtt_share_group", "a/b", "mqtt_share_group"),
        ("offline_after_s", 0, "offline_after_s"),
        ("max_upload_bytes", 0, "max_upload_bytes"),
        ("surprise", 1, "surprise"),
    ],
)
def test_bad_values_are_refused(field: str, value: object, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        FleetSettings(trust_root=Path("r"), **{field: value})  # type: ignore[arg-type]


def test_public_url_defaults_and_bundle_url() -> None:
    wildcard = FleetSettings(trust_root=Path("r"), http_host="0.0.0.0", http_port=8081)
    assert wildcard.public_url == "http://127.0.0.1:8081"
    explicit = FleetSettings(trust_root=Path("r"), public_url="https://fleet.example.com/")
    assert explicit.bundle_url("ab" * 32) == (
        f"https://fleet.example.com/api/v1/bundles/{'ab' * 32}/download"
    )
