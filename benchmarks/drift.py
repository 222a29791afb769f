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
from fleet.drift.wire import SketchAccumulator
from protocol.sketch import FeatureSketch

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
    rows = []
    for n in (60, 600, 10_000, 1_000_000):
        s = sketch(rng, n, _normal)
        w = s.to_wire()
        rows.append(
            {
                "values": n,
                "kll_bytes": len(base64.b64decode(w.data)),
                "wire_json_bytes": len(w.model_dump_json()),
            }
        )
    return rows


def fleet_cost(
    devices: int, features: int, values: int, rng: np.random.Generator, unique: int = 400
) -> dict:
    """Merge ``devices`` windows of ``features`` sketches, then test all features."""
    wires = [
        [
            FeatureSketch.of(rng.standard_normal(values, dtype=np.float32)).to_wire()
            for _ in range(features)
        ]
        for _ in range(unique)
    ]
    dicts = [[w.model_dump() for w in row] for row in wires]
    ref = {f"f{j}": sketch(rng, 4096, _normal) for j in range(features)}

    # baseline: decode every sketch with the full check, merge one at a time
    t0 = time.perf_counter()
    naive = [FeatureSketch() for _ in range(features)]
    for d in range(devices):
        row = wires[d % unique]
        for j in range(features):
            naive[j].merge(FeatureSketch.from_wire(row[j]))
    naive_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    accs = [SketchAccumulator() for _ in range(features)]
    for d in range(devices):
        row_d = dicts[d % unique]
        for j in range(features):
            accs[j].add_wire(row_d[j])
    cur = {f"f{j}": a.sketch() for j, a in enumerate(accs)}
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = compare_banks(ref, cur, config=CONFIG)
    test_s = time.perf_counter() - t0
    return {
        "devices": devices,
        "features": features,
        "values_per_window": values,
        "naive_merge_s": round(naive_s, 3),
        "ours_merge_s": round(merge_s, 3),
        "ours_test_s": round(test_s, 3),
        "ours_total_s": round(merge_s + test_s, 3),
        "tested": report.tested,
    }


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
    path = Path(__file__).resolve().parent / "results" / "drift.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")

    print(f"## False alarms on identical distributions (alpha={ALPHA}; goal <= 1%)\n")
    print(md_rates(fa, ["dist", "rows", "trials"]))
    print("\n## Power, normal data (goal: >= 95% for +0.1 SD at 200k rows)\n")
    print(md_rates(pw, ["change", "rows", "trials"]))
    print("\n## Size per feature per window (goal <= 3 KB)\n")
    print("| values | KLL bytes | wire JSON bytes |\n|---|---|---|")
    for r in size:
        print(f"| {r['values']} | {r['kll_bytes']} | {r['wire_json_bytes']} |")
    print("\n## Fleet merge + test, 64 features (goal < 2 s for 10,000 devices)\n")
    print(
        "| devices | values/window | one-by-one from_wire+merge s | ours merge s | ours test s "
        "| ours total s |\n|---|---|---|---|---|---|"
    )
    for r in cost:
        print(
            f"| {r['devices']} | {r['values_per_window']} | {r['naive_merge_s']} | "
            f"{r['ours_merge_s']} | {r['ours_test_s']} | {r['ours_total_s']} |"
        )
    print(
        f"\nAn hour of 1-minute tiles (60 tiles x 64 features) merged and tested: "
        f"{tiles['seconds']} s"
    )
    print(f"\n(total {total:.0f} s; JSON in {path})")


if __name__ == "__main__":
    main()
