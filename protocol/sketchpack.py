"""A telemetry window's input sketches packed into one field.

A window carries one KLL sketch per input feature (64 for the digits model). As a JSON
object of 64 small objects with base64 strings it cost the fleet ~0.2-0.45 ms to validate
per window and the tiler a base64 decode and a header parse per sketch; it also cost the
wire 4/3 of the sketch bytes plus the keys. The pack is one byte string:

    pack    := body  or  zlib( body with its payload byte-shuffled )
    body    := "EFP1" | k: u16 | n: u16 | names: u32 | n x (nan_count: u32, length: u32)
               | the n feature names, UTF-8, joined by "\n" (``names`` bytes) | payload
    payload := the n serialized KLL float sketches (``length`` bytes each, 0 = empty),
               concatenated. Compressed packs byte-shuffle it first: every sketch is whole
               4-byte words, and the shuffle stores byte 0 of every word, then byte 1, 2, 3
               (the sign and exponent bytes of sorted floats repeat: zlib then takes ~20%
               off).

Agents send the pack as raw bytes after the window's JSON in a telemetry frame
(`protocol.messages.encode_message`): no base64, which cost the fleet ~90 us per window to
decode (CPython's decoder runs at ~270 MB/s here) and the wire a third more bytes. The JSON
form of a window carries it as base64 text (``read_pack`` takes either).

Compression is the sender's choice and off by default: in a frame an uncompressed pack is
about as big as the base64 of a compressed one was (130 against 118 B per feature for a
20-row window, 290 against 312 for 60 rows), and inflating a 60-row pack costs the fleet
~0.14 ms here, about as much as storing the window. Devices on metered links turn it on
(``--compress-sketches``: ~20-30% fewer bytes).

All integers are little-endian. `read_pack` checks the structure (sizes, names, bounds on
everything before it is allocated); each sketch's own layout is checked where it is read
(`protocol.sketch`), so a hostile byte cannot crash the C++ sketch library.
"""

from __future__ import annotations

import binascii
import functools
import operator
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from protocol.errors import SketchError
from protocol.limits import MAX_FEATURES, MAX_SKETCH_BYTES
from protocol.sketch import DEFAULT_K, FeatureSketch, SketchMerger

__all__ = [
    "MAX_PACK_BYTES",
    "MAX_PACK_TEXT",
    "SketchPack",
    "is_compressed",
    "merge_packs",
    "pack_sketches",
    "read_pack",
]

MAGIC = b"EFP1"
_HEAD = struct.Struct("<4sHHI")
_ROW = np.dtype([("nan", "<u4"), ("length", "<u4")])
MAX_NAME_BYTES = 128
#: the unpacked body: every feature at its largest sketch
MAX_PACK_BYTES = _HEAD.size + MAX_FEATURES * (_ROW.itemsize + 1 + MAX_NAME_BYTES + MAX_SKETCH_BYTES)
_ZLIB_FIRST = 0x78  # a zlib stream's first byte (deflate, 32 KiB window); "E" starts a body
#: the pack in a message, as bytes or base64 text (telemetry messages are at most 1 MiB)
MAX_PACK_TEXT = 1024 * 1024


def _shuffle(payload: bytes) -> bytes:
    words = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 4)
    return words.T.tobytes()


def _unshuffle(shuffled: bytes) -> bytes:
    planes = np.frombuffer(shuffled, dtype=np.uint8).reshape(4, -1)
    return planes.T.tobytes()


def pack_sketches(
    sketches: Mapping[str, FeatureSketch], *, compress: bool = False, level: int = 6
) -> bytes:
    """Pack named sketches (all the same k) into the window's ``input_pack`` bytes."""
    if len(sketches) > MAX_FEATURES:
        raise SketchError(f"{len(sketches)} sketches; at most {MAX_FEATURES}")
    ks = {s.k for s in sketches.values()}
    if len(ks) > 1:
        raise SketchError(f"sketches in one pack must share k; got {sorted(ks)}")
    k = ks.pop() if ks else DEFAULT_K
    rows = np.zeros(len(sketches), dtype=_ROW)
    blobs: list[bytes] = []
    for i, (name, sketch) in enumerate(sketches.items()):
        encoded = name.encode("utf-8")
        if not encoded or len(encoded) > MAX_NAME_BYTES or "\n" in name:
            raise SketchError(
                f"feature name {name!r} must be 1-{MAX_NAME_BYTES} UTF-8 bytes without newlines"
            )
        raw = sketch.kll_bytes()
        rows[i] = (sketch.nan_count, len(raw))
        blobs.append(raw)
    names = "\n".join(sketches).encode("utf-8")
    payload = b"".join(blobs)
    head = _HEAD.pack(MAGIC, k, len(sketches), len(names)) + rows.tobytes() + names
    if not compress:
        return head + payload
    return zlib.compress(head + _shuffle(payload), level)


def is_compressed(pack: bytes | str | None) -> bool:
    """Whether a pack (bytes, or its base64 text) is zlib-compressed."""
    if isinstance(pack, str):
        return pack[:1] == "e"  # base64 of 0x78 ...
    return bool(pack) and pack[0] == _ZLIB_FIRST  # type: ignore[index]


@dataclass(frozen=True, slots=True)
class SketchPack:
    """A read pack: names, and its table and payload bytes (checked by `read_pack`)."""

    k: int
    names: tuple[str, ...]
    #: n x (nan_count: u32, length: u32), little-endian
    table: bytes
    #: the n sketches' bytes, concatenated (sketch i starts at ``starts[i]``)
    payload: bytes | memoryview

    def __len__(self) -> int:
        return len(self.names)

    @property
    def nan_counts(self) -> np.ndarray:
        return np.frombuffer(self.table, dtype=_ROW)["nan"].astype(np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.frombuffer(self.table, dtype=_ROW)["length"].astype(np.int64)

    @property
    def starts(self) -> np.ndarray:
        lengths = self.lengths
        starts: np.ndarray = np.cumsum(lengths) - lengths
        return starts

    def kll_bytes(self, i: int) -> bytes:
        start, length = int(self.starts[i]), int(self.lengths[i])
        return bytes(self.payload[start : start + length])

    def sketch(self, i: int) -> FeatureSketch:
        """Sketch ``i``, its layout checked (raises SketchError)."""
        try:
            return FeatureSketch.from_kll_bytes(
                self.kll_bytes(i), k=self.k, nan_count=int(self.nan_counts[i])
            )
        except SketchError as exc:
            raise SketchError(f"sketch of {self.names[i]!r}: {exc}") from exc

    def sketches(self) -> dict[str, FeatureSketch]:
        return {name: self.sketch(i) for i, name in enumerate(self.names)}


def merge_packs(packs: Sequence[SketchPack], mergers: dict[str, SketchMerger]) -> int:
    """Add every sketch of many packs to the merger of its feature (``mergers``, by name).

    Packs with the same features (windows of one model) are handled together: their
    tables and payloads are joined and each feature's sketches from all of them go to its
    merger in one vectorised call. Returns how many sketches were unusable (skipped and
    counted).
    """
    groups: dict[tuple[str, ...], list[SketchPack]] = {}
    for p in packs:
        groups.setdefault(p.names, []).append(p)
    bad = 0
    for names, group in groups.items():
        k = group[0].k
        if any(p.k != k for p in group):
            for p in group:
                bad += merge_packs([p], mergers) if p.k != k else 0
            group = [p for p in group if p.k == k]
        n = len(names)
        table = np.frombuffer(b"".join(p.table for p in group), dtype=_ROW).reshape(-1, n)
        lengths = table["length"].astype(np.int64)
        base = np.cumsum([0, *(len(p.payload) for p in group[:-1])], dtype=np.int64)
        starts = np.cumsum(lengths, axis=1) - lengths + base[:, None]
        buf = np.frombuffer(b"".join(p.payload for p in group), dtype=np.uint8)
        nans = table["nan"].sum(axis=0, dtype=np.int64)
        for j, name in enumerate(names):
            merger = mergers.get(name)
            if merger is None:
                merger = mergers[name] = SketchMerger(k)
            if merger.k != k:
                bad += len(group)
                continue
            bad += merger.add_kll_many(buf, starts[:, j], lengths[:, j])
            merger.nan_count += int(nans[j])
    return bad


def read_pack(data: bytes | str) -> SketchPack:
    """Check a pack's structure and index it; raises SketchError saying what is wrong.

    ``data`` is the pack's bytes (a telemetry frame) or its base64 text (the JSON form).
    """
    if len(data) > MAX_PACK_TEXT:
        raise SketchError(f"sketch pack is {len(data)} long; the limit is {MAX_PACK_TEXT}")
    if isinstance(data, str):
        try:
            packed = binascii.a2b_base64(data, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise SketchError(f"sketch pack is not base64: {exc}") from exc
    else:
        packed = bytes(data)
    compressed = is_compressed(packed)
    body = _inflate(packed) if compressed else packed
    if len(body) > MAX_PACK_BYTES:
        raise SketchError(f"sketch pack is over {MAX_PACK_BYTES} bytes")
    if len(body) < _HEAD.size:
        raise SketchError("sketch pack is shorter than its header")
    magic, k, n, names_len = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise SketchError(f"sketch pack has magic {magic!r}, expected {MAGIC!r}")
    if not 8 <= k <= 65535:
        raise SketchError(f"sketch pack has k={k}")
    if n > MAX_FEATURES:
        raise SketchError(f"sketch pack has {n} sketches; at most {MAX_FEATURES}")
    at = _HEAD.size + n * _ROW.itemsize
    if len(body) < at + names_len:
        raise SketchError("sketch pack is truncated in its table or names")
    names = _names(body[at : at + names_len], n)
    lengths = _lengths(n).unpack_from(body, _HEAD.size)[1::2]
    at += names_len
    if n and (functools.reduce(operator.or_, lengths) & 3 or max(lengths) > MAX_SKETCH_BYTES):
        raise SketchError(
            f"sketch pack has a sketch that is not whole 4-byte words or over {MAX_SKETCH_BYTES} B"
        )
    payload_len = len(body) - at
    if sum(lengths) != payload_len:
        raise SketchError(
            f"sketch pack's table says {sum(lengths)} payload bytes; it has {payload_len}"
        )
    view = memoryview(body)  # no copy of the payload: the merger joins them once
    return SketchPack(
        k=int(k),
        names=names,
        table=bytes(view[_HEAD.size : _HEAD.size + n * _ROW.itemsize]),
        payload=_unshuffle(body[at:]) if compressed else view[at:],
    )


@functools.lru_cache(maxsize=64)
def _lengths(n: int) -> struct.Struct:
    """Reads a table of ``n`` rows as 2n integers (the lengths are every second one)."""
    return struct.Struct(f"<{2 * n}I")


@functools.lru_cache(maxsize=256)
def _names(block: bytes, n: int) -> tuple[str, ...]:
    """The checked feature names (cached: every window of a model repeats its block)."""
    try:
        names = block.decode("utf-8").split("\n") if n else []
    except UnicodeDecodeError as exc:
        raise SketchError(f"sketch pack has feature names that are not UTF-8: {exc}") from exc
    if len(names) != n or len(set(names)) != n:
        raise SketchError(f"sketch pack has {n} sketches but {len(set(names))} distinct names")
    if n and ("" in names or max(map(len, names)) > MAX_NAME_BYTES):
        raise SketchError(f"sketch pack has an empty name or one over {MAX_NAME_BYTES} bytes")
    return tuple(names)


def _inflate(packed: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(packed, MAX_PACK_BYTES + 1)
    except zlib.error as exc:
        raise SketchError(f"sketch pack is not zlib data: {exc}") from exc
    if inflater.unconsumed_tail:
        raise SketchError(f"sketch pack unpacks to more than {MAX_PACK_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise SketchError("sketch pack's zlib stream is truncated or followed by junk")
    return body
