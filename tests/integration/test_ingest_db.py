"""Batched ingest on both databases: SQLite's multi-row INSERT and PostgreSQL's COPY path
must store the same rows and report the same duplicates."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from fleet.db import make_engine, migrate
from fleet.ingest import IngestStats, Outcome
from fleet.models import Device, TelemetryRecord
from fleet.worker import ingest_batch
from protocol.messages import Presence, encode_message
from protocol.sketch import FeatureSketch
from protocol.sketchpack import pack_sketches
from tests.unit.test_fleet_ingest import T0, heartbeat, telemetry, topic_of

PACK = pack_sketches({f"f{i}": FeatureSketch.of(np.arange(i, i + 40.0)) for i in range(64)})


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return str(request.getfixturevalue("pg_url"))


def _item(msg: object) -> tuple[str, bytes]:
    return topic_of(msg), encode_message(msg)  # type: ignore[arg-type]


def test_batches_store_each_window_once_and_name_the_duplicates(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        stats = IngestStats()
        first = [_item(telemetry(seq, device_id=f"dev-{seq % 3}")) for seq in range(6)]
        # a duplicate inside the batch, windows on both sides of a control message (two
        # runs of windows in one transaction), and a new device
        second = [
            _item(telemetry(6, device_id="dev-0")),
            _item(telemetry(6, device_id="dev-0")),
            _item(heartbeat(device_id="dev-1")),
            _item(telemetry(0, device_id="dev-0")),  # stored by the first batch
            _item(  # a telemetry frame
                telemetry(
                    7,
                    device_id="dev-9",
                    input_pack=PACK,
                    window_end=T0 + timedelta(minutes=8, microseconds=250),
                )
            ),
            _item(Presence(device_id="dev-9", online=False)),
        ]
        r1 = ingest_batch(engine, first, stats)
        r2 = ingest_batch(engine, second, stats)
        assert [r.outcome for r in r1] == [Outcome.STORED] * 6
        assert [r.outcome for r in r2] == [
            Outcome.STORED, Outcome.DUPLICATE, Outcome.STORED, Outcome.DUPLICATE,
            Outcome.STORED, Outcome.STORED,
        ]  # fmt: skip
        with Session(engine) as s:
            assert s.exec(select(func.count()).select_from(TelemetryRecord)).one() == 8
            row = s.exec(select(TelemetryRecord).where(TelemetryRecord.seq == 7)).one()
            assert row.device_id == "dev-9" and row.latency_p95_ms == pytest.approx(95, abs=2)
            assert row.window["device_id"] == "dev-9" and row.window_end.tzinfo is not None
            # the frame's JSON in ``window``, its pack's bytes as they came in ``input_pack``
            assert row.input_pack == PACK and "input_pack" not in row.window
            # times read back exactly and compare as times (SQLite: written by raw executemany)
            end = T0 + timedelta(minutes=8, microseconds=250)
            assert (row.window_start, row.window_end) == (T0 + timedelta(minutes=7), end)
            later = select(TelemetryRecord.seq).where(TelemetryRecord.window_end >= end)
            assert s.exec(later).all() == [7]
            assert (
                s.exec(select(TelemetryRecord.input_pack).where(TelemetryRecord.seq == 6)).one()
                is None
            )
            dev9 = s.get(Device, "dev-9")
            assert dev9 is not None and dev9.auto_registered and not dev9.online
    finally:
        engine.dispose()
