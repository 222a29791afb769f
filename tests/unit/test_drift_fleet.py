"""fleet.drift on a real SQLite database: tiles, baseline reference, alerts, device ranking."""

from __future__ import annotations

import base64
import io
import logging
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session, select

import fleet.drift.models as drift_models
from fleet.db import create_db, make_engine, reader_engine
from fleet.drift.scope import compare_cohorts, rank_devices
from fleet.drift.service import DriftCollector, DriftService
from fleet.drift.settings import DriftSettings
from fleet.drift.tiles import read_tiles, tile_new_telemetry
from fleet.models import Bundle, Device, TelemetryRecord
from protocol.features import Baseline, FeatureSpec
from protocol.sketch import SketchBank
from protocol.sketchpack import pack_sketches

FEATURES = ("x[0]", "x[1]")
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _baseline_bundle(tmp_path: Path, rng: np.random.Generator) -> Path:
    bank = SketchBank(FEATURES, k=4096)
    bank.update_rows(rng.normal(size=(4096, 2)))
    baseline = Baseline(
        rows=4096,
        features=(FeatureSpec.for_input("x", (2,)),),
        sketches=bank.to_wire(),
        output_class_counts=[2048, 2048],
    )
    raw = baseline.model_dump_json().encode()
    path = tmp_path / "b.efb"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("baseline/sketches.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return path


def _window(
    rng: np.random.Generator, shift: float, rows: int = 150, form: str = "frame"
) -> tuple[dict, bytes | None]:
    """A stored window (its JSON, its pack column) as ingest stores each form: "frame" (the
    pack's bytes in their own column), "text" (a JSON-form window with the base64 pack),
    "json" (per-feature sketch objects, agents before the pack)."""
    bank = SketchBank(FEATURES)
    bank.update_rows(rng.normal(shift, 1.0, size=(rows, 2)))
    window: dict = {"output_class_counts": [rows // 2, rows - rows // 2]}
    if form == "json":
        window["input_sketches"] = {k: w.model_dump(mode="json") for k, w in bank.to_wire().items()}
        return window, None
    pack = pack_sketches(bank.sketches, compress=rng.random() < 0.5)
    if form == "text":
        return {**window, "input_pack": base64.b64encode(pack).decode()}, None
    return window, pack


def _setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    assert drift_models.DriftTile.__tablename__ == "drift_tile"
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_db(engine)
    rng = np.random.default_rng(7)
    with Session(engine) as s:
        s.add(
            Bundle(
                sha256="a" * 64,
                model_name="m",
                model_version=1,
                profile="x86-cpu",
                size=1,
                created_at=T0,
                expires_at=T0 + timedelta(days=9),
                path=str(_baseline_bundle(tmp_path, rng)),
            )
        )
        for d in range(6):
            s.add(Device(id=f"dev{d}", profile="x86-cpu"))
        s.commit()
    return engine, rng


def _ingest(engine, rng, minute: int, shift_of) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        for d in range(6):
            end = T0 + timedelta(minutes=minute, seconds=30)
            window, pack = _window(rng, shift_of(d), form=("frame", "text", "json")[d % 3])
            s.add(
                TelemetryRecord(
                    device_id=f"dev{d}",
                    stream_id="s",
                    seq=minute,
                    window_start=end - timedelta(seconds=30),
                    window_end=end,
                    received_at=end,
                    model_name="m",
                    model_version=1,
                    inference_count=150,
                    window=window,
                    input_pack=pack,
                )
            )
        s.commit()


def test_tiles_alerts_and_the_broken_device(tmp_path: Path) -> None:
    engine, rng = _setup(tmp_path)
    settings = DriftSettings(enabled=False, tile_s=60, alert_window_s=60, tile_grace_s=0)
    service = DriftService(engine=engine, settings=settings)

    # minute 0-1: all healthy; minute 2-4: dev3 is broken and the whole fleet moved
    for minute in range(2):
        _ingest(engine, rng, minute, lambda d: 0.0)
    service.tick(now=T0 + timedelta(minutes=2, seconds=1))
    with Session(engine) as s:
        bank = read_tiles(s, "m", 1, T0, T0 + timedelta(minutes=2))
        assert bank.sketches["x[0]"].count == 2 * 6 * 150
        assert bank.classes is not None and int(bank.classes.sum()) == 2 * 6 * 150
        assert s.exec(select(drift_models.DriftAlert)).all() == []
    latest = service.snapshot()[("m", 1)].report
    assert latest.status == "stable" and latest.tested == 2

    for minute in range(2, 5):
        _ingest(engine, rng, minute, lambda d: 3.0 if d == 3 else 0.8)
    service.tick(now=T0 + timedelta(minutes=5, seconds=1))
    with Session(engine) as s:
        alerts = s.exec(select(drift_models.DriftAlert)).all()
        assert [(a.status, a.scope) for a in alerts] == [("firing", "fleet")]
        assert set(alerts[0].worst_features) == set(FEATURES)
        # tiling is idempotent: a second tick reads nothing new
        assert tile_new_telemetry(s, tile_s=60, grace_s=0, now=T0 + timedelta(hours=1)).rows == 0

        ranked = rank_devices(
            s, "m", 1, window_s=180, now=T0 + timedelta(minutes=5), config=settings.config()
        )
        assert ranked[0].device_id == "dev3"
        assert ranked[0].drifted_features
        # the broken device also contaminates "the rest" of each healthy device (1 in 5 of
        # it), so they may test as different too; the ranking must still stand out
        assert ranked[0].score > 2 * ranked[1].score

        cohort = compare_cohorts(
            s, "m", 1, ["dev3"], None, 180, now=T0 + timedelta(minutes=5), config=settings.config()
        )
        assert cohort.status == "drifted"
        healthy = compare_cohorts(
            s, "m", 1, ["dev1"], ["dev2", "dev4"], 180, now=T0 + timedelta(minutes=5)
        )
        assert healthy.status == "stable"

    text = "".join(
        f"{m.name} {s.labels} {s.value}\n"
        for m in DriftCollector(service).collect()
        for s in m.samples
    )
    assert "edgefleet_fleet_drift_features {'model': 'm', 'version': '1'} 2" in text


def test_bad_sketches_are_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, rng = _setup(tmp_path)
    with Session(engine) as s:
        window, _ = _window(rng, 0.0, form="json")
        window["input_sketches"]["x[0]"]["data"] = "AAAA"
        window["input_sketches"]["x[1]"] = "not a sketch"
        good, packed = _window(rng, 0.0)
        assert packed is not None
        rows: list[tuple[dict, bytes | None]] = [
            (window, None),
            ({"input_pack": "!!!"}, None),
            ({}, packed[:-8]),  # cut short: its table (or zlib stream) says so
            (good, packed),
        ]
        for seq, (w, pack) in enumerate(rows):
            s.add(
                TelemetryRecord(
                    device_id="dev0",
                    stream_id="s",
                    seq=seq,
                    window_start=T0,
                    window_end=T0,
                    received_at=T0,
                    model_name="m",
                    model_version=1,
                    window=w,
                    input_pack=pack,
                )
            )
        s.commit()
        with caplog.at_level(logging.WARNING, logger="fleet.drift.tiles"):
            stats = tile_new_telemetry(s, tile_s=60, grace_s=0, now=T0 + timedelta(minutes=1))
        # the log names the row, the device and what is wrong
        assert "telemetry row 2 from dev0: sketch pack is not base64" in caplog.text
        # two bad JSON-form sketches, a pack that is not base64, one cut short
        assert stats.rows == 4 and stats.rejected_sketches == 4
        assert read_tiles(s, "m", 1, T0, T0 + timedelta(minutes=1)).sketches["x[0]"].count == 150


def test_rest_routes_and_cli_window_parsing(tmp_path: Path) -> None:
    from fleet.app import create_app
    from fleet.drift_cli import parse_window
    from tests.unit.test_fleet_api import FakePublisher, TestClient, make_keys, make_settings

    settings = make_settings(tmp_path, make_keys(tmp_path), auth_enabled=False)
    with TestClient(create_app(settings, publisher=FakePublisher())) as client:
        assert client.get("/api/v1/drift/alerts").json() == []
        r = client.get("/api/v1/drift", params={"model": "nope"})
        assert r.status_code == 404 and "no drift data" in r.json()["detail"]
        r = client.get("/api/v1/drift/devices", params={"model": "nope"})
        assert r.status_code == 200 and r.json()["devices"] == []
        assert client.get("/metrics").status_code == 200
    assert parse_window("1h") == 3600 and parse_window("90") == 90 and parse_window("15m") == 900


def test_tiler_reads_without_the_write_lock_and_never_counts_twice(tmp_path: Path) -> None:
    import sqlite3

    engine, rng = _setup(tmp_path)
    _ingest(engine, rng, 0, lambda d: 0.0)
    reader = reader_engine(engine)
    assert reader is not engine
    now = T0 + timedelta(minutes=1)

    # a read on the reader leaves the write lock free: ingest can commit meanwhile
    with Session(reader) as r:
        assert len(r.exec(select(TelemetryRecord.id)).all()) == 6
        other = sqlite3.connect(tmp_path / "fleet.db", timeout=0.1, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # would raise "database is locked" if held
        other.execute("ROLLBACK")
        other.close()

    # another fleet process tiles the same rows between this tiler's read and its write
    class Racing(Session):
        raced = False

        def rollback(self) -> None:
            super().rollback()
            if not Racing.raced:
                Racing.raced = True
                with Session(engine) as first:
                    assert tile_new_telemetry(first, tile_s=60, grace_s=0, now=now).rows == 6

    with Session(engine) as s, Racing(reader) as r:
        stats = tile_new_telemetry(s, tile_s=60, grace_s=0, now=now, reader=r)
        assert Racing.raced and stats.rows == 0  # it lost the race and wrote nothing
    with Session(engine) as s:
        bank = read_tiles(s, "m", 1, T0, now)
        assert bank.sketches["x[0]"].count == 6 * 150  # once, not twice


def test_one_fleet_process_at_a_time_does_the_drift_work(tmp_path: Path) -> None:
    engine, rng = _setup(tmp_path)
    _ingest(engine, rng, 0, lambda d: 0.0)
    settings = DriftSettings(enabled=False, tile_s=60, alert_window_s=60, tile_grace_s=0)
    a = DriftService(engine=engine, settings=settings, owner="a")
    b = DriftService(engine=engine, settings=settings, owner="b")
    now = T0 + timedelta(minutes=2)
    assert a.tick(now=now) and not b.tick(now=now)  # b waits: nothing merged twice
    assert a.tick(now=now + timedelta(seconds=60))  # the holder renews
    # the holder dies: after its lease runs out (3 intervals) the other one takes over
    assert not b.tick(now=now + timedelta(seconds=60 + 179))
    assert b.tick(now=now + timedelta(seconds=60 + 181))
    assert not a.tick(now=now + timedelta(seconds=60 + 182))
    with Session(engine) as s:
        assert read_tiles(s, "m", 1, T0, now).sketches["x[0]"].count == 6 * 150
