"""ONNX -> TFLite int8 benchmark: conversion time, size, LiteRT vs ONNX Runtime latency (same
threads, interleaved rounds), top-1 agreement with ORT's QDQ model, top-1 drop vs float.

    .venv/bin/python benchmarks/tflite.py [--quick] [--threads N]

Prints a markdown table; writes benchmarks/results/tflite.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from compiler.data import validate_arrays  # noqa: E402
from compiler.model import load_model, make_session  # noqa: E402
from compiler.quantize import QuantConfig, preprocess, quantize_static  # noqa: E402
from compiler.tflite import convert, litert_runner, load_check  # noqa: E402


def _latency_ratio(
    a: Any, b: Any, feed: dict[str, np.ndarray], rounds: int, runs: int
) -> dict[str, float]:
    """Median over interleaved rounds of (median a / median b), plus each side's median ms."""
    for _ in range(5):
        a(feed)
        b(feed)
    ratios, ams, bms = [], [], []
    for _ in range(rounds):
        ta, tb = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            a(feed)
            ta.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b(feed)
            tb.append(time.perf_counter() - t0)
        ma, mb = statistics.median(ta), statistics.median(tb)
        ratios.append(ma / mb)
        ams.append(ma * 1e3)
        bms.append(mb * 1e3)
    return {
        "ratio": statistics.median(ratios),
        "a_ms": statistics.median(ams),
        "b_ms": statistics.median(bms),
    }


def _run_all(fn: Any, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([fn({"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def bench(
    name: str,
    model_path: Path,
    cal: np.ndarray,
    held: np.ndarray,
    labels: np.ndarray | None,
    threads: int,
    rounds: int,
    runs: int,
    work: Path,
) -> dict[str, Any]:
    model = load_model(model_path)
    pre = work / f"{name}.pre.onnx"
    preprocess(model.serialized(), pre)
    ds = validate_arrays({"input": cal}, model.inputs, role="calibration", source=name)
    qdq = work / f"{name}.qdq.onnx"
    cfg = QuantConfig(
        activation_type="int8", weight_type="int8", per_channel=True, symmetric_activations=False
    )
    quantize_static(pre, qdq, ds, cfg)
    import onnx

    t0 = time.perf_counter()
    conv = convert(onnx.load(str(qdq)), mode="int8")
    convert_s = time.perf_counter() - t0
    load_check(conv.data, origins=conv.origins)
    tfl = work / f"{name}.tflite"
    tfl.write_bytes(conv.data)

    tfl_run = litert_runner(tfl, threads=threads)
    ort_q = make_session(qdq, threads=threads)
    ort_f = make_session(pre, threads=threads)

    def ort_qdq(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return ort_q.run(None, feed)

    def ort_float(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return ort_f.run(None, feed)

    lat = _latency_ratio(tfl_run, ort_qdq, {"input": held[:1]}, rounds, runs)
    y_t = _run_all(tfl_run, held)
    y_q = _run_all(ort_qdq, held)
    y_f = _run_all(ort_float, held)
    agree = float(np.mean(y_t.argmax(1) == y_q.argmax(1)))
    row: dict[str, Any] = {
        "model": name,
        "convert_s": round(convert_s, 3),
        "tflite_bytes": len(conv.data),
        "onnx_int8_bytes": qdq.stat().st_size,
        "size_ratio": round(len(conv.data) / qdq.stat().st_size, 3),
        "litert_ms": round(lat["a_ms"], 3),
        "ort_int8_ms": round(lat["b_ms"], 3),
        "latency_ratio_median": round(lat["ratio"], 3),
        "top1_agreement_vs_ort_qdq": round(agree, 4),
        "heldout_samples": len(held),
        "op_counts": conv.op_counts,
    }
    if labels is not None:
        acc_f = float(np.mean(y_f.argmax(1) == labels))
        acc_t = float(np.mean(y_t.argmax(1) == labels))
        row.update(
            {
                "float_top1": round(acc_f, 4),
                "tflite_int8_top1": round(acc_t, 4),
                "top1_drop_points": round((acc_f - acc_t) * 100, 3),
            }
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rounds, runs = (5, 10) if args.quick else (15, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        d = ROOT / "models" / "digits"
        cal = np.load(d / "calibration.npz")["input"]
        held = np.load(d / "heldout.npz")
        rows.append(
            bench(
                "digits",
                d / "model.onnx",
                cal,
                held["input"],
                held["label"],
                args.threads,
                rounds,
                runs,
                work,
            )
        )

        from test_tflite_models import _nets, export_onnx  # the same MobileNetV2 shape as the tests

        # full width at 224x224 for the benchmark (the tests use width 0.35 at 96x96)
        mb = _mobilenet_full(_nets)
        src = work / "mobilenet_v2_224.onnx"
        export_onnx(mb, (1, 3, 224, 224), src)
        rng = np.random.default_rng(0)
        n_cal, n_held = (16, 64) if args.quick else (64, 256)
        mcal = rng.uniform(0, 1, (n_cal, 3, 224, 224)).astype(np.float32)
        mheld = rng.uniform(0, 1, (n_held, 3, 224, 224)).astype(np.float32)
        rows.append(
            bench("mobilenet_v2_224", src, mcal, mheld, None, args.threads, rounds, runs, work)
        )

    print(f"\nONNX -> TFLite int8, {args.threads} threads, {platform.machine()}\n")
    head = (
        "model", "convert s", ".tflite bytes", "ONNX int8 bytes", "size x", "LiteRT ms",
        "ORT int8 ms", "LiteRT/ORT (median of rounds)", "top-1 agree vs ORT QDQ (n)",
        "top-1 drop vs float (pts)",
    )  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r["model"], r["convert_s"], r["tflite_bytes"], r["onnx_int8_bytes"], r["size_ratio"],
            r["litert_ms"], r["ort_int8_ms"], r["latency_ratio_median"],
            f"{r['top1_agreement_vs_ort_qdq']} ({r['heldout_samples']})",
            r.get("top1_drop_points", "-"),
        ]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    out = ROOT / "benchmarks" / "results" / "tflite.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "quick": args.quick,
                "machine": platform.machine(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out.relative_to(ROOT)}")


def _mobilenet_full(nets_factory: Any) -> Any:
    """MobileNetV2 at width 1.0 (the tests' builder is width 0.35)."""
    import torch

    nn = torch.nn
    net, _ = nets_factory()["mobilenet_v2_96"]
    # rebuild with width 1.0 by reusing the block classes of the tests' network
    first_inverted = next(m for m in net.modules() if type(m).__name__ == "Inverted")
    inverted = type(first_inverted)

    def cbr(i: int, o: int, s: int = 1, g: int = 1, k: int = 3) -> Any:
        return nn.Sequential(
            nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6()
        )

    cfg = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    c = 32
    layers = [cbr(3, c, 2)]
    for t, o, n, s in cfg:
        for j in range(n):
            layers.append(inverted(c, o, s if j == 0 else 1, t))
            c = o
    layers.append(cbr(c, 1280, k=1))
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000)
    )


if __name__ == "__main__":
    main()
