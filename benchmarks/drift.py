"""Drift detection from sketches: false alarms, power, size and fleet merge cost.

Run: ``.venv/bin/python benchmarks/drift.py [--quick]``. Prints markdown tables and writes
``benchmarks/results/drift.json``. Every figure stands beside its baseline from the same run:

- "ours": `fleet.drift` (KS on the union of retained items, critical value widened by both
  sketches' rank-error bounds); "ours+effect": the alert rule (significant AND PSI >= 0.1
  or W1_norm >= 0.05); "raw-count KS": the same D judged against the plain critical value
  with the raw row counts (whylogs' way); "datasketches ks_test": the library's own test.
- Trial design: every trial draws a fresh reference and a fresh current sample (no reuse),
  both sketched with k=200 from chunks of at most 2^17 values (vectorised updates). Each
  cell is an independent Bernoulli estimate over its trials.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasketches import ks_test

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.drift.api import compare, compare_banks
from fleet.drift.config import DriftConfig
from fleet.drift.stats import ks_critical_lambda
from fleet.drift.tiles import bank_from_windows
from fleet.drift.wire import SketchAccumulator
from protocol.sketch import FeatureSketch, SketchWire
from protocol.sketchpack import pack_sketches

ALPHA = 0.01
CHUNK = 1 << 17
CONFIG = DriftConfig(alpha=ALPHA)

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def _normal(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n, dtype=np.float32)


def _lognormal(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.exp(rng.standard_normal(n, dtype=np.float32))


def _bimodal(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal(n, dtype=np.float32)
    return x + np.where(rng.random(n) < 0.3, -3.0, 2.0).astype(np.float32)


def _discrete(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.poisson(3.0, n).astype(np.float32)


DISTS: dict[str, Sampler] = {
    "normal": _normal,
    "lognormal": _lognormal,
    "bimodal": _bimodal,
    "discrete": _discrete,
}


def sketch(
    rng: np.random.Generator, n: int, sampler: Sampler, shift: float = 0.0, scale: float = 1.0
) -> FeatureSketch:
    s = FeatureSketch()
    left = n
    while left:
        m = min(CHUNK, left)
        s.update(sampler(rng, m) * scale + shift)
        left -= m
    return s


def verdicts(ref: FeatureSketch, cur: FeatureSketch) -> dict[str, bool]:
    r = compare(ref, cur, config=CONFIG)
    n, m = ref.count, cur.count
    raw_crit = ks_critical_lambda(ALPHA) * math.sqrt((n + m) / (n * m))
    assert r.statistic is not None and r.p_value is not None
    return {
        "ours": r.p_value < ALPHA,
        "ours+effect": r.status == "drifted",
        "raw-count KS": r.statistic > raw_crit,
        "datasketches ks_test": bool(ks_test(ref._kll, cur._kll, ALPHA)),
    }


METHODS = ("ours", "ours+effect", "raw-count KS", "datasketches ks_test")


def rate(
    trials: int,
    make: Callable[[np.random.Generator], tuple[FeatureSketch, FeatureSketch]],
    rng: np.random.Generator,
) -> dict[str, float]:
    hits = dict.fromkeys(METHODS, 0)
    for _ in range(trials):
        ref, cur = make(rng)
        for k, v in verdicts(ref, cur).items():
            hits[k] += v
    return {k: hits[k] / trials for k in METHODS}


def false_alarms(sizes: list[int], trials: dict[int, int], rng: np.random.Generator) -> list[dict]:
    rows = []
    for dist, sampler in DISTS.items():
        for n in sizes:
            t0 = time.perf_counter()
            r = rate(trials[n], lambda g, n=n, s=sampler: (sketch(g, n, s), sketch(g, n, s)), rng)
            rows.append(
                {
                    "dist": dist,
                    "rows": n,
                    "trials": trials[n],
                    **r,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(f"  FA {dist} {n}: {r}", file=sys.stderr, flush=True)
    return rows


def power(sizes: list[int], trials: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    changes = [
        ("mean +0.05 SD", 0.05, 1.0),
        ("mean +0.1 SD", 0.1, 1.0),
        ("mean +0.2 SD", 0.2, 1.0),
        ("scale x1.2", 0.0, 1.2),
    ]
    for label, shift, scale in changes:
        for n in sizes:
            r = rate(
                trials,
                lambda g, n=n, sh=shift, sc=scale: (
                    sketch(g, n, _normal),
                    sketch(g, n, _normal, sh, sc),
                ),
                rng,
            )
            rows.append({"change": label, "rows": n, "trials": trials, **r})
            print(f"  power {label} {n}: {r}", file=sys.stderr, flush=True)
    return rows


def sizes_table(rng: np.random.Generator) -> list[dict]:
    """Bytes per feature on the wire (64 features): the per-feature JSON form, the pack as
    base64 text in JSON (last stop's agents, zlib'd), and the pack in a telemetry frame."""
    rows = []
    for n in (60, 600, 10_000, 1_000_000):
        bank = {f"input[{j}]": FeatureSketch.of(rng.standard_normal(n)) for j in range(64)}
        w = bank["input[0]"].to_wire()
        zlibbed = pack_sketches(bank, compress=True)
        rows.append(
            {
                "values": n,
                "kll_bytes": len(base64.b64decode(w.data)),
                "wire_json_bytes": len(w.model_dump_json()),
                "pack_base64_zlib_bytes": round(len(base64.b64encode(zlibbed)) / 64),
                "pack_bytes": round(len(pack_sketches(bank)) / 64),
                "pack_zlib_bytes": round(len(zlibbed) / 64),
            }
        )
    return rows


#: how each form stores a window: per-feature JSON, the pack as base64 in the JSON (the
#: JSON form of a window), the pack's bytes beside the JSON (a telemetry frame), zlib'd
FORMS = ("json", "pack base64", "pack", "pack+zlib")


def _stored_window(bank: dict[str, FeatureSketch], form: str) -> tuple[str, bytes | None]:
    """A telemetry window as the fleet stores it: (``window`` JSON text, ``input_pack``)."""
    now = "2026-12-01T00:00:00Z"
    sketches: dict = {}
    pack = None
    if form == "json":
        sketches["input_sketches"] = {f: s.to_wire().model_dump() for f, s in bank.items()}
    elif form == "pack base64":
        sketches["input_pack"] = base64.b64encode(pack_sketches(bank)).decode("ascii")
    else:
        pack = pack_sketches(bank, compress=form == "pack+zlib")
    text = json.dumps({"kind": "telemetry", "device_id": "d", "seq": 1, "window_start": now,
                       "window_end": now, "inference_count": 1, **sketches})  # fmt: skip
    return text, pack


def _max_rank_error(sketch: FeatureSketch, exact_sorted: np.ndarray) -> float:
    points = np.quantile(exact_sorted, np.linspace(0.005, 0.995, 199))
    exact = np.searchsorted(exact_sorted, points, side="right") / exact_sorted.size
    got = np.asarray([sketch.rank(float(p)) for p in points])
    return float(np.abs(got - exact).max())


def fleet_cost(
    devices: int, features: int, values: int, rng: np.random.Generator, unique: int = 200
) -> dict:
    """Merge ``devices`` stored windows of ``features`` sketches, then test all features.

    Every path starts from the window text as the tiler reads it from the database (the
    JSON parse counts). Baseline: the library's own way, each sketch decoded (with the
    layout check) and merged one at a time. Windows repeat every ``unique`` devices (the
    data generation would take longer than the merge); the rank error of feature 0 is
    against the exact values of all ``devices`` windows.
    """
    raw = [[rng.standard_normal(values, dtype=np.float32) for _ in range(features)]
           for _ in range(unique)]  # fmt: skip
    banks = [{f"f{j}": FeatureSketch.of(v[j]) for j in range(features)} for v in raw]
    exact0 = np.sort(np.concatenate([raw[d % unique][0] for d in range(devices)]))
    ref = {f"f{j}": sketch(rng, 4096, _normal) for j in range(features)}
    out: dict = {"devices": devices, "features": features, "values_per_window": values}

    stored = [_stored_window(b, "json") for b in banks]
    t0 = time.perf_counter()
    naive = [FeatureSketch() for _ in range(features)]
    for d in range(devices):
        wires = json.loads(stored[d % unique][0])["input_sketches"]
        for j in range(features):
            naive[j].merge(FeatureSketch.from_wire(SketchWire.model_validate(wires[f"f{j}"])))
    out["library_one_by_one_s"] = round(time.perf_counter() - t0, 3)
    out["library_rank_error"] = round(_max_rank_error(naive[0], exact0), 4)
    del naive

    for form in FORMS:
        stored = [_stored_window(b, form) for b in banks]
        t0 = time.perf_counter()
        bank = bank_from_windows(
            (json.loads(stored[d % unique][0]), stored[d % unique][1]) for d in range(devices)
        )
        merge_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = compare_banks(ref, bank.inputs, config=CONFIG)
        test_s = time.perf_counter() - t0
        out[form] = {
            "merge_s": round(merge_s, 3),
            "test_s": round(test_s, 3),
            "total_s": round(merge_s + test_s, 3),
            "rank_error": round(_max_rank_error(bank.inputs["f0"], exact0), 4),
            "tested": report.tested,
            "bytes_per_window": len(stored[0][0]) + len(stored[0][1] or b""),
        }
    return out


def tile_window_cost(tiles: int, features: int, rng: np.random.Generator) -> dict:
    """Evaluating an hour of 1-minute tiles: merge ``tiles`` stored tiles per feature, test."""
    stored = [
        [
            FeatureSketch.of(rng.standard_normal(20_000, dtype=np.float32)).to_wire()
            for _ in range(features)
        ]
        for _ in range(tiles)
    ]
    ref = {f"f{j}": sketch(rng, 4096, _normal) for j in range(features)}
    t0 = time.perf_counter()
    cur = {}
    for j in range(features):
        acc = SketchAccumulator()
        for t in range(tiles):
            acc.add_sketch(FeatureSketch.from_wire(stored[t][j]))
        cur[f"f{j}"] = acc.sketch()
    compare_banks(ref, cur, config=CONFIG)
    return {"tiles": tiles, "features": features, "seconds": round(time.perf_counter() - t0, 3)}


def md_rates(rows: list[dict], keys: list[str]) -> str:
    head = "| " + " | ".join(keys + list(METHODS)) + " |"
    sep = "|" + "---|" * (len(keys) + len(METHODS))
    body = [
        "| " + " | ".join([str(r[k]) for k in keys] + [f"{r[m]:.1%}" for m in METHODS]) + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials (a smoke run)")
    ap.add_argument("--seed", type=int, default=20240607)
    ap.add_argument(
        "--only-cost", action="store_true",
        help="only sizes and fleet merge cost (keeps the stored false-alarm and power tables)",
    )  # fmt: skip
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    fa_sizes = [1_000, 10_000, 100_000, 1_000_000]
    if args.quick:
        fa_trials = {1_000: 40, 10_000: 40, 100_000: 20, 1_000_000: 5}
        pw_trials, devices = 20, 1000
    else:
        fa_trials = dict.fromkeys(fa_sizes, 200)
        pw_trials, devices = 200, 10_000
    started = time.perf_counter()
    path = Path(__file__).resolve().parent / "results" / "drift.json"
    if args.only_cost:
        stored = json.loads(path.read_text())
        fa, pw = stored["false_alarms"], stored["power"]
    else:
        print("false alarms...", file=sys.stderr)
        fa = false_alarms(fa_sizes, fa_trials, rng)
        print("power...", file=sys.stderr)
        pw = power([10_000, 200_000], pw_trials, rng)
    size = sizes_table(rng)
    print("fleet cost...", file=sys.stderr)
    cost = [fleet_cost(devices, 64, v, rng) for v in (60, 600)]
    tiles = tile_window_cost(60, 64, rng)
    total = time.perf_counter() - started

    out = {
        "alpha": ALPHA,
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(total, 1),
        "false_alarms": fa,
        "power": pw,
        "sizes": size,
        "fleet_cost": cost,
        "tile_window_cost": tiles,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")

    print(f"## False alarms on identical distributions (alpha={ALPHA}; goal <= 1%)\n")
    print(md_rates(fa, ["dist", "rows", "trials"]))
    print("\n## Power, normal data (goal: >= 95% for +0.1 SD at 200k rows)\n")
    print(md_rates(pw, ["change", "rows", "trials"]))
    print("\n## Size per feature per window (goal <= 3 KB)\n")
    print(
        "| values | KLL bytes | JSON form B | pack+zlib as base64 B | pack B | pack+zlib B |"
        "\n|---|---|---|---|---|---|"
    )
    for r in size:
        print(
            f"| {r['values']} | {r['kll_bytes']} | {r['wire_json_bytes']} | "
            f"{r['pack_base64_zlib_bytes']} | {r['pack_bytes']} | {r['pack_zlib_bytes']} |"
        )
    print("\n## Fleet merge + test of stored windows, 64 features (goal < 2 s for 10,000)\n")
    print(
        "| devices | values/window | library one by one s | JSON form s | pack base64 s "
        "| pack s | pack+zlib s | rank error: library / pack |\n|---|---|---|---|---|---|---|---|"
    )
    for r in cost:
        print(
            f"| {r['devices']} | {r['values_per_window']} | {r['library_one_by_one_s']} | "
            + " | ".join(str(r[f]["total_s"]) for f in FORMS)
            + f" | {r['library_rank_error']:.2%} / {r['pack']['rank_error']:.2%} |"
        )
    print(
        f"\nAn hour of 1-minute tiles (60 tiles x 64 features) merged and tested: "
        f"{tiles['seconds']} s"
    )
    print(f"\n(total {total:.0f} s; JSON in {path})")


if __name__ == "__main__":
    main()
