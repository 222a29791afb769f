"""The wire contract: round trips, clear errors, limits, forward compatibility."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import MessageDecodeError, MessageTooLargeError, ProtocolError, TopicError
from protocol.messages import (
    DeployCommand,
    Heartbeat,
    InstallState,
    Presence,
    ReasonCode,
    RollbackCommand,
    StatusEvent,
    TelemetryWindow,
    decode_command,
    decode_message,
    encode_message,
)
from protocol.sketch import FeatureSketch
from protocol.topics import (
    Channel,
    device_topic,
    parse_topic,
    shared_subscription,
    validate_device_id,
)

SHA = "ab" * 32
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _deploy(**kw: object) -> DeployCommand:
    base: dict[str, object] = dict(
        device_id="cam-01",
        bundle_sha256=SHA,
        bundle_size=1234,
        bundle_url="http://fleet/api/v1/bundles/x/download",
        model_name="digits",
        model_version=2,
    )
    base.update(kw)
    return DeployCommand(**base)  # type: ignore[arg-type]


def test_every_kind_round_trips() -> None:
    s = FeatureSketch.of(np.arange(100))
    msgs = [
        _deploy(),
        RollbackCommand(device_id="cam-01", reason="operator"),
        StatusEvent(device_id="cam-01", state=InstallState.COMMITTED, bundle_sha256=SHA),
        TelemetryWindow(
            device_id="cam-01",
            seq=7,
            window_start=NOW,
            window_end=NOW,
            inference_count=100,
            latency_ms=s.to_wire(),
            input_sketches={"x": s.to_wire()},
        ),
        Heartbeat(device_id="cam-01", profile="x86-cpu", agent_version="0.1", uptime_s=3.0),
        Presence(device_id="cam-01", online=False),
    ]
    for m in msgs:
        back = decode_message(encode_message(m))
        assert back == m
        assert type(back) is type(m)


def test_unknown_fields_from_newer_peers_are_ignored() -> None:
    obj = json.loads(encode_message(_deploy()))
    obj["future_field"] = {"nested": True}
    back = decode_message(json.dumps(obj).encode())
    assert isinstance(back, DeployCommand)
    assert not hasattr(back, "future_field")


def test_missing_field_is_named() -> None:
    obj = json.loads(encode_message(_deploy()))
    del obj["bundle_sha256"]
    with pytest.raises(MessageDecodeError, match="bundle_sha256"):
        decode_message(json.dumps(obj).encode())


def test_bad_value_is_named() -> None:
    obj = json.loads(encode_message(_deploy()))
    obj["model_version"] = 0
    with pytest.raises(MessageDecodeError, match="model_version"):
        decode_message(json.dumps(obj).encode())


def test_newer_major_schema_is_refused() -> None:
    obj = json.loads(encode_message(_deploy()))
    obj["schema_version"] = 99
    with pytest.raises(MessageDecodeError, match="schema_version"):
        decode_message(json.dumps(obj).encode())


def test_unknown_kind_and_garbage() -> None:
    with pytest.raises(MessageDecodeError):
        decode_message(b'{"kind": "reboot", "device_id": "a"}')
    with pytest.raises(MessageDecodeError):
        decode_message(b"\xff\xfe not json")
    with pytest.raises(MessageDecodeError):
        decode_message(b"[]")


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(MessageTooLargeError):
        decode_message(b" " * (2 * 1024 * 1024))
    big = json.loads(encode_message(_deploy()))
    big["bundle_url"] = "x" * 2000
    big["padding"] = "y" * (70 * 1024)  # ignored field, but the deploy limit is 64 KiB
    with pytest.raises(MessageTooLargeError):
        decode_message(json.dumps(big).encode())


def test_command_decoder_refuses_events() -> None:
    raw = encode_message(Presence(device_id="a", online=True))
    with pytest.raises(MessageDecodeError, match="expected a command"):
        decode_command(raw)
    assert decode_command(encode_message(_deploy())).kind == "deploy"


def test_bad_device_id_in_message_is_a_decode_error() -> None:
    obj = json.loads(encode_message(_deploy()))
    obj["device_id"] = "evil/#"
    with pytest.raises(MessageDecodeError, match="device_id"):
        decode_message(json.dumps(obj).encode())


def test_status_reason_codes_are_stable_strings() -> None:
    ev = StatusEvent(device_id="a", state="rejected", reason="bad_signature")
    assert ev.reason is ReasonCode.BAD_SIGNATURE
    assert json.loads(encode_message(ev))["reason"] == "bad_signature"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "x" * 65, "tab\there", ".hidden", "é"])
def test_device_ids_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_device_id(bad)


def test_topics_build_and_parse() -> None:
    t = device_topic("cam-01", Channel.TELEMETRY)
    assert t == "edgefleet/v1/cam-01/telemetry"
    p = parse_topic(t)
    assert (p.device_id, p.channel) == ("cam-01", Channel.TELEMETRY)
    assert shared_subscription("fleet", "status") == "$share/fleet/edgefleet/v1/+/status"
    for bad in ["edgefleet/v2/a/status", "edgefleet/v1/a/b/status", "edgefleet/v1/a/unknown"]:
        with pytest.raises(TopicError):
            parse_topic(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoder_never_crashes_on_bytes(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message(raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["deploy", "rollback", "status", "telemetry", "heartbeat", "presence"]),
    st.dictionaries(
        st.sampled_from(
            ["device_id", "seq", "state", "bundle_sha256", "window_start", "input_sketches"]
        ),
        _json,
    ),
)
def test_decoder_never_crashes_on_json(kind: str, fields: dict[str, object]) -> None:
    raw = json.dumps({"kind": kind, **fields}).encode()
    with contextlib.suppress(ProtocolError):
        decode_message(raw)
