# ruff: noqa: F811  (the rig fixtures are imported from test_agent_install)
"""The agent never bricks: corrupt slots, unloadable models, full disks, runtime crashes,
interrupted installs and a garbage outbox all end on a verified model, with a reason."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.backends import create_backend
from agent.crashpoint import CrashPoints, parse_crash_at
from agent.errors import ConfigError
from agent.testing import DiskFullFetcher, FailingBackend
from protocol.messages import (
    TELEMETRY_MAGIC,
    DeployCommand,
    ReasonCode,
    StatusEvent,
    TelemetryWindow,
    decode_message,
    encode_message,
)
from protocol.messages import InstallState as S
from protocol.sketchpack import is_compressed, pack_sketches
from tests.unit.test_agent_install import (  # noqa: F401  (fixtures)
    CMD_TOPIC,
    DEVICE,
    Rig,
    heldout,
    release_key,
    rig,
    states,
    trust_file,
)


def _statuses(rig: Rig) -> list[StatusEvent]:
    return [decode_message(p) for p in rig.transport.on("/status")]


def test_corrupt_active_slot_detected_at_startup_falls_back_to_previous(rig: Rig) -> None:
    rig.start()
    v1, v2 = rig.bundle(1), rig.bundle(2)
    rig.deploy(v1)
    rig.deploy(v2)
    slot = json.loads((rig.tmp / "state" / "active.json").read_text())["active"]["slot"]
    model = rig.tmp / "state" / "slots" / slot / "model" / "model.onnx"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of a weight: still loads, silently wrong
    model.write_bytes(bytes(raw))
    rig.agent.stop()  # type: ignore[union-attr]

    agent = rig.start()
    assert agent.service.model is not None
    assert agent.service.model.bundle_sha256 == v1.sha256
    assert rig.predict().shape == (4, 10)
    ev = _statuses(rig)[-1]
    assert (ev.state, ev.reason) == (S.REVERTED, ReasonCode.BAD_HASH)
    assert ev.bundle_sha256 == v2.sha256 and ev.active_bundle_sha256 == v1.sha256
    assert "changed on disk" in ev.detail
    agent.tick()
    window = (
        decode_message(rig.transport.on("/telemetry")[-1])
        if rig.transport.on("/telemetry")
        else None
    )
    assert window is None or isinstance(window, TelemetryWindow)


def test_model_that_fails_to_load_fails_and_old_model_serves(rig: Rig) -> None:
    rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    broken = rig.bundle(2, artifact_bytes=b"\x08\x07not an onnx model")
    ev = rig.deploy(broken)
    assert (ev[-1].state, ev[-1].reason) == (S.FAILED, ReasonCode.LOAD_FAILED)
    assert S.SWITCHED not in states(ev)
    assert rig.agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]
    assert rig.predict().shape == (4, 10)


def test_disk_full_during_download_fails_with_reason(rig: Rig) -> None:
    rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    rig.agent.installer.fetcher = DiskFullFetcher()  # type: ignore[union-attr]
    ev = rig.deploy(rig.bundle(2))
    assert (ev[-1].state, ev[-1].reason) == (S.FAILED, ReasonCode.DISK_FULL)
    assert rig.agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]


def test_runtime_crash_during_health_window_reverts(rig: Rig) -> None:
    rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    rig.agent.stop()  # type: ignore[union-attr]
    made: list[FailingBackend] = []

    def factory(runtime: str) -> FailingBackend:
        # v2 passes its self-test (1 run), then crashes on every health-window inference.
        b = FailingBackend(create_backend(runtime), ok_runs=1)
        made.append(b)
        return b

    rig.start()
    rig.agent.installer.backend_factory = factory  # type: ignore[union-attr]
    ev = rig.deploy(rig.bundle(2))
    assert states(ev)[-3:] == [S.SWITCHED, S.HEALTH_CHECK, S.REVERTED]
    assert ev[-1].reason is ReasonCode.HEALTH_FAILED
    assert "failed" in ev[-1].detail
    assert rig.agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]
    assert rig.predict().shape == (4, 10)


def test_install_interrupted_before_switch_resumes_after_restart(rig: Rig) -> None:
    agent = rig.start()
    v1 = rig.bundle(1)
    cmd = v1.deploy_command(DEVICE)
    agent.installer.state.write_install(cmd.model_dump_json(), 1)  # as if killed mid-install
    rig.agent = None
    agent = rig.start()
    assert agent.process_commands() == 1
    ev = _statuses(rig)
    assert ev[-1].state is S.COMMITTED and ev[-1].command_id == cmd.command_id
    assert not (rig.tmp / "state" / "install.json").exists()


def test_install_interrupted_too_often_is_reported_failed(rig: Rig) -> None:
    agent = rig.start()
    cmd = rig.bundle(1).deploy_command(DEVICE)
    agent.installer.state.write_install(cmd.model_dump_json(), 3)
    rig.agent = None
    agent = rig.start()
    assert agent.process_commands() == 0
    ev = _statuses(rig)[-1]
    assert (ev.state, ev.reason, ev.command_id) == (S.FAILED, ReasonCode.INTERNAL, cmd.command_id)
    assert "interrupted 3 times" in ev.detail
    assert agent.service.model is None


def test_crash_point_spec_is_validated() -> None:
    assert parse_crash_at("switched:2") == ("switched", 2)
    assert parse_crash_at("health") == ("health", 1)
    assert parse_crash_at(None) is None
    for bad in ("nowhere:1", "switched:x", "switched:0"):
        with pytest.raises(ConfigError):
            parse_crash_at(bad)
    cp = CrashPoints(None)
    cp.hit("download")
    assert cp.passes == {"download": 1}


def test_corrupt_outbox_is_moved_aside_counted_and_reported(rig: Rig) -> None:
    state = rig.tmp / "state"
    state.mkdir(parents=True)
    (state / "outbox.sqlite").write_bytes(b"this is not a database" * 100)
    agent = rig.start()
    aside = list(state.glob("outbox.sqlite.corrupt-*"))
    assert len(aside) == 1
    assert agent.outbox.corrupt_recovered == 1
    agent.service  # noqa: B018
    rig.deploy(rig.bundle(1))
    rig.predict()
    agent.tick(now=agent.clock() + 3600)
    windows = [decode_message(p) for p in rig.transport.on("/telemetry")]
    assert windows and windows[-1].extra["outbox_corrupt_recovered"] == 1
    # the new outbox works
    assert (
        sqlite3.connect(state / "outbox.sqlite").execute("PRAGMA integrity_check").fetchone()[0]
        == "ok"
    )


def test_invalid_commands_are_counted_and_reported_in_telemetry(rig: Rig) -> None:
    agent = rig.start()
    rig.transport.deliver(CMD_TOPIC, b"{garbage")
    unknown = DeployCommand(
        device_id=DEVICE,
        bundle_sha256="ab" * 32,
        bundle_size=10,
        bundle_url="test://nowhere.efb",
        model_name="digits",
        model_version=1,
    )
    from protocol.messages import encode_message

    rig.transport.deliver(CMD_TOPIC, encode_message(unknown))
    agent.process_commands()
    ev = _statuses(rig)[-1]
    assert (ev.state, ev.reason) == (S.FAILED, ReasonCode.DOWNLOAD_FAILED)
    agent.tick(now=agent.clock() + 3600)
    w = decode_message(rig.transport.on("/telemetry")[-1])
    assert w.extra["bad_commands"] == 1


def test_merge_window_payloads_adds_counts_and_merges_sketches(rig: Rig) -> None:
    from agent.telemetry import merge_window_payloads

    agent = rig.start(outbox_max_bytes=10**9)
    rig.deploy(rig.bundle(1))
    rig.transport.auto_ack = False
    t = agent.clock()
    for k in range(2):
        for _ in range(3 + k):
            rig.predict()
        agent.tick(now=t + 3600 * (k + 1))
    a, b = rig.transport.on("/telemetry")[-2:]
    wa, wb = decode_message(a), decode_message(b)
    merged = decode_message(merge_window_payloads(a, b))
    assert merged.seq == wa.seq
    assert merged.inference_count == wa.inference_count + wb.inference_count
    assert merged.merged_windows == 2
    assert merged.latency_ms is not None
    assert sum(merged.output_class_counts) == merged.inference_count
    assert merged.window_start == wa.window_start and merged.window_end == wb.window_end
    ia, ib, im = wa.sketches(), wb.sketches(), merged.sketches()
    assert im and set(im) == set(ia) == set(ib)
    assert all(im[f].count == ia[f].count + ib[f].count for f in im)
    # windows travel as frames (the pack's raw bytes after the JSON); a merged window too,
    # and it keeps the sender's choice of compression
    assert a[:4] == TELEMETRY_MAGIC and isinstance(merged.input_pack, bytes)
    assert not is_compressed(merged.input_pack)
    za, zb = (
        encode_message(
            w.model_copy(update={"input_pack": pack_sketches(w.sketches(), compress=True)})
        )
        for w in (wa, wb)
    )
    zmerged = decode_message(merge_window_payloads(za, zb))
    assert is_compressed(zmerged.input_pack)
    assert {f: s.count for f, s in zmerged.sketches().items()} == {
        f: s.count for f, s in im.items()
    }


def test_outbox_merges_instead_of_dropping_when_full(tmp_path: Path) -> None:
    from agent.outbox import Outbox

    def merge(a: bytes, b: bytes) -> bytes:
        x, y = json.loads(a), json.loads(b)
        return json.dumps({"n": x["n"] + y["n"], "pad": x["pad"]}).encode()

    box = Outbox(tmp_path / "o.sqlite", max_bytes=5000, max_age_s=1e9, merge=merge)
    for _ in range(40):
        box.add(lambda _s, _d: json.dumps({"n": 1, "pad": "x" * 400}).encode(), merge_key="m")
    rows = box._db.execute("SELECT payload, merged FROM window ORDER BY seq").fetchall()
    assert sum(json.loads(p)["n"] for p, _ in rows) == 40  # nothing lost
    assert sum(m for _, m in rows) == 40
    assert box.dropped_total == 0 and box.merged_total > 0
    assert sum(len(p) for p, _ in rows) <= 5000
    box.close()


def test_outbox_never_merges_a_window_already_sent(tmp_path: Path) -> None:
    from agent.outbox import Outbox

    def merge(a: bytes, b: bytes) -> bytes:
        return a

    box = Outbox(tmp_path / "o.sqlite", max_bytes=3000, max_age_s=1e9, merge=merge)
    for _ in range(3):
        box.add(lambda _s, _d: b"x" * 900, merge_key="m")
    box.pump(lambda _p: 7)  # handed to the broker, never acknowledged
    box.connection_lost()
    for _ in range(4):
        box.add(lambda _s, _d: b"y" * 900, merge_key="m")
    rows = box._db.execute("SELECT seq, payload FROM window ORDER BY seq").fetchall()
    kept = [bytes(p)[:1] for _, p in rows]
    # the sent ones are only ever dropped (counted), never merged with new data
    assert b"x" * 900 not in [bytes(p) for _, p in rows if bytes(p)[:1] == b"y"]
    assert kept.count(b"x") + box.dropped_total == 3
    box.close()
