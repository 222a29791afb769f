"""Fuzz every decoder of untrusted input, the bundle reader and the REST API; count crashes.

    .venv/bin/python benchmarks/fuzz.py            # ~100,000 generated cases (105k asked)
    .venv/bin/python benchmarks/fuzz.py --quick    # ~2,000, for a smoke run

Targets and what counts as correct behaviour:

- wire messages (`decode_message`, `decode_command`, `decode_chunk`), bundle manifests
  (`parse_manifest`), trust roots (`TrustRoot.from_bytes`, `update_chain`): every input
  either decodes or raises a `ProtocolError` (with a ``.code``); anything else is a crash.
- bundle files (`BundleReader(...).verify(extract_to=...)`): mutated real bundles; only
  `ProtocolError` may come out, and nothing may be written outside the extraction dir, nor
  left behind when verification fails.
- the REST API (schemathesis, from the app's own OpenAPI schema, every operation): no
  response may be a 5xx, except 503 ``broker_unavailable`` (documented; not reachable here,
  the publisher is a fake that always succeeds). Each case is sent with an admin token, so
  requests get past authentication; a share of them is sent with none, and must be 401.

Hypothesis generates the cases; a crash is recorded (first few kept, with the input) and
the run goes on. The baseline beside each count is the target's valid seed, which must be
accepted in the same run: a harness that rejected everything would prove nothing.
Writes benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocol.bundle import BundleReader, sign_manifest, write_bundle  # noqa: E402
from protocol.errors import ProtocolError  # noqa: E402
from protocol.manifest import (  # noqa: E402
    ArtifactInfo,
    BundleManifest,
    FileEntry,
    ModelInfo,
    TensorSpec,
    manifest_bytes,
    parse_manifest,
)
from protocol.messages import (  # noqa: E402
    DeployCommand,
    Heartbeat,
    RollbackCommand,
    StatusEvent,
    TelemetryWindow,
    TrustRootCommand,
    decode_command,
    decode_message,
    encode_message,
)
from protocol.signing import generate_signing_key  # noqa: E402
from protocol.trust import TrustRoot  # noqa: E402

__all__ = ["SHARES", "Tally", "run"]

#: the share of the total each target gets
SHARES: dict[str, float] = {
    "decode_message": 0.30,
    "decode_command": 0.08,
    "decode_chunk": 0.04,
    "parse_manifest": 0.12,
    "trust_root": 0.12,
    "bundle_reader": 0.12,
    "rest_api": 0.22,
}


@dataclass
class Tally:
    name: str
    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    crashes: int = 0
    examples: list[str] = field(default_factory=list)
    seed_accepted: bool = False
    codes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def crash(self, what: str) -> None:
        self.crashes += 1
        if len(self.examples) < 5:
            self.examples.append(what[:2000])

    def reject(self, code: str) -> None:
        self.rejected += 1
        self.codes[code] = self.codes.get(code, 0) + 1


def _settings(n: int) -> settings:
    # generate only: a crash is recorded, not raised, so there is nothing to shrink
    return settings(
        max_examples=max(1, n),
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


# -- JSON mutation -------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", "0" * 64, "a" * 10_000, "edgefleet/v1/#", "../../etc/passwd"])
)
_json_values = st.recursive(
    _scalars,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=12), ch, max_size=4),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


@st.composite
def mutated_json(draw: st.DrawFn, seed: Any) -> bytes:
    """The seed object with 1-3 random edits, re-encoded (sometimes with byte damage)."""
    obj = copy.deepcopy(seed)
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "delete" and path:
            obj = _set(obj, path, None, delete=True)
        elif op == "add":
            target = obj
            for key in path:
                target = target[key]
            if isinstance(target, dict):
                target[draw(st.text(max_size=12))] = draw(_json_values)
            elif isinstance(target, list):
                target.append(draw(_json_values))
        else:
            obj = _set(obj, path, draw(_json_values))
    raw = json.dumps(obj, allow_nan=True).encode()
    damage = draw(st.sampled_from(["none", "none", "none", "flip", "truncate", "prefix"]))
    if damage == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    elif damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "prefix":
        raw = draw(st.binary(max_size=8)) + raw
    return raw


def _inputs(seeds: list[Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=512),
        st.sampled_from(seeds).flatmap(mutated_json),
    )


# -- seeds ----------------------------------------------------------------------------------

DEV = "fuzz-dev-1"
SHA = "ab" * 32


def _message_seeds() -> list[Any]:
    msgs = [
        DeployCommand(
            device_id=DEV,
            bundle_sha256=SHA,
            bundle_size=1000,
            bundle_url="http://fleet/x",
            model_name="digits",
            model_version=2,
        ),
        RollbackCommand(device_id=DEV, target_bundle_sha256=SHA, reason="r"),
        TrustRootCommand(device_id=DEV, roots=("{}",)),
        StatusEvent(device_id=DEV, state="committed", bundle_sha256=SHA),  # type: ignore[arg-type]
        Heartbeat(device_id=DEV, profile="x86-cpu", agent_version="0.1", uptime_s=3.0),
        TelemetryWindow(
            device_id=DEV,
            seq=1,
            window_start=datetime(2026, 1, 1, tzinfo=UTC),
            window_end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
            inference_count=10,
            error_counts={"x": 1},
            output_class_counts=[1, 2, 3],
        ),
    ]
    return [json.loads(encode_message(m)) for m in msgs]


@dataclass
class BundleKit:
    tmp: Path
    trust: TrustRoot
    root_key: Any
    seed: bytes
    manifest: dict[str, Any]
    root_doc: dict[str, Any]


def _bundle_kit(tmp: Path) -> BundleKit:
    root, release = generate_signing_key(), generate_signing_key()
    trust = TrustRoot.create(
        root_keys=[root], release_keys=[release], expires_at=datetime.now(UTC) + timedelta(days=9)
    )
    model = b"\x08\x07fuzz-model" * 40
    golden = b"golden-bytes" * 10
    now = datetime.now(UTC).replace(microsecond=0)
    manifest = BundleManifest(
        model=ModelInfo(name="digits", version=3),
        profile="x86-cpu",
        created_at=now,
        expires_at=now + timedelta(days=5),
        files=(
            FileEntry(
                path="model/model.onnx",
                sha256=hashlib.sha256(model).hexdigest(),
                size=len(model),
                role="artifact",
            ),
            FileEntry(
                path="golden/golden.npz",
                sha256=hashlib.sha256(golden).hexdigest(),
                size=len(golden),
                role="golden",
            ),
        ),
        artifact=ArtifactInfo(
            path="model/model.onnx", format="onnx", runtime="onnxruntime", precision="int8"
        ),
        inputs=(TensorSpec(name="input", dtype="float32", shape=(None, 1, 8, 8)),),
        outputs=(TensorSpec(name="logits", dtype="float32", shape=(None, 10)),),
    )
    path = tmp / "seed.efb"
    write_bundle(
        path,
        manifest,
        sign_manifest(manifest, [release]),
        {"model/model.onnx": model, "golden/golden.npz": golden},
    )
    return BundleKit(
        tmp=tmp,
        trust=trust,
        root_key=root,
        seed=path.read_bytes(),
        manifest=json.loads(manifest_bytes(manifest)),
        root_doc=json.loads(trust.raw),
    )


# -- targets ------------------------------------------------------------------------------


def _protocol_target(
    tally: Tally, n: int, strategy: st.SearchStrategy[bytes], fn: Callable[[bytes], Any]
) -> None:
    @given(raw=strategy)
    @_settings(n)
    def case(raw: bytes) -> None:
        tally.cases += 1
        try:
            fn(raw)
        except ProtocolError as exc:
            tally.reject(exc.code)
        except Exception:  # the point: anything but ProtocolError is a bug
            tally.crash(f"input {raw[:300]!r}\n{traceback.format_exc(limit=4)}")
        else:
            tally.accepted += 1

    case()


def _chunk_seed() -> bytes:
    from protocol.messages import ChunkHeader, encode_chunk

    data = bytes(range(256)) * 20
    header = ChunkHeader(
        device_id=DEV,
        bundle_sha256=SHA,
        index=0,
        chunk_size=8192,
        total_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return encode_chunk(header, data)  # type: ignore[no-any-return]


def _decode_chunk() -> Callable[[bytes], Any] | None:
    try:
        from protocol.messages import decode_chunk  # added by the transfer work
    except ImportError:
        return None
    return decode_chunk  # type: ignore[no-any-return]


def mutated_bundle(seed: bytes) -> st.SearchStrategy[bytes]:
    """Byte-level damage to a real bundle: flips, cuts, inserts, zeroed blocks, tar sizes."""

    @st.composite
    def strategy(draw: st.DrawFn) -> bytes:
        raw = bytearray(seed)
        for _ in range(draw(st.integers(0, 4))):
            if not raw:
                break
            kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "zero", "size"]))
            blocks = len(raw) // 512
            if kind == "flip":
                i = draw(st.integers(0, len(raw) - 1))
                raw[i] = draw(st.integers(0, 255))
            elif kind == "truncate":
                del raw[draw(st.integers(0, len(raw))) :]
            elif kind == "insert":
                i = draw(st.integers(0, len(raw)))
                raw[i:i] = draw(st.binary(min_size=1, max_size=600))
            elif kind == "zero" and blocks:
                b = draw(st.integers(0, blocks - 1)) * 512
                raw[b : b + 512] = bytes(512)
            elif kind == "size" and blocks:
                # a tar header's size field (12 octal bytes at offset 124 of a header block)
                b = draw(st.integers(0, blocks - 1)) * 512
                raw[b + 124 : b + 136] = draw(
                    st.sampled_from([b"77777777777\0", b"00000000000\0", b"00000001000\0"])
                )
        return bytes(raw)

    return strategy()


def _bundle_target(tally: Tally, n: int, kit: BundleKit) -> None:
    work = kit.tmp / "bundles"
    work.mkdir(exist_ok=True)

    @given(raw=mutated_bundle(kit.seed))
    @_settings(n)
    def case(raw: bytes) -> None:
        tally.cases += 1
        path = work / "b.efb"
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        path.write_bytes(raw)
        try:
            BundleReader(path).verify(kit.trust, extract_to=out)
        except ProtocolError as exc:
            tally.reject(exc.code)
            # Files verified before the failing member may stay in the extraction dir (the
            # caller's staging area, which the agent discards on any failure); a partial or
            # unverified file may not.
            partial = [p for p in out.rglob("*.part")]
            if partial:
                tally.crash(f"refused bundle left partial files: {partial[:5]}")
        except Exception:
            tally.crash(f"bundle of {len(raw)} bytes\n{traceback.format_exc(limit=4)}")
        else:
            tally.accepted += 1
        stray = [p for p in work.iterdir() if p.name not in ("b.efb", "out")]
        if stray:
            tally.crash(f"files written outside the extraction dir: {stray[:5]}")
            for p in stray:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    case()


def _trust_target(tally: Tally, n: int, kit: BundleKit) -> None:
    v2 = kit.trust.successor(
        signers=[kit.root_key], expires_at=datetime.now(UTC) + timedelta(days=30)
    )
    seeds = [kit.root_doc, json.loads(v2.raw)]

    def check(raw: bytes) -> Any:
        TrustRoot.from_bytes(raw)
        return kit.trust.update_chain([raw])

    _protocol_target(tally, n, _inputs(seeds), check)


def _rest_target(tally: Tally, n: int, tmp: Path) -> None:
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    import schemathesis
    from sqlmodel import Session
    from starlette.testclient import TestClient

    from fleet.app import create_app
    from fleet.auth import create_token
    from fleet.broker_config import write_broker_config
    from fleet.settings import FleetSettings

    class Publisher:
        def publish_command(self, command: Any) -> None:
            return None

    root, release = generate_signing_key(), generate_signing_key()
    trust = TrustRoot.create(
        root_keys=[root], release_keys=[release], expires_at=datetime.now(UTC) + timedelta(days=9)
    )
    (tmp / "root.json").write_bytes(trust.raw)
    write_broker_config(tmp / "broker", port=1883)
    cfg = FleetSettings(
        database_url=f"sqlite:///{tmp / 'fleet.db'}",
        trust_root=tmp / "root.json",
        bundle_dir=tmp / "bundles",
        broker_dir=tmp / "broker",
        broker_pid_file=tmp / "broker" / "absent.pid",
    )
    app = create_app(cfg, publisher=Publisher())
    with TestClient(app, raise_server_exceptions=False) as client:
        with Session(app.state.engine) as s:
            token = create_token(s, name="fuzzer", role="admin", created_by="fuzz")[1]
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        ops = [r.ok() for r in schema.get_all_operations()]
        per_op = max(1, math.ceil(n / len(ops)))
        for op in ops:
            _fuzz_operation(tally, op, per_op, client, token)
        # the baseline: a plain authorised read works
        ok = client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
        tally.seed_accepted = ok.status_code == 200


_TRANSPORT_KEYS = frozenset(
    {"method", "url", "headers", "params", "json", "content", "data", "files"}
)


def _fuzz_operation(tally: Tally, op: Any, n: int, client: Any, token: str) -> None:
    """``n`` schemathesis cases for one operation; 9 in 10 carry the admin token."""
    public = op.path in ("/healthz", "/metrics")

    @given(case=op.as_strategy(), authed=st.integers(0, 9))
    @_settings(n)
    def case(case: Any, authed: int) -> None:
        tally.cases += 1
        transport = case.as_transport_kwargs(base_url="http://testserver")
        kw = {k: v for k, v in transport.items() if k in _TRANSPORT_KEYS}
        if isinstance(kw.get("data"), bytes | str):  # httpx wants raw bodies as content=
            kw["content"] = kw.pop("data")
        headers = dict(kw.pop("headers", None) or {})
        headers.pop("Authorization", None)
        if authed:
            headers["Authorization"] = f"Bearer {token}"
        try:
            r = client.request(headers=headers, **kw)
        except Exception:
            tally.crash(f"{op.method} {op.path}: {traceback.format_exc(limit=3)}")
            return
        label = f"HTTP {r.status_code}"
        if not authed and not public and r.status_code != 401:
            tally.crash(f"{op.method} {op.path} without a token answered {label}")
        elif r.status_code >= 500 and not (r.status_code == 503 and "broker_unavailable" in r.text):
            tally.crash(f"{op.method} {op.path} {str(kw)[:400]} -> {label}: {r.text[:400]}")
        elif r.status_code < 400:
            tally.accepted += 1
        else:
            tally.reject(label)

    case()


def run(total: int, *, only: set[str] | None = None) -> list[Tally]:
    """Run every target with its share of ``total`` cases; return the tallies."""
    tallies: list[Tally] = []
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-fuzz-"))
    try:
        kit = _bundle_kit(tmp)
        message_seeds = _message_seeds()
        chunk = _decode_chunk()
        targets: dict[str, Callable[[Tally, int], None]] = {
            "decode_message": lambda t, k: _protocol_target(
                t, k, _inputs(message_seeds), decode_message
            ),
            "decode_command": lambda t, k: _protocol_target(
                t, k, _inputs(message_seeds[:3]), decode_command
            ),
            "parse_manifest": lambda t, k: _protocol_target(
                t, k, _inputs([kit.manifest]), parse_manifest
            ),
            "trust_root": lambda t, k: _trust_target(t, k, kit),
            "bundle_reader": lambda t, k: _bundle_target(t, k, kit),
            "rest_api": lambda t, k: _rest_target(t, k, tmp / "rest"),
        }
        seeds: dict[str, Callable[[], Any]] = {
            "decode_message": lambda: [
                decode_message(json.dumps(s).encode()) for s in message_seeds
            ],
            "decode_command": lambda: decode_command(json.dumps(message_seeds[0]).encode()),
            "parse_manifest": lambda: parse_manifest(json.dumps(kit.manifest).encode()),
            "trust_root": lambda: TrustRoot.from_bytes(kit.trust.raw),
            "bundle_reader": lambda: BundleReader(_write(tmp / "s.efb", kit.seed)).verify(
                kit.trust
            ),
        }
        if chunk is not None:
            frame = _chunk_seed()
            targets["decode_chunk"] = lambda t, k: _protocol_target(
                t, k, st.binary(max_size=600) | mutated_bundle(frame), chunk
            )
            seeds["decode_chunk"] = lambda: chunk(frame)
        (tmp / "rest").mkdir()
        for name, fn in targets.items():
            if only and name not in only:
                continue
            tally = Tally(name)
            if name in seeds:
                try:
                    seeds[name]()
                    tally.seed_accepted = True
                except Exception:
                    tally.seed_accepted = False
            start = time.perf_counter()
            fn(tally, max(1, int(total * SHARES.get(name, 0.04))))
            tally.seconds = time.perf_counter() - start
            tallies.append(tally)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tallies


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 2,000 cases")
    parser.add_argument("--cases", type=int, default=None, help="total cases (default 100000)")
    parser.add_argument("--only", action="append", help="run only this target (repeatable)")
    args = parser.parse_args()
    total = args.cases or (2_000 if args.quick else 105_000)
    import logging

    logging.disable(logging.WARNING)  # the fleet logs every refused request
    start = time.perf_counter()
    tallies = run(total, only=set(args.only) if args.only else None)
    wall = time.perf_counter() - start
    print(f"\n## fuzz: {sum(t.cases for t in tallies):,} generated cases in {wall:.0f} s\n")
    print("| target | valid seed accepted (baseline) | cases | accepted | rejected | crashes |")
    print("|---|---|---:|---:|---:|---:|")
    for t in tallies:
        print(
            f"| {t.name} | {'yes' if t.seed_accepted else 'NO'} | {t.cases:,} | "
            f"{t.accepted:,} | {t.rejected:,} | {t.crashes} |"
        )
    for t in tallies:
        top = sorted(t.codes.items(), key=lambda kv: -kv[1])[:6]
        print(f"\n{t.name}: rejections by code: {dict(top)}")
        for ex in t.examples:
            print(f"  CRASH: {ex}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if args.only or args.quick:
            raise OSError("partial runs do not replace the recorded full run")
        (out / "fuzz.json").write_text(
            json.dumps(
                {
                    "total_cases": sum(t.cases for t in tallies),
                    "wall_s": round(wall, 1),
                    "targets": [
                        {k: v for k, v in t.__dict__.items() if k != "examples"}
                        | {"crash_examples": t.examples}
                        for t in tallies
                    ],
                },
                indent=1,
                default=str,
            )
        )
    bad = sum(t.crashes for t in tallies) + sum(not t.seed_accepted for t in tallies)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
