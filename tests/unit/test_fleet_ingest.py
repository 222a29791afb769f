"""fleet ingest: each upward message is applied once, and bad ones are refused and counted."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from fleet.db import WalCheckpointer, create_db, make_engine
from fleet.ingest import IngestStats, Outcome, handle
from fleet.models import Command, Device, DeviceEvent, TelemetryRecord
from fleet.worker import IngestWorker, ingest_batch
from protocol.messages import (
    Heartbeat,
    InstallState,
    Presence,
    ReasonCode,
    StatusEvent,
    TelemetryWindow,
    encode_message,
)
from protocol.sketch import FeatureSketch
from protocol.topics import Channel, device_topic

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def engine() -> Iterator[Engine]:
    eng = make_engine("sqlite://")
    create_db(eng)
    yield eng
    eng.dispose()


def heartbeat(device_id: str = "dev-1", **kw: object) -> Heartbeat:
    base: dict[str, object] = dict(
        device_id=device_id,
        profile="x86-cpu",
        agent_version="0.1.0",
        active_bundle_sha256=SHA_A,
        model_name="digits",
        model_version=3,
        uptime_s=12.5,
        tags=("lab",),
    )
    base.update(kw)
    return Heartbeat(**base)  # type: ignore[arg-type]


def telemetry(
    seq: int, device_id: str = "dev-1", *, count: int = 100, **kw: object
) -> TelemetryWindow:
    latency = FeatureSketch.of(np.arange(1, 101, dtype=np.float32))  # 1..100 ms
    base: dict[str, object] = dict(
        device_id=device_id,
        seq=seq,
        window_start=T0 + timedelta(minutes=seq),
        window_end=T0 + timedelta(minutes=seq + 1),
        bundle_sha256=SHA_A,
        model_name="digits",
        model_version=3,
        inference_count=count,
        error_counts={"timeout": 2, "bad_input": 1},
        latency_ms=latency.to_wire(),
    )
    base.update(kw)
    return TelemetryWindow(**base)  # type: ignore[arg-type]


def topic_of(msg: object, device_id: str | None = None) -> str:
    channel = {
        "heartbeat": Channel.HEARTBEAT,
        "telemetry": Channel.TELEMETRY,
        "status": Channel.STATUS,
        "presence": Channel.PRESENCE,
    }[msg.kind]  # type: ignore[attr-defined]
    return device_topic(device_id or msg.device_id, channel)  # type: ignore[attr-defined]


def apply(
    engine: Engine, msg: object, *, topic: str | None = None, now: datetime | None = None
) -> Outcome:
    with Session(engine) as session:
        result = handle(topic or topic_of(msg), encode_message(msg), session, now=now)  # type: ignore[arg-type]
        session.commit()
    return result.outcome


def test_heartbeat_registers_unknown_device_and_records_reported_state(engine: Engine) -> None:
    assert apply(engine, heartbeat(), now=T0) is Outcome.STORED
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None
        assert d.auto_registered and d.profile == "x86-cpu" and d.tags == ["lab"]
        assert (d.reported_bundle_sha256, d.reported_model_name, d.reported_model_version) == (
            SHA_A,
            "digits",
            3,
        )
        assert d.online and d.last_seen == T0 and d.agent_version == "0.1.0"

    apply(engine, heartbeat(active_bundle_sha256=SHA_B, model_version=4), now=T0 + timedelta(1))
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.reported_bundle_sha256 == SHA_B and d.reported_model_version == 4


def test_telemetry_stores_window_with_latency_quantiles(engine: Engine) -> None:
    assert apply(engine, telemetry(0)) is Outcome.STORED
    with Session(engine) as s:
        rec = s.exec(select(TelemetryRecord)).one()
        assert rec.inference_count == 100 and rec.error_count == 3
        assert rec.latency_p50_ms == pytest.approx(50, abs=2)
        assert rec.latency_p95_ms == pytest.approx(95, abs=2)
        assert rec.latency_p99_ms == pytest.approx(99, abs=2)
        # the raw window is kept so sketches can be merged later
        assert (
            FeatureSketch.from_wire(
                TelemetryWindow.model_validate(rec.window).latency_ms  # type: ignore[arg-type]
            ).count
            == 100
        )
        assert s.get(Device, "dev-1") is not None  # telemetry before any heartbeat is kept


def test_redelivered_telemetry_is_dropped_not_double_counted(engine: Engine) -> None:
    stats = IngestStats()
    window = telemetry(7)
    items = [(topic_of(window), encode_message(window))] * 2
    results = ingest_batch(engine, items, stats)  # twice in one batch
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.DUPLICATE]
    ingest_batch(engine, items[:1], stats)  # and again in a later batch
    with Session(engine) as s:
        assert s.exec(select(func.sum(TelemetryRecord.inference_count))).one() == 100
    snap = stats.snapshot()
    assert snap["stored"] == {"telemetry": 1} and snap["duplicates"] == {"telemetry": 2}
    assert snap["received"] == 3 and snap["rejected"] == {}


def test_message_for_another_device_is_rejected(engine: Engine) -> None:
    stats = IngestStats()
    msg = telemetry(0, device_id="dev-1")
    [result] = ingest_batch(
        engine, [(device_topic("dev-2", Channel.TELEMETRY), encode_message(msg))], stats
    )
    assert result.outcome is Outcome.REJECTED and result.reason == "device_mismatch"
    assert "dev-1" in result.detail and "dev-2" in result.detail
    with Session(engine) as s:
        assert s.exec(select(TelemetryRecord)).all() == []
        assert s.exec(select(Device)).all() == []
    assert stats.snapshot()["rejected"] == {"device_mismatch": 1}


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (device_topic("dev-1", Channel.TELEMETRY), b"{not json", "bad_message"),
        (device_topic("dev-1", Channel.HEARTBEAT), b'{"kind": "heartbeat"}', "bad_message"),
        # a valid message of the wrong kind for its channel
        (
            device_topic("dev-1", Channel.HEARTBEAT),
            encode_message(Presence(device_id="dev-1", online=True)),
            "bad_message",
        ),
        (device_topic("dev-1", Channel.STATUS), b"x" * (2 * 1024 * 1024), "message_too_large"),
        ("edgefleet/v1/dev-1/bogus", b"{}", "bad_topic"),
        ("other/prefix/dev-1/status", b"{}", "bad_topic"),
        (device_topic("dev-1", Channel.COMMAND), b"{}", "wrong_channel"),
    ],
)
def test_bad_messages_are_counted_by_reason_and_never_raise(
    engine: Engine, topic: str, payload: bytes, reason: str
) -> None:
    stats = IngestStats()
    [result] = ingest_batch(engine, [(topic, payload)], stats)
    assert result.outcome is Outcome.REJECTED and result.reason == reason
    assert stats.snapshot()["rejected"] == {reason: 1}


def test_corrupt_latency_sketch_is_rejected(engine: Engine) -> None:
    msg = telemetry(0)
    raw = json.loads(encode_message(msg))
    raw["latency_ms"]["data"] = "AAAA"
    stats = IngestStats()
    [result] = ingest_batch(engine, [(topic_of(msg), json.dumps(raw).encode())], stats)
    assert result.reason == "bad_sketch"


def test_committed_status_updates_reported_bundle_and_command(engine: Engine) -> None:
    apply(engine, heartbeat())
    with Session(engine) as s:
        s.add(Command(id="c1", device_id="dev-1", kind="deploy", bundle_sha256=SHA_B))
        s.commit()
    event = StatusEvent(
        device_id="dev-1",
        command_id="c1",
        state=InstallState.COMMITTED,
        bundle_sha256=SHA_B,
        active_bundle_sha256=SHA_B,
        model_name="digits",
        model_version=4,
    )
    assert apply(engine, event) is Outcome.STORED
    assert apply(engine, event) is Outcome.DUPLICATE  # QoS 1 redelivery: same message_id
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.reported_bundle_sha256 == SHA_B and d.reported_model_version == 4
        c = s.get(Command, "c1")
        assert c is not None and c.state == "committed"
        assert len(s.exec(select(DeviceEvent)).all()) == 1


def test_reverted_status_reports_the_old_bundle_running(engine: Engine) -> None:
    apply(engine, heartbeat())
    apply(
        engine,
        StatusEvent(
            device_id="dev-1",
            state=InstallState.REVERTED,
            reason=ReasonCode.HEALTH_FAILED,
            bundle_sha256=SHA_B,
            model_name="digits",
            model_version=4,
            active_bundle_sha256=SHA_A,
        ),
    )
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.reported_bundle_sha256 == SHA_A
        assert d.reported_model_version != 4
        [ev] = s.exec(select(DeviceEvent)).all()
        assert (ev.state, ev.reason) == ("reverted", "health_failed")


def test_progress_states_do_not_change_reported_bundle(engine: Engine) -> None:
    apply(engine, heartbeat())
    apply(
        engine,
        StatusEvent(
            device_id="dev-1", state=InstallState.DOWNLOADING, bundle_sha256=SHA_B, progress=0.5
        ),
    )
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.reported_bundle_sha256 == SHA_A


def test_presence_offline_and_stale_retained_online(engine: Engine) -> None:
    apply(engine, heartbeat(), now=T0)
    apply(engine, Presence(device_id="dev-1", online=False), now=T0 + timedelta(seconds=5))
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None and not d.online
    # a retained "online" sent long ago does not make last_seen fresh
    old = Presence(device_id="dev-1", online=True, sent_at=T0 - timedelta(days=2))
    apply(engine, old, now=T0 + timedelta(minutes=1))
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.online and d.last_seen == T0


def test_a_late_window_does_not_undo_an_offline_presence(engine: Engine) -> None:
    """Control messages overtake telemetry: the window the device sent before it dropped
    may be stored after its offline presence; it updates last_seen, not presence."""
    apply(engine, heartbeat(), now=T0)
    apply(engine, Presence(device_id="dev-1", online=False), now=T0 + timedelta(seconds=5))
    assert apply(engine, telemetry(1), now=T0 + timedelta(seconds=6)) is Outcome.STORED
    with Session(engine) as s:
        d = s.get(Device, "dev-1")
        assert d is not None and not d.online and d.last_seen == T0 + timedelta(seconds=6)


def test_worker_writes_everything_queued_before_stop(engine: Engine) -> None:
    stats = IngestStats()
    worker = IngestWorker(engine, stats, queue_max=8, batch_max=3)
    worker.start()
    worker.submit(topic_of(heartbeat()), encode_message(heartbeat()))
    for seq in range(20):
        w = telemetry(seq, count=seq)
        worker.submit(topic_of(w), encode_message(w))
    worker.submit(device_topic("dev-1", Channel.STATUS), b"garbage")
    worker.stop()
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(TelemetryRecord)).one() == 20
        assert s.exec(select(func.sum(TelemetryRecord.inference_count))).one() == sum(range(20))
    snap = stats.snapshot()
    assert snap["received"] == 22 and snap["rejected"] == {"bad_message": 1}
    assert snap["stored"] == {"heartbeat": 1, "telemetry": 20}


def test_worker_acknowledges_only_what_it_stored(engine: Engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The broker's PUBACK is sent after the commit; a batch that is not stored stays unacked."""
    acked: list[int] = []
    worker = IngestWorker(engine, IngestStats(), queue_max=8, batch_max=4)
    worker.start()
    for seq in range(6):
        w = telemetry(seq)
        worker.submit(topic_of(w), encode_message(w), lambda seq=seq: acked.append(seq))
    worker.stop()
    assert sorted(acked) == list(range(6))

    broken = make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'fleet.db'}")
    unacked: list[int] = []
    worker = IngestWorker(broken, IngestStats(), queue_max=8, batch_max=4)
    worker.start()
    w = telemetry(99)
    worker.submit(topic_of(w), encode_message(w), lambda: unacked.append(99))
    worker.stop()
    assert unacked == []


def test_file_database_shared_by_two_engines(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two writers (like two fleet processes) on one SQLite file: no lost or doubled rows."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    a, b = make_engine(url), make_engine(url)
    try:
        create_db(a)
        stats = IngestStats()
        items = [(topic_of(w), encode_message(w)) for w in (telemetry(s) for s in range(5))]
        ingest_batch(a, items, stats)
        ingest_batch(b, items, stats)
        with Session(b) as s:
            assert s.exec(select(func.count()).select_from(TelemetryRecord)).one() == 5
        assert stats.snapshot()["duplicates"] == {"telemetry": 5}
    finally:
        a.dispose()
        b.dispose()


def test_worker_serves_status_ahead_of_a_telemetry_backlog(engine: Engine) -> None:
    """A full telemetry lane neither blocks nor delays status, heartbeats and presence."""
    import threading

    order: list[str] = []
    worker = IngestWorker(engine, IngestStats(), queue_max=8, batch_max=2)
    for seq in range(8):  # the telemetry lane is full before the writer starts
        w = telemetry(seq)
        worker.submit(topic_of(w), encode_message(w), lambda: order.append("telemetry"))
    blocked = threading.Thread(
        target=worker.submit, args=(topic_of(telemetry(99)), encode_message(telemetry(99)))
    )
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # telemetry's producer waits (back-pressure) ...
    hb = heartbeat()
    worker.submit(topic_of(hb), encode_message(hb), lambda: order.append("heartbeat"))  # ... not
    worker.start()
    blocked.join(10)
    worker.stop()
    assert order[0] == "heartbeat" and order.count("telemetry") == 8
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(TelemetryRecord)).one() == 9


def test_known_devices_skip_the_lookup_and_a_wrong_entry_heals(tmp_path: Path) -> None:
    """The worker's cache of registered devices: filled after a commit; an id in it that
    the database lacks (it cannot happen unless the database was swapped) fails the batch
    on the foreign key, the retry registers the device, and the cache is emptied."""
    eng = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_db(eng)
    stats, known = IngestStats(), set[str]()
    first = [(topic_of(w), encode_message(w)) for w in (telemetry(0), telemetry(0, "dev-2"))]
    assert [r.outcome for r in ingest_batch(eng, first, stats, known_devices=known)] == [
        Outcome.STORED, Outcome.STORED,
    ]  # fmt: skip
    assert known == {"dev-1", "dev-2"}
    known.add("dev-ghost")  # believed registered, but not in the database
    ghost = telemetry(1, "dev-ghost")
    [result] = ingest_batch(eng, [(topic_of(ghost), encode_message(ghost))], stats,
                            known_devices=known)  # fmt: skip
    assert result.outcome is Outcome.STORED
    assert known == set()
    with Session(eng) as s:
        assert s.get(Device, "dev-ghost") is not None
        assert len(s.exec(select(TelemetryRecord)).all()) == 3
    eng.dispose()


def test_the_wal_checkpointer_copies_the_log_back(tmp_path: Path) -> None:
    """WAL pages reach the database file from the checkpointer's thread, with the ingest
    connection's own auto-checkpoint far away (SQLITE_AUTOCHECKPOINT_PAGES)."""
    db = tmp_path / "fleet.db"
    eng = make_engine(f"sqlite:///{db}")
    create_db(eng)
    ckpt = WalCheckpointer(eng, interval_s=0.05)
    assert ckpt.enabled and not WalCheckpointer(make_engine("sqlite://")).enabled
    before = db.stat().st_size
    windows = [telemetry(i, input_pack=b"\x00" * 8000) for i in range(200)]
    ingest_batch(eng, [(topic_of(w), encode_message(w)) for w in windows], IngestStats())
    wal = Path(f"{db}-wal")
    assert wal.stat().st_size > 1_000_000 and db.stat().st_size - before < 1_000_000
    ckpt.start()
    try:
        deadline = time.monotonic() + 10
        while db.stat().st_size - before < 1_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ckpt.stop()
    assert db.stat().st_size - before > 1_000_000 and ckpt.runs >= 1 and ckpt.last_error is None
    alone = tmp_path / "copy.db"  # the database file without its log holds every window
    shutil.copyfile(db, alone)  # (before dispose: closing the last connection checkpoints)
    eng.dispose()
    with sqlite3.connect(alone) as conn:
        assert conn.execute("SELECT count(*) FROM telemetryrecord").fetchone()[0] == 200
