"""How fast does the fleet see an accuracy drop, from labels and from the label-free estimate?

Simulated, in-process, with a fake clock (no processes, no broker): 2 cohorts x N devices
make predictions on digits held-out samples; at ``drop_at`` the canary cohort's accuracy is
cut (scenario ``worse``: it switches to the 'worse' digits model; scenario ``noise``: its
inputs get Gaussian noise). Ground truth arrives for a fraction (coverage) of predictions
after a random lag (exponential, mean ``lag``, capped at 24 h). The real code paths run:
agent/quality.py records predictions and joins labels on each "device", its sections go
into real `TelemetryWindow` messages (encoded and decoded), and fleet/quality/stats.py
aggregates them. Each window the fleet compares the canary cohort with the control cohort
over the trailing ``alert_window``: a drop is detected when the canary is worse by more
than ``margin`` (labels: with at least ``min_labels`` in both; estimate: ``min_rows``).

Reported: time from the drop to detection (labels, estimate), false alarms before the drop,
and the estimate's error against the true accuracy (known in simulation) after the drop.
The calibration maps are fitted on one half of the held-out set; predictions stream from
the other half. Run: ``.venv/bin/python benchmarks/quality.py [--quick]``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.quality import QualityRecorder  # noqa: E402
from compiler.calibration import expected_calibration_error, fit_calibration  # noqa: E402
from fleet.quality.stats import QualityAccumulator  # noqa: E402
from protocol.messages import TelemetryWindow, decode_message, encode_message  # noqa: E402

WINDOW_S = 300.0
HOUR = 3600.0


@dataclass(frozen=True)
class Scenario:
    name: str
    coverage: float
    lag_mean_s: float


def _logits(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x.astype(np.float32)})[0])


def _stub_model(tmp: Path, name: str, version: int, cal_bytes: bytes | None) -> Any:
    """Just what QualityRecorder reads of a LoadedModel: manifest, directory, identity."""
    d = tmp / f"{name}-v{version}"
    (d / "model").mkdir(parents=True)
    files = []
    if cal_bytes is not None:
        (d / "model" / "calibration.json").write_bytes(cal_bytes)
        files.append(SimpleNamespace(path="model/calibration.json", role="calibration_map"))
    manifest = SimpleNamespace(
        task="classification",
        outputs=(SimpleNamespace(name="logits"),),
        files=tuple(files),
        class_names=(),
    )
    return SimpleNamespace(
        manifest=manifest,
        directory=d,
        bundle_sha256=f"{version:064x}",
        model_name=name,
        model_version=version,
    )


def run(
    scenario: Scenario,
    kind: str,
    streams: dict[str, tuple[np.ndarray, np.ndarray]],
    models: dict[str, Any],
    *,
    devices: int,
    per_window: int,
    hours: float,
    drop_at_h: float,
    alert_window_s: float,
    margin: float,
    min_labels: int,
    min_rows: int,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    clock = SimpleNamespace(t=1_700_000_000.0 - 1_700_000_000.0 % HOUR)
    start = clock.t
    drop_t = start + drop_at_h * HOUR
    recs = {
        (c, i): QualityRecorder(clock=lambda: clock.t, capacity=10_000, hash_inputs=False)
        for c in ("control", "canary")
        for i in range(devices)
    }
    pending: list[tuple[float, int, tuple[str, int], str, int]] = []
    tie = 0
    windows: list[tuple[float, str, dict[str, Any]]] = []
    truth: dict[tuple[str, int], list[int]] = {}
    detected: dict[str, float | None] = {"labels": None, "estimate": None}
    false_alarms = {"labels": 0, "estimate": 0}
    est_err: list[float] = []
    seq = 0
    n_windows = int(hours * HOUR / WINDOW_S)
    for w in range(n_windows):
        w_start = start + w * WINDOW_S
        for (cohort, dev), rec in recs.items():
            dropped = cohort == "canary" and w_start >= drop_t
            stream = "drop" if dropped else "base"
            model = models["drop" if dropped and kind == "worse" else "base"]
            logits, labels = streams[stream]
            for j in range(per_window):
                clock.t = w_start + (j + 0.5) * WINDOW_S / per_window
                k = int(rng.integers(len(labels)))
                pid = f"{cohort}{dev}-{w}-{j}"
                rec.record(model, {}, {"logits": logits[k : k + 1]}, pid)
                correct = int(logits[k].argmax() == labels[k])
                truth.setdefault((cohort, w), []).append(correct)
                if rng.random() < scenario.coverage:
                    lag = (
                        min(rng.exponential(scenario.lag_mean_s), 24 * HOUR)
                        if scenario.lag_mean_s
                        else 0.0
                    )
                    tie += 1
                    heapq.heappush(
                        pending, (clock.t + lag, tie, (cohort, dev), pid, int(labels[k]))
                    )
        w_end = w_start + WINDOW_S
        while pending and pending[0][0] <= w_end:
            at, _, key, pid, label = heapq.heappop(pending)
            clock.t = at
            recs[key].report_label(pid, label)
        clock.t = w_end
        for (cohort, dev), rec in recs.items():
            model = models[
                "drop" if cohort == "canary" and w_start >= drop_t and kind == "worse" else "base"
            ]
            report, est = rec.take(model.bundle_sha256)
            msg = TelemetryWindow(
                device_id=f"{cohort}-{dev}",
                seq=seq,
                window_start=datetime.fromtimestamp(w_start, UTC),
                window_end=datetime.fromtimestamp(w_end, UTC),
                bundle_sha256=model.bundle_sha256,
                model_name=model.model_name,
                model_version=model.model_version,
                inference_count=per_window,
                labels=report,
                estimate=est,
            )
            seq += 1
            wire = decode_message(encode_message(msg)).model_dump(mode="json")
            windows.append((w_end, cohort, wire))
        # fleet side: trailing alert window per cohort, canary vs control
        lo = w_end - alert_window_s
        figs = {}
        for cohort in ("control", "canary"):
            accs = []
            for version in {m.model_version for m in models.values()}:
                a = QualityAccumulator(model="digits", version=version)
                for t, c, win in windows:
                    if c == cohort and t > lo:
                        a.add(win, "")
                accs.append(a)
            n = sum(a.labels for a in accs)
            k = sum(a.correct for a in accs)
            rows = sum(a.est_rows for a in accs)
            cal = sum(a.est_calibrated for a in accs)
            figs[cohort] = (n, k / n if n else None, rows, cal / rows if rows else None)
        windows = [x for x in windows if x[0] > lo]
        (cn, cacc, crows, cest), (kn, kacc, krows, kest) = figs["canary"], figs["control"]
        after = w_start >= drop_t
        checks = {
            "labels": cn >= min_labels
            and kn >= min_labels
            and kacc is not None
            and cacc is not None
            and kacc - cacc > margin,
            "estimate": crows >= min_rows
            and krows >= min_rows
            and kest is not None
            and cest is not None
            and kest - cest > margin,
        }
        for src, fired in checks.items():
            if fired and not after:
                false_alarms[src] += 1
            if fired and after and detected[src] is None:
                detected[src] = (w_end - drop_t) / 60.0
        if after and cest is not None:
            true_acc = [
                x
                for (c, ww), xs in truth.items()
                if c == "canary" and start + ww * WINDOW_S + WINDOW_S > lo
                for x in xs
            ]
            est_err.append(abs(cest - float(np.mean(true_acc))))
    return {
        "scenario": kind,
        "coverage": scenario.coverage,
        "lag_mean_h": scenario.lag_mean_s / HOUR,
        "detect_min_labels": detected["labels"],
        "detect_min_estimate": detected["estimate"],
        "false_alarm_windows_labels": false_alarms["labels"],
        "false_alarm_windows_estimate": false_alarms["estimate"],
        "estimate_abs_error_mean": float(np.mean(est_err)) if est_err else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with np.load(ROOT / "models" / "digits" / "heldout.npz") as npz:
        x, y = npz["input"], npz["label"]
    fit, ev = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    good = _logits(ROOT / "models" / "digits" / "model.onnx", x)
    worse = _logits(ROOT / "models" / "digits-worse" / "model.onnx", x)
    noisy_x = np.clip(x + np.random.default_rng(7).normal(0, 0.4, x.shape), 0, 1)
    noisy = _logits(ROOT / "models" / "digits" / "model.onnx", noisy_x)
    cal_good = fit_calibration("logits", good[fit], y[fit])
    cal_worse = fit_calibration("logits", worse[fit], y[fit])

    def ece(z: np.ndarray, cal: Any) -> tuple[float, float]:
        zs = z - z.max(axis=1, keepdims=True)
        raw = np.exp(zs) / np.exp(zs).sum(axis=1, keepdims=True)
        return (
            expected_calibration_error(raw, y[ev]),
            expected_calibration_error(cal.probabilities(z), y[ev]),
        )

    calib = {
        "good": {
            "temperature": cal_good.temperature,
            "accuracy": float((good[ev].argmax(1) == y[ev]).mean()),
        },
        "worse": {
            "temperature": cal_worse.temperature,
            "accuracy": float((worse[ev].argmax(1) == y[ev]).mean()),
        },
        "noise": {
            "temperature": cal_good.temperature,
            "accuracy": float((noisy[ev].argmax(1) == y[ev]).mean()),
        },
    }
    for key, z, cal in (
        ("good", good, cal_good),
        ("worse", worse, cal_worse),
        ("noise", noisy, cal_good),
    ):
        before, after = ece(z[ev], cal)
        p = cal.probabilities(z[ev])
        calib[key].update(
            ece_before=before,
            ece_after=after,
            mean_calibrated_confidence=float(p.max(axis=1).mean()),
        )
    tmp = Path(tempfile.mkdtemp(prefix="quality-bench-"))
    models = {
        "base": _stub_model(tmp, "digits", 1, cal_good.to_bytes()),
    }
    coverages = (0.05, 0.25, 1.0)
    lags = (0.0, 1 * HOUR, 6 * HOUR)
    if args.quick:
        coverages, lags = (0.05, 1.0), (0.0, 6 * HOUR)
    results = []
    for kind in ("worse", "noise"):
        models["drop"] = (
            _stub_model(tmp, "digits", 2, cal_worse.to_bytes())
            if kind == "worse"
            else models["base"]
        )
        streams = {
            "base": (good[ev], y[ev]),
            "drop": ((worse if kind == "worse" else noisy)[ev], y[ev]),
        }
        for cov in coverages:
            for lag in lags:
                results.append(
                    run(
                        Scenario(name=kind, coverage=cov, lag_mean_s=lag),
                        kind,
                        streams,
                        models,
                        devices=5 if args.quick else 10,
                        per_window=5 if args.quick else 8,
                        hours=18.0 if args.quick else 24.0,
                        drop_at_h=4.0,
                        alert_window_s=2 * HOUR,
                        margin=0.05,
                        min_labels=100,
                        min_rows=500,
                        seed=11,
                    )
                )
    elapsed = time.perf_counter() - t0
    print("## Calibration map (temperature scaling; fit on half of held-out, ECE on the other)\n")
    print("| stream | T | top-1 accuracy | mean calibrated conf. | ECE before | ECE after |")
    print("|---|---|---|---|---|---|")
    for k, c in calib.items():
        print(
            f"| {k} | {c['temperature']:.3f} | {c['accuracy']:.3f} | "
            f"{c['mean_calibrated_confidence']:.3f} | {c['ece_before']:.3f} | "
            f"{c['ece_after']:.3f} |"
        )
    print(
        "\n## Time to detect a seeded accuracy drop (minutes after the drop; "
        "canary vs control, margin 0.05, 2 h trailing window)\n"
    )
    print(
        "| drop | coverage | mean lag (h) | labels: detect (min) | estimate: detect (min) "
        "| false alarms (labels / estimate windows) | estimate abs. error |"
    )
    print("|---|---|---|---|---|---|---|")

    def fmt(v: float | None) -> str:
        return "not detected" if v is None else f"{v:.0f}"

    for r in results:
        err = r["estimate_abs_error_mean"]
        print(
            f"| {r['scenario']} | {r['coverage']:.0%} | {r['lag_mean_h']:g} | "
            f"{fmt(r['detect_min_labels'])} | {fmt(r['detect_min_estimate'])} | "
            f"{r['false_alarm_windows_labels']} / {r['false_alarm_windows_estimate']} | "
            f"{'-' if err is None else f'{err:.3f}'} |"
        )
    print(f"\n{elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"quick": args.quick, "calibration": calib, "detection": results, "elapsed_s": elapsed},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
