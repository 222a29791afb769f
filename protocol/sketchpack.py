"""A telemetry window's input sketches packed into one field.

A window carries one KLL sketch per input feature (64 for the digits model). As a JSON
object of 64 small objects with base64 strings it cost the fleet ~0.2-0.45 ms to validate
per window and the tiler a base64 decode and a header parse per sketch; it also cost the
wire 4/3 of the sketch bytes plus the keys. The pack is one string:

    base64( body )  or  base64( zlib( body with its payload byte-shuffled ) )
    body    := "EFP1" | k: u16 | n: u16 | names: u32 | n x (nan_count: u32, length: u32)
               | the n feature names, UTF-8, joined by "\n" (``names`` bytes) | payload
    payload := the n serialized KLL float sketches (``length`` bytes each, 0 = empty),
               concatenated. Compressed packs byte-shuffle it first: every sketch is whole
               4-byte words, and the shuffle stores byte 0 of every word, then byte 1, 2, 3
               (the sign and exponent bytes of sorted floats repeat: zlib then takes ~20%
               off, which brings a 1e6-value window under 3 KB per feature on the wire).

Compression is the sender's choice (the agent compresses by default: device links are the
scarce resource); the fleet pays ~0.1 ms per window to inflate a 64-feature pack.

All integers are little-endian. `read_pack` checks the structure (sizes, names, bounds on
everything before it is allocated); each sketch's own layout is checked where it is read
(`protocol.sketch`), so a hostile byte cannot crash the C++ sketch library.
"""

from __future__ import annotations

import base64
import binascii
import functools
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
#: the packed text in a message (telemetry messages are at most 1 MiB anyway)
MAX_PACK_TEXT = 1024 * 1024


def _shuffle(payload: bytes) -> bytes:
    words = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 4)
    return words.T.tobytes()


def _unshuffle(shuffled: bytes) -> bytes:
    planes = np.frombuffer(shuffled, dtype=np.uint8).reshape(4, -1)
    return planes.T.tobytes()


def pack_sketches(
    sketches: Mapping[str, FeatureSketch], *, compress: bool = True, level: int = 6
) -> str:
    """Pack named sketches (all the same k) into the window's ``input_pack`` string."""
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
        return base64.b64encode(head + payload).decode("ascii")
    return base64.b64encode(zlib.compress(head + _shuffle(payload), level)).decode("ascii")


@dataclass(frozen=True, slots=True)
class SketchPack:
    """A read pack: names, NaN counts and each sketch's bytes (offsets into ``payload``)."""

    k: int
    names: tuple[str, ...]
    nan_counts: np.ndarray
    #: sketch i is payload[starts[i] : starts[i] + lengths[i]]
    starts: np.ndarray
    lengths: np.ndarray
    payload: bytes

    def __len__(self) -> int:
        return len(self.names)

    def kll_bytes(self, i: int) -> bytes:
        start = int(self.starts[i])
        return self.payload[start : start + int(self.lengths[i])]

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
    payloads are joined and each feature's sketches from all of them go to its merger in
    one vectorised call. Returns how many sketches were unusable (skipped and counted).
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
        base = np.cumsum([0, *(len(p.payload) for p in group[:-1])], dtype=np.int64)
        buf = np.frombuffer(b"".join(p.payload for p in group), dtype=np.uint8)
        starts = np.stack([p.starts for p in group]) + base[:, None]
        lengths = np.stack([p.lengths for p in group])
        nans = np.stack([p.nan_counts for p in group]).sum(axis=0)
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


def read_pack(text: str) -> SketchPack:
    """Decode and check a pack's structure; raises SketchError saying what is wrong."""
    if len(text) > MAX_PACK_TEXT:
        raise SketchError(f"sketch pack is {len(text)} characters; the limit is {MAX_PACK_TEXT}")
    try:
        packed = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise SketchError(f"sketch pack is not base64: {exc}") from exc
    compressed = bool(packed) and packed[0] == _ZLIB_FIRST
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
    table = np.frombuffer(body, dtype="<u4", count=2 * n, offset=_HEAD.size).reshape(n, 2)
    names = _names(body[at : at + names_len], n)
    at += names_len
    lengths = table[:, 1].astype(np.int64)
    if n and (int(np.bitwise_or.reduce(lengths)) & 3 or int(lengths.max()) > MAX_SKETCH_BYTES):
        raise SketchError(
            f"sketch pack has a sketch that is not whole 4-byte words or over {MAX_SKETCH_BYTES} B"
        )
    payload_len = len(body) - at
    if int(lengths.sum()) != payload_len:
        raise SketchError(
            f"sketch pack's table says {int(lengths.sum())} payload bytes; it has {payload_len}"
        )
    starts = np.cumsum(lengths) - lengths
    return SketchPack(
        k=int(k),
        names=names,
        nan_counts=table[:, 0].astype(np.int64),
        starts=starts,
        lengths=lengths,
        payload=_unshuffle(body[at:]) if compressed else body[at:],
    )


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
