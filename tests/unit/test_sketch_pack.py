"""The sketch pack (one per window, raw bytes in a telemetry frame) and the numpy merger the
fleet's tiler uses."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest

from protocol.errors import MessageDecodeError, MessageTooLargeError, SketchError
from protocol.limits import MAX_TELEMETRY_BYTES
from protocol.messages import (
    TELEMETRY_MAGIC,
    Heartbeat,
    TelemetryWindow,
    decode_message,
    encode_message,
    split_telemetry_frame,
)
from protocol.sketch import FeatureSketch, SketchMerger, _check_kll_layout, wire_quantiles
from protocol.sketchpack import MAX_PACK_BYTES, merge_packs, pack_sketches, read_pack


def _exact_ranks(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    v = np.sort(values)
    return np.searchsorted(v, points, side="right") / v.size


@pytest.mark.parametrize("compress", [True, False])
def test_pack_round_trip(compress: bool) -> None:
    rng = np.random.default_rng(1)
    sketches = {
        "a": FeatureSketch.of(rng.normal(size=60)),
        "b/ü": FeatureSketch.of(rng.normal(size=5000)),  # compacted, non-ASCII name
        "empty": FeatureSketch(),
        "one": FeatureSketch.of([3.5]),
    }
    sketches["a"].update([np.nan, np.inf])
    back = read_pack(pack_sketches(sketches, compress=compress))
    assert back.names == tuple(sketches) and back.k == 200
    got = back.sketches()
    for name, s in sketches.items():
        assert got[name].count == s.count and got[name].nan_count == s.nan_count
        assert got[name].kll_bytes() == s.kll_bytes()


def test_pack_is_smaller_than_the_json_form() -> None:
    rng = np.random.default_rng(2)
    bank = {f"input[{i}]": FeatureSketch.of(rng.normal(size=1_000_000)) for i in range(8)}
    json_bytes = sum(len(s.to_wire().model_dump_json()) for s in bank.values())
    packed = len(pack_sketches(bank))
    assert packed < 0.85 * json_bytes
    assert packed / len(bank) < 3 * 1024  # the drift issue's wire budget per feature


def test_read_pack_refuses_bad_input_with_reasons() -> None:
    body = pack_sketches({"x": FeatureSketch.of(np.arange(10.0))}, compress=False)
    text = base64.b64encode(body).decode()
    assert read_pack(text).sketches()["x"].count == 10  # the JSON form: base64 text
    cases: dict[str, bytes | str] = {
        "not base64": "@@@",
        "magic": b"NOPE" + body[4:],
        "says 72 payload bytes; it has 68": body[:-4],
        "truncated in its table": body[:14],
        "payload bytes": body + b"\0\0\0\0",
        "shorter than its header": body[:5],
        "zlib": b"\x78\x9c" + b"garbage",
        "whole 4-byte words": body[:16] + (13).to_bytes(4, "little") + body[20:],
    }
    for expected, data in cases.items():
        with pytest.raises(SketchError, match=expected):
            read_pack(data)
    # a zip bomb: a small pack that inflates past the limit
    bomb = zlib.compress(b"\0" * (MAX_PACK_BYTES + 10), 9)
    assert len(bomb) < 64 * 1024
    with pytest.raises(SketchError, match="more than"):
        read_pack(bomb)
    # two features with one name
    head = struct.pack("<4sHHI", b"EFP1", 200, 2, 3) + struct.pack("<4I", 0, 0, 0, 0) + b"a\na"
    with pytest.raises(SketchError, match="distinct names"):
        read_pack(head)
    with pytest.raises(SketchError, match="newlines"):
        pack_sketches({"a\nb": FeatureSketch()})


def test_a_mutated_pack_never_crashes_the_reader_or_the_merger() -> None:
    rng = np.random.default_rng(3)
    sketches = {
        f"f{i}": FeatureSketch.of(rng.normal(size=n)) for i, n in enumerate((1, 9, 60, 900))
    }
    body = bytearray(pack_sketches(sketches, compress=False))
    outcomes = {"refused": 0, "read": 0}
    for _ in range(3000):
        mutated = bytearray(body)
        for _ in range(int(rng.integers(1, 4))):
            mutated[int(rng.integers(len(mutated)))] = int(rng.integers(256))
        try:
            pack = read_pack(bytes(mutated))
        except SketchError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        mergers: dict[str, SketchMerger] = {}
        merge_packs([pack], mergers)  # bad sketches are counted, never raised
        for m in mergers.values():
            out = m.result(rng)
            if not out.empty:
                _check_kll_layout(out.kll_bytes())
    assert outcomes["refused"] > 0 and outcomes["read"] > 0


def test_merger_is_exact_in_count_and_bounds_and_close_in_rank() -> None:
    rng = np.random.default_rng(4)
    values = [rng.normal(size=60).astype(np.float32) for _ in range(3000)]
    values += [rng.lognormal(size=4000).astype(np.float32) for _ in range(40)]  # compacted
    texts = [
        pack_sketches({"x": FeatureSketch.of(v)}, compress=bool(i % 2))
        for i, v in enumerate(values)
    ]
    mergers: dict[str, SketchMerger] = {}
    assert merge_packs([read_pack(t) for t in texts], mergers) == 0
    merged = mergers["x"].result(rng)
    allv = np.concatenate(values)
    _check_kll_layout(merged.kll_bytes())
    assert merged.count == allv.size and merged.nan_count == 0
    assert merged.min == allv.min() and merged.max == allv.max()
    points = np.quantile(allv, np.linspace(0.01, 0.99, 99))
    got = np.asarray([merged.rank(float(p)) for p in points])
    # the one-shot compaction adds < 2/k (1%); the compacted inputs their own KLL error
    assert np.abs(got - _exact_ranks(allv, points)).max() < 0.02
    # the result is an ordinary sketch: the library merges it with others
    lib = FeatureSketch.of(rng.normal(size=1000))
    lib.merge(merged)
    assert lib.count == allv.size + 1000


def test_merger_counts_bad_sketches_and_keeps_the_good_ones() -> None:
    rng = np.random.default_rng(5)
    good = [FeatureSketch.of(rng.normal(size=80)).kll_bytes() for _ in range(5)]
    bad = bytearray(good[0])
    bad[8:16] = (81).to_bytes(8, "little")  # says 81 values, holds 80
    other_k = FeatureSketch.of(rng.normal(size=80), k=100).kll_bytes()
    blobs = [*good, bytes(bad), other_k, b"\xff" * 12]
    buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    lengths = np.asarray([len(b) for b in blobs])
    starts = np.cumsum(lengths) - lengths
    m = SketchMerger()
    assert m.add_kll_many(buf, starts, lengths) == 3
    assert m.result().count == 5 * 80
    with pytest.raises(SketchError, match="k=100"):
        SketchMerger().add_kll_bytes(other_k)
    with pytest.raises(SketchError, match="outside"):
        m.add_kll_many(buf, np.asarray([len(buf) - 4]), np.asarray([8]))


def test_merger_turns_non_finite_items_into_nan_counts() -> None:
    raw = bytearray(FeatureSketch.of(np.arange(50.0)).kll_bytes())
    raw[40:44] = np.float32(np.inf).tobytes()
    m = SketchMerger()
    m.add_kll_bytes(bytes(raw), nan_count=2)
    out = m.result()
    assert out.count == 49 and out.nan_count == 3


def test_window_carries_one_form_of_sketches() -> None:
    s = FeatureSketch.of(np.arange(20.0))
    base = {
        "kind": "telemetry", "schema_version": 1, "device_id": "dev-1", "seq": 1,
        "window_start": "2026-01-01T00:00:00Z", "window_end": "2026-01-01T00:01:00Z",
        "inference_count": 20,
    }  # fmt: skip
    packed = TelemetryWindow.model_validate({**base, "input_pack": pack_sketches({"x": s})})
    listed = TelemetryWindow.model_validate(
        {**base, "input_sketches": {"x": s.to_wire().model_dump()}}
    )
    assert packed.sketches()["x"].count == listed.sketches()["x"].count == 20
    both = TelemetryWindow.model_validate({**base, "input_sketches": {"x": s.to_wire()}})
    payload = both.model_copy(update={"input_pack": pack_sketches({"x": s})}).model_dump_json()
    with pytest.raises(MessageDecodeError, match="one"):
        decode_message(payload.encode(), expect=TelemetryWindow)


def test_wire_quantiles_match_the_library() -> None:
    rng = np.random.default_rng(6)
    for n in (1, 2, 5, 20, 64, 65, 100, 150, 1000, 20_000):  # Python and numpy paths
        s = FeatureSketch.of(rng.lognormal(size=n))
        count, qs = wire_quantiles(s.to_wire(), (0.5, 0.95, 0.99))
        assert count == n and qs == s.quantiles((0.5, 0.95, 0.99))
    for n in (20, 100):  # an infinite value smuggled into the bytes is refused either way
        wire = FeatureSketch.of(np.arange(float(n))).to_wire()
        raw = bytearray(base64.b64decode(wire.data))
        raw[32 + 4 * 3 : 32 + 4 * 4] = struct.pack("<f", float("inf"))
        bad = wire.model_copy(update={"data": base64.b64encode(raw).decode()})
        with pytest.raises(SketchError, match="non-finite"):
            wire_quantiles(bad, (0.5,))
    wire = FeatureSketch.of(np.arange(10.0)).to_wire()
    with pytest.raises(SketchError, match="holds 10 values but says 11"):
        wire_quantiles(wire.model_copy(update={"count": 11}), (0.5,))  # holds 10
    assert wire_quantiles(FeatureSketch().to_wire(), (0.5,)) == (0, [])


def _framed_window(**fields: object) -> TelemetryWindow:
    rng = np.random.default_rng(7)
    pack = pack_sketches({f"f{i}": FeatureSketch.of(rng.normal(size=30)) for i in range(8)})
    return TelemetryWindow(
        device_id="dev-1", seq=4, window_start="2026-01-01T00:00:00Z",
        window_end="2026-01-01T00:01:00Z", inference_count=30, input_pack=pack, **fields,
    )  # fmt: skip


def test_a_window_with_a_binary_pack_travels_as_a_frame() -> None:
    window = _framed_window()
    assert isinstance(window.input_pack, bytes)
    raw = encode_message(window)
    assert raw[:4] == TELEMETRY_MAGIC
    text, pack = split_telemetry_frame(raw)
    assert pack == window.input_pack and b"input_pack" not in text  # no base64 copy
    back = decode_message(raw, expect=TelemetryWindow)
    assert back.input_pack == window.input_pack and back.seq == 4
    assert {n: s.count for n, s in back.sketches().items()} == {f"f{i}": 30 for i in range(8)}
    # the JSON form of the same window (a REST body, a log line) carries base64 text
    as_json = decode_message(window.model_dump_json().encode(), expect=TelemetryWindow)
    assert isinstance(as_json.input_pack, str)
    assert as_json.sketches()["f3"].kll_bytes() == back.sketches()["f3"].kll_bytes()
    assert len(raw) < len(window.model_dump_json()) - len(pack) // 4  # base64 adds a third


def test_bad_telemetry_frames_are_refused_with_reasons() -> None:
    raw = encode_message(_framed_window())
    n = int.from_bytes(raw[4:8], "big")
    heartbeat = Heartbeat(device_id="dev-1", profile="x86-cpu", agent_version="1", uptime_s=1)
    head = heartbeat.model_dump_json().encode()
    both = _framed_window().model_dump_json().encode()  # JSON that has its own pack
    cases = {
        "says its JSON is": raw[:4] + (len(raw)).to_bytes(4, "big") + raw[8:],
        "its JSON is 0": raw[:4] + b"\0\0\0\0" + raw[8:],
        "holds a 'heartbeat'": TELEMETRY_MAGIC + len(head).to_bytes(4, "big") + head + b"x",
        "carries sketches of its own": TELEMETRY_MAGIC + len(both).to_bytes(4, "big") + both,
        "invalid message": raw[:8] + raw[9 : 8 + n] + b" " + raw[8 + n :],  # JSON cut
    }
    for expected, frame in cases.items():
        with pytest.raises(MessageDecodeError, match=expected):
            decode_message(frame, expect=TelemetryWindow)
    with pytest.raises(MessageTooLargeError):
        decode_message(raw + b"\0" * MAX_TELEMETRY_BYTES, expect=TelemetryWindow)
    # a frame is only ever telemetry: a command topic refuses it by kind
    with pytest.raises(MessageDecodeError, match="expected a Heartbeat"):
        decode_message(raw, expect=Heartbeat)
