"""Model quality: device-side label join, wire sections, fleet aggregation, REST, gate,
calibration map."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.inference import InferenceService
from agent.model import LoadedModel, load_model
from agent.quality import LabelOutcome, QualityRecorder
from agent.telemetry import TelemetryRecorder, merge_window_payloads
from agent.testing import build_test_bundle
from compiler.calibration import expected_calibration_error, fit_calibration
from fleet.app import create_app
from fleet.quality.stats import QualityAccumulator
from fleet.rollout.gate import GateStatus, QualityReading, quality_gate
from hardware_profiles import load_profile
from protocol.bundle import BundleReader
from protocol.messages import LabelCommand, TelemetryWindow, decode_message, encode_message
from protocol.signing import generate_signing_key
from protocol.trust import TrustRoot
from tests.unit.test_fleet_api import FakePublisher, TestClient, make_keys, make_settings

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS / "heldout.npz") as npz:
        return npz["input"], npz["label"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, heldout: tuple) -> LoadedModel:
    tmp = tmp_path_factory.mktemp("bundle")
    key = generate_signing_key()
    trust = TrustRoot.create(
        root_keys=[key], release_keys=[key], expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    b = build_test_bundle(
        tmp / "b.efb", model_path=DIGITS / "model.onnx", samples=heldout[0][:128], signer=key
    )
    out = tmp / "x"
    BundleReader(b.path).verify(trust, profile="x86-cpu", extract_to=out)
    return load_model(out, b.manifest, b.sha256, load_profile("x86-cpu"))


def _serve(model: LoadedModel, clock: Clock) -> tuple[InferenceService, QualityRecorder]:
    quality = QualityRecorder(clock=clock, capacity=50, late_after_s=3600)
    service = InferenceService(quality=quality)
    service.swap(model)
    return service, quality


def test_labels_join_once_and_bad_ones_are_counted(model: LoadedModel, heldout: tuple) -> None:
    x, y = heldout
    clock = Clock(1_000_000.0)
    service, quality = _serve(model, clock)
    ids = []
    for i in range(10):
        pid, out = service.predict_with_id({"input": x[i : i + 1]})
        ids.append((pid, int(out["logits"].argmax())))
    clock.t += 7200.0  # two hours later: late (threshold 1 h) but still joined
    assert service.report_label(ids[0][0], int(y[0])) is LabelOutcome.JOINED
    assert service.report_label(ids[0][0], int(y[0])) is LabelOutcome.DUPLICATE
    assert service.report_label(ids[0][0], 3) is LabelOutcome.DUPLICATE  # first one stands
    assert service.report_label("nope", 1) is LabelOutcome.UNKNOWN
    assert service.report_label(ids[1][0], 10) is LabelOutcome.WRONG_TYPE  # not a class
    assert service.report_label(ids[1][0], True) is LabelOutcome.WRONG_TYPE
    assert service.report_label(ids[1][0], "seven") is LabelOutcome.WRONG_TYPE
    assert service.report_label(ids[1][0], [1, 2]) is LabelOutcome.WRONG_TYPE  # batch of 1
    # labels out of order, one wrong on purpose
    for i in (5, 2, 1):
        assert service.report_label(ids[i][0], int(y[i])) is LabelOutcome.JOINED
    wrong = (ids[3][1] + 1) % 10
    assert service.report_label(ids[3][0], wrong) is LabelOutcome.JOINED

    report, sums = quality.take(model.bundle_sha256)
    assert report is not None and sums is not None
    assert report.rejected == {"duplicate": 2, "unknown_prediction": 1, "wrong_type": 4}
    (group,) = report.joined
    assert group.model_version == model.model_version
    assert sum(n for _, _, n in group.confusion) == 5
    assert sum(group.lag_counts) == 5 and group.late == 5
    assert sums.rows == 10 and not sums.calibrated
    assert 0 < sums.calibrated_max_sum <= 10
    # taken: nothing is reported twice
    assert quality.take(model.bundle_sha256) == (None, None)


def test_record_is_bounded_and_evicted_ids_are_unknown(model: LoadedModel, heldout: tuple) -> None:
    service, quality = _serve(model, Clock(0.0))
    first, _ = service.predict_with_id({"input": heldout[0][:1]})
    for i in range(60):
        service.predict_with_id({"input": heldout[0][i : i + 1]})
    assert len(quality) == 50
    assert service.report_label(first, 0) is LabelOutcome.UNKNOWN


def test_fleet_labels_join_by_id_or_input_hash(model: LoadedModel, heldout: tuple) -> None:
    from agent.quality import input_hash

    service, quality = _serve(model, Clock(0.0))
    x = heldout[0][7:8].astype(np.float32)
    pid, _ = service.predict_with_id({"input": x})
    cmd = LabelCommand(
        device_id="d0",
        labels=(
            {"input_hash": input_hash({"input": x}), "label": int(heldout[1][7])},
            {"prediction_id": pid, "label": int(heldout[1][7])},  # same prediction: duplicate
            {"prediction_id": "gone", "label": 1},
        ),
    )
    cmd = decode_message(encode_message(cmd))
    assert quality.apply(cmd.labels) == [
        LabelOutcome.JOINED,
        LabelOutcome.DUPLICATE,
        LabelOutcome.UNKNOWN,
    ]


def test_window_carries_labels_and_merges_without_double_counting(
    model: LoadedModel, heldout: tuple
) -> None:
    x, y = heldout
    clock = Clock(3600.0 * 100)
    quality = QualityRecorder(clock=clock)
    telemetry = TelemetryRecorder(window_s=60.0, clock=clock, quality_source=quality.take)
    service = InferenceService(telemetry, quality=quality)
    service.swap(model)
    payloads = []
    for w in range(2):
        for i in range(20):
            pid, _ = service.predict_with_id({"input": x[i : i + 1]})
            service.report_label(pid, int(y[i]))
        service.report_label("unknown", 1)
        clock.t += 60.0
        (closed,) = telemetry.take_closed()
        msg = closed.to_message(device_id="d0", seq=w, stream_id="s")
        payloads.append(encode_message(msg))
    a = decode_message(payloads[0], expect=TelemetryWindow)
    assert a.labels is not None and a.estimate is not None and a.cpu_time_s is not None
    assert a.extra["quality_estimated_error"] == pytest.approx(
        1 - a.estimate.calibrated_max_sum / 20
    )
    merged = decode_message(merge_window_payloads(*payloads), expect=TelemetryWindow)
    assert merged.labels.rejected == {"unknown_prediction": 2}
    assert sum(n for g in merged.labels.joined for _, _, n in g.confusion) == 40
    assert merged.estimate.rows == 40

    acc = QualityAccumulator(model=model.model_name, version=model.model_version)
    for raw in payloads:
        acc.add(decode_message(raw).model_dump(mode="json"), "d0")
    f = acc.figures()
    assert f["labeled"]["labels"] == 40 and f["predictions"] == 40 and f["coverage"] == 1.0
    assert f["labeled"]["accuracy"] == pytest.approx(
        float((model_predict(model, x[:20]) == y[:20]).mean())
    )
    assert f["rejected_labels"] == {"unknown_prediction": 2}
    assert f["estimate"]["accuracy"] is not None


def model_predict(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    return model.backend.run({"input": x.astype(np.float32)})["logits"].argmax(axis=1)


def test_quality_gate() -> None:
    ok = QualityReading(
        canary_labels=500, canary_accuracy=0.97, control_labels=500, control_accuracy=0.98
    )
    assert quality_gate(ok).status is GateStatus.PASS
    bad = QualityReading(
        canary_labels=500, canary_accuracy=0.80, control_labels=500, control_accuracy=0.98
    )
    assert quality_gate(bad).status is GateStatus.FAIL
    few = QualityReading(canary_labels=5, canary_accuracy=0.1, control_labels=500)
    assert quality_gate(few).status is GateStatus.NOT_AVAILABLE
    est = QualityReading(
        canary_rows=1000, canary_estimate=0.6, control_rows=1000, control_estimate=0.95
    )
    r = quality_gate(est)
    assert r.status is GateStatus.FAIL and "estimated" in r.detail
    assert quality_gate(bad, max_drop=None).status is GateStatus.OFF


def test_calibration_map_lowers_ece_of_an_underconfident_model(heldout: tuple) -> None:
    import onnxruntime as ort

    x, y = heldout
    sess = ort.InferenceSession(str(DIGITS.parent / "digits-worse" / "model.onnx"))
    z = sess.run(None, {"input": x.astype(np.float32)})[0]
    cal = fit_calibration("logits", z, y)
    assert cal.figures["ece_after"] < cal.figures["ece_before"]
    probs = cal.probabilities(z)
    assert (probs.argmax(axis=1) == z.argmax(axis=1)).all()  # predictions never change
    assert expected_calibration_error(probs, y) < cal.figures["ece_before"]
    assert cal.to_bytes() == fit_calibration("logits", z, y).to_bytes()  # deterministic


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, FakePublisher]]:
    keys = make_keys(tmp_path)
    settings = make_settings(tmp_path, keys, auth_enabled=False)
    publisher = FakePublisher()
    with TestClient(create_app(settings, publisher=publisher)) as client:
        yield client, publisher


def _window(seq: int, *, labels: list[tuple[int, int, int]], rows: int) -> TelemetryWindow:
    end = datetime.now(UTC) - timedelta(minutes=5 - seq)
    return TelemetryWindow.model_validate(
        {
            "device_id": "d0",
            "stream_id": "s",
            "seq": seq,
            "window_start": (end - timedelta(minutes=1)).isoformat(),
            "window_end": end.isoformat(),
            "model_name": "digits",
            "model_version": 2,
            "bundle_sha256": "a" * 64,
            "inference_count": rows,
            "cpu_time_s": 0.5,
            "labels": {
                "joined": [
                    {
                        "bundle_sha256": "a" * 64,
                        "model_name": "digits",
                        "model_version": 2,
                        "predicted_hour": end.replace(minute=0, second=0).isoformat(),
                        "confusion": labels,
                        "lag_counts": [sum(n for *_, n in labels)],
                    }
                ],
                "rejected": {"duplicate": 1},
            },
            "estimate": {
                "rows": rows,
                "calibrated_max_sum": 0.9 * rows,
                "raw_max_sum": 0.95 * rows,
                "calibrated": True,
            },
        }
    )


def test_fleet_quality_cost_labels_alerts_over_rest(
    api: tuple[TestClient, FakePublisher],
) -> None:
    from sqlmodel import Session

    from fleet.ingest import handle
    from protocol.topics import Channel, device_topic

    client, publisher = api
    engine = client.app.state.engine  # type: ignore[attr-defined]
    msgs = [
        _window(0, labels=[(1, 1, 8), (2, 1, 2)], rows=40),
        _window(1, labels=[(3, 3, 10)], rows=40),
    ]
    with Session(engine) as session:
        for m in [*msgs, msgs[0]]:  # a redelivered window is dropped at ingest
            handle(device_topic("d0", Channel.TELEMETRY), encode_message(m), session)
        session.commit()
    q = client.get("/api/v1/quality", params={"model": "digits"}).json()
    assert q["version"] == 2
    assert q["labeled"]["labels"] == 20 and q["labeled"]["accuracy"] == pytest.approx(0.9)
    assert q["coverage"] == pytest.approx(20 / 80)
    assert q["estimate"]["accuracy"] == pytest.approx(0.9)
    assert q["rejected_labels"] == {"duplicate": 2}
    recall = {c["class"]: c["recall"] for c in q["labeled"]["per_class"]}
    assert recall[1] == pytest.approx(0.8)

    cost = client.get("/api/v1/cost", params={"model": "digits", "version": 2}).json()
    (prof,) = cost["profiles"]
    assert prof["cpu_s_per_1k_inferences"] == pytest.approx(1000 * 1.0 / 80)
    assert prof["battery_drain_pct_per_h"] is None  # no battery: never invented
    assert prof["telemetry_bytes_per_device_per_day"] > 0

    body = {"labels": [{"device_id": "d0", "prediction_id": "p1", "label": 3}]}
    assert client.post("/api/v1/labels", json=body).json() == {"accepted": 1, "duplicates": 0}
    assert client.post("/api/v1/labels", json=body).json() == {"accepted": 0, "duplicates": 1}
    bad = {"labels": [{"device_id": "d0", "label": 3}]}
    assert client.post("/api/v1/labels", json=bad).status_code == 422
    client.post("/api/v1/quality/evaluate")
    (cmd,) = [c for c in publisher.sent if isinstance(c, LabelCommand)]
    assert cmd.device_id == "d0" and cmd.labels[0].prediction_id == "p1"
    client.post("/api/v1/quality/evaluate")  # sent once only
    assert len([c for c in publisher.sent if isinstance(c, LabelCommand)]) == 1

    assert isinstance(client.get("/api/v1/alerts").json(), list)
    metrics = client.get("/metrics").text
    assert 'edgefleet_model_accuracy{model="digits",source="labels",version="2"} 0.9' in metrics


def _per_call_reference(ys: list[np.ndarray]) -> tuple[list[tuple[int, ...]], float, np.ndarray]:
    """What `QualityRecorder.record` computed call by call before it batched: each call's
    outputs kept when all its rows are probabilities, else their softmax."""
    predicted, raw_max, col = [], 0.0, np.zeros(ys[0].shape[1])
    for y in ys:
        z = y.astype(np.float64)
        if not (z.min() >= 0 and np.abs(z.sum(axis=1) - 1.0).max() <= 1e-3 + 1e-5):
            e = np.exp(z - z.max(axis=1, keepdims=True))
            z = e / e.sum(axis=1, keepdims=True)
        predicted.append(tuple(int(c) for c in z.argmax(axis=1)))
        raw_max += float(z.max(axis=1).sum())
        col += z.sum(axis=0)
    return predicted, raw_max, col


def test_batched_bookkeeping_matches_the_per_call_result(model: LoadedModel) -> None:
    """Calls are drained in batches (and before every read): the records, labels and sums
    equal the per-call computation, call boundaries kept (a call of logits next to a call
    of probabilities, a batch of 3 rows, a call of no rows), and an application changing
    its outputs after the call changes nothing."""
    rng = np.random.default_rng(3)
    clock = Clock(5_000_000.0)
    quality = QualityRecorder(clock=clock, capacity=1000, hash_inputs=False)
    ys: list[np.ndarray] = []
    for i in range(150):  # more than one drain's worth (64 rows), and a tail
        if i % 7 == 3:
            y = rng.dirichlet(np.ones(10), size=1).astype(np.float32)  # already probabilities
        elif i % 11 == 5:
            y = rng.normal(size=(3, 10)).astype(np.float32)  # a batch
        else:
            y = rng.normal(scale=3, size=(1, 10)).astype(np.float32)  # logits
        ys.append(y.copy())
        quality.record(model, {"input": np.zeros((len(y), 64), np.float32)}, {"logits": y}, f"p{i}")
        y[:] = 0.0  # the application reuses its buffer
    quality.record(model, {"input": np.zeros((0, 64), np.float32)},
                   {"logits": np.zeros((0, 10), np.float32)}, "empty")  # fmt: skip
    predicted, raw_max, col = _per_call_reference(ys)
    for i in (0, 3, 5, 149):  # joined by the class each call predicted: all correct
        label = list(predicted[i]) if len(predicted[i]) > 1 else predicted[i][0]
        assert quality.report_label(f"p{i}", label) is LabelOutcome.JOINED
    assert quality.report_label("empty", []) is LabelOutcome.JOINED
    assert len(quality) == 151
    report, sums = quality.take(model.bundle_sha256)
    assert sums is not None and report is not None
    assert sums.rows == sum(len(y) for y in ys) and not sums.calibrated
    assert sums.raw_max_sum == pytest.approx(raw_max, rel=1e-9)
    assert sums.calibrated_max_sum == pytest.approx(raw_max, rel=1e-9)
    assert np.allclose(sums.class_prob_sums, col, rtol=1e-5)
    cells = {(p, t): n for p, t, n in report.joined[0].confusion}
    assert sum(cells.values()) == 1 + 1 + len(ys[5]) + 1 and all(p == t for p, t in cells)
