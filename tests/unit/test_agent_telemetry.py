"""agent telemetry and inference API: sketches match inferences, inputs are checked,
device readings are never invented."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.errors import InvalidInputError, NoModelError
from agent.inference import InferenceService
from agent.model import LoadedModel, load_model
from agent.system import SystemProbe
from agent.telemetry import TelemetryRecorder
from agent.testing import build_test_bundle
from hardware_profiles import load_profile
from protocol.bundle import BundleReader
from protocol.messages import TelemetryWindow, decode_message, encode_message
from protocol.signing import generate_signing_key
from protocol.sketch import FeatureSketch
from protocol.sketchpack import read_pack
from protocol.trust import TrustRoot

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def heldout() -> np.ndarray:
    with np.load(DIGITS / "heldout.npz") as npz:
        return npz["input"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, heldout: np.ndarray) -> LoadedModel:
    tmp = tmp_path_factory.mktemp("bundle")
    key = generate_signing_key()
    trust = TrustRoot.create(
        root_keys=[key], release_keys=[key], expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    b = build_test_bundle(
        tmp / "b.efb", model_path=DIGITS / "model.onnx", samples=heldout[:128], signer=key
    )
    out = tmp / "x"
    BundleReader(b.path).verify(trust, profile="x86-cpu", extract_to=out)
    return load_model(out, b.manifest, b.sha256, load_profile("x86-cpu"))


def fake_sys(tmp: Path, *, battery: bool) -> SystemProbe:
    sysfs = tmp / "sys"
    ac = sysfs / "class" / "power_supply" / "AC"
    ac.mkdir(parents=True)
    (ac / "type").write_text("Mains\n")
    if battery:
        bat = sysfs / "class" / "power_supply" / "BAT0"
        bat.mkdir()
        (bat / "type").write_text("Battery\n")
        (bat / "capacity").write_text("73\n")
        (bat / "status").write_text("Discharging\n")
        (bat / "power_now").write_text("4500000\n")
    for i, (kind, milli) in enumerate([("acpitz", 61000), ("x86_pkg_temp", 48500)]):
        z = sysfs / "class" / "thermal" / f"thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(f"{milli}\n")
    return SystemProbe(sysfs_root=sysfs, procfs_root=tmp / "proc")


def test_window_sketches_count_every_inference(
    tmp_path: Path, model: LoadedModel, heldout: np.ndarray
) -> None:
    clock = Clock(1_000_000.0)  # a multiple of 5 s: the window ends at +5 s
    rec = TelemetryRecorder(window_s=5.0, probe=fake_sys(tmp_path, battery=False), clock=clock)
    svc = InferenceService(rec)
    svc.swap(model)
    n = 150  # not a multiple of the 64-row flush: the close flushes the rest
    for i in range(n):
        svc.predict({"input": heldout[i : i + 1]})
    assert rec.take_closed() == []  # window not over yet
    clock.t += 5.0
    [closed] = rec.take_closed()
    msg = closed.to_message(device_id="dev-1", seq=7)
    back = decode_message(encode_message(msg), expect=TelemetryWindow)
    assert back.seq == 7 and back.inference_count == n
    assert back.bundle_sha256 == model.bundle_sha256 and back.model_version == 1
    assert back.latency_ms is not None and back.latency_ms.count == n
    inputs = back.sketches()
    assert back.input_sketches == {} and back.input_pack  # the packed form
    assert len(inputs) == 64  # the baseline's direct features of an 8x8 image
    assert {s.count for s in inputs.values()} == {n}
    assert sum(back.output_class_counts) == n and len(back.output_class_counts) == 10
    assert back.confidence is not None and back.confidence.count == n
    conf = FeatureSketch.from_wire(back.confidence)
    assert 0.0 < conf.quantile(0.5) <= 1.0
    # Feature sketches describe what was fed in: pixel 27 (centre) of these samples.
    centre = inputs["input[27]"]
    assert centre.max == pytest.approx(float(heldout[:n, 0, 3, 3].max()))
    assert back.battery is None
    assert back.cpu_temp_c == pytest.approx(48.5)
    assert back.error_counts == {}


def test_batched_predict_counts_rows(
    tmp_path: Path, model: LoadedModel, heldout: np.ndarray
) -> None:
    clock = Clock(1_000_000.0)
    rec = TelemetryRecorder(window_s=5.0, probe=fake_sys(tmp_path, battery=False), clock=clock)
    svc = InferenceService(rec)
    svc.swap(model)
    svc.predict({"input": heldout[:32]})
    svc.predict({"input": heldout[32:40]})
    [w] = rec.flush_all()
    assert w.inference_count == 40
    assert sum(w.output_class_counts) == 40
    assert w.input_pack is not None
    assert {s.count for s in read_pack(w.input_pack).sketches().values()} == {40}
    assert w.latency_ms is not None and w.latency_ms.count == 2  # one latency per call


def test_input_validation_errors_are_clear_and_counted(
    tmp_path: Path, model: LoadedModel, heldout: np.ndarray
) -> None:
    rec = TelemetryRecorder(window_s=5.0, probe=fake_sys(tmp_path, battery=False))
    svc = InferenceService(rec)
    with pytest.raises(NoModelError, match="no model is installed"):
        svc.predict({"input": heldout[:1]})
    svc.swap(model)
    cases = [
        ({"inputs": heldout[:1]}, r"missing \['input'\], unexpected \['inputs'\]"),
        ({"input": heldout[:1].astype(np.float64)}, r"dtype float64.*expects float32"),
        ({"input": heldout[:1, 0]}, r"shape \[1, 8, 8\].*expects \[N, 1, 8, 8\]"),
        ({"input": np.zeros((1, 1, 8, 9), np.float32)}, r"expects \[N, 1, 8, 8\]"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "empty batch"),
        (heldout[:1], "mapping of input name"),
    ]
    for bad, pattern in cases:
        with pytest.raises(InvalidInputError, match=pattern):
            svc.predict(bad)  # type: ignore[arg-type]
    svc.predict({"input": heldout[:1]})
    before, after = rec.flush_all()  # the switch closed the window of "no model"
    assert (before.error_counts, before.bundle_sha256) == ({"no_model": 1}, None)
    assert after.error_counts == {"invalid_input": len(cases)}
    assert after.inference_count == 1


def test_switch_closes_window_and_is_safe_under_concurrent_predicts(
    tmp_path: Path, model: LoadedModel, heldout: np.ndarray
) -> None:
    rec = TelemetryRecorder(window_s=60.0, probe=fake_sys(tmp_path, battery=False))
    svc = InferenceService(rec)
    svc.swap(model)
    stop = threading.Event()
    failures: list[BaseException] = []
    calls = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                svc.predict({"input": heldout[:1]})
                calls[0] += 1
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            svc.swap(model)  # re-serving the same model must never close it under a caller
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    total = sum(w.inference_count for w in rec.flush_all())
    assert total == calls[0]


def test_battery_absent_is_none_never_invented(tmp_path: Path) -> None:
    probe = fake_sys(tmp_path, battery=False)
    assert probe.battery() is None
    assert SystemProbe(sysfs_root=tmp_path / "nothing").read().battery is None
    assert SystemProbe(sysfs_root=tmp_path / "nothing").cpu_temp_c() is None


def test_battery_present_is_read(tmp_path: Path) -> None:
    b = fake_sys(tmp_path, battery=True).battery()
    assert b is not None
    assert (b.level_pct, b.charging, b.power_w) == (73.0, False, 4.5)


def test_real_process_readings() -> None:
    r = SystemProbe().read()
    assert r.mem_rss_bytes is not None and r.mem_rss_bytes > 1_000_000
    assert r.load_1m is not None
