# ruff: noqa: F811  (the rig fixtures are imported from test_agent_install)
"""Chunked, resumable bundle transfer (MQTT chunks, HTTP range fallback), shadow mode and the
local inference API, with fakes at the transport seam and a real ONNX model."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.api import unix_http_request
from agent.errors import DownloadError
from agent.testing import ChunkResponder, FakeTransport
from agent.transfer import (
    ChunkedFetcher,
    HttpRangeSource,
    MqttChunkSource,
    PartialDownload,
    RateLimiter,
)
from protocol.messages import (
    ChunkHeader,
    DeployCommand,
    InstallState,
    TelemetryWindow,
    decode_chunk,
    decode_message,
    encode_chunk,
)
from tests.unit.test_agent_install import (  # noqa: F401  (fixtures)
    DEVICE,
    Rig,
    heldout,
    release_key,
    rig,
    states,
    trust_file,
)

S = InstallState
CHUNK = 4096


def _command(path: Path, url: str = "", **kw: Any) -> DeployCommand:
    import hashlib

    raw = path.read_bytes()
    return DeployCommand(
        device_id=DEVICE,
        bundle_sha256=hashlib.sha256(raw).hexdigest(),
        bundle_size=len(raw),
        bundle_url=url or path.as_uri(),
        model_name="m",
        model_version=1,
        **kw,
    )


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob.efb"
    p.write_bytes(np.random.default_rng(1).bytes(10 * CHUNK + 123))
    return p


def _mqtt_fetcher(transport: FakeTransport, **kw: Any) -> tuple[ChunkedFetcher, MqttChunkSource]:
    src = MqttChunkSource(transport, DEVICE, window=4, timeout_s=0.3, max_stalls=1)
    transport.subscribe(src.topic_chunk, src.on_frame)
    fetcher = ChunkedFetcher(
        mqtt=src, http=HttpRangeSource(timeout_s=5), max_bytes=1 << 30, chunk_size=CHUNK, **kw
    )
    return fetcher, src


def test_chunk_frame_round_trip_and_limits() -> None:
    h = ChunkHeader(
        device_id=DEVICE, bundle_sha256="a" * 64, index=3, chunk_size=CHUNK, total_size=9
    )
    header, data = decode_chunk(encode_chunk(h, b"\x00\xff" * 10))
    assert (header.index, data) == (3, b"\x00\xff" * 10)
    from protocol.errors import MessageDecodeError

    for bad in (b"", b"XXXX\x00\x00\x00\x01{", b"EFC1\xff\xff\xff\xff"):
        with pytest.raises(MessageDecodeError):
            decode_chunk(bad)


def test_mqtt_transfer_checks_each_chunk_and_asks_again(tmp_path: Path, blob: Path) -> None:
    transport = FakeTransport(auto_ack=True)
    fetcher, src = _mqtt_fetcher(transport)
    cmd = _command(blob)
    responder = ChunkResponder(transport, {cmd.bundle_sha256: blob}, corrupt=[2, 7])
    progress: list[float] = []
    out = fetcher.fetch(cmd, tmp_path / "dl", progress.append)
    assert out.read_bytes() == blob.read_bytes()
    assert fetcher.last_sources == ["mqtt"]
    assert src.counters["bad_frames"] == 2  # the two corrupted chunks, refused by sha256
    assert responder.served.count(2) == 2 and responder.served.count(7) == 2
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert not list((tmp_path / "dl").glob("*.part"))


def test_interrupted_transfer_resumes_without_refetching(tmp_path: Path, blob: Path) -> None:
    cmd = _command(blob, url="http://127.0.0.1:9/unreachable")
    transport = FakeTransport(auto_ack=True)
    fetcher, _ = _mqtt_fetcher(transport)
    ChunkResponder(transport, {cmd.bundle_sha256: blob}, drop_after=6)
    with pytest.raises(DownloadError):
        fetcher.fetch(cmd, tmp_path / "dl", lambda _f: None)
    assert (tmp_path / "dl" / f"{cmd.bundle_sha256}.have").exists()

    # "restart": a new transport and fetcher over the same download directory
    transport = FakeTransport(auto_ack=True)
    fetcher, _ = _mqtt_fetcher(transport)
    responder = ChunkResponder(transport, {cmd.bundle_sha256: blob})
    out = fetcher.fetch(cmd, tmp_path / "dl", lambda _f: None)
    assert out.read_bytes() == blob.read_bytes()
    assert fetcher.last_resumed_chunks == 6
    assert sorted(responder.served) == list(range(6, 11))


class _RangeHandler(BaseHTTPRequestHandler):
    data = b""
    ranges: list[str] = []

    def log_message(self, *_a: Any) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range", "")
        type(self).ranges.append(rng)
        start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        body = self.data[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_http_range_fallback_fetches_only_missing_chunks(tmp_path: Path, blob: Path) -> None:
    handler = type("H", (_RangeHandler,), {"data": blob.read_bytes(), "ranges": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/b"
        cmd = _command(blob, url=url)
        transport = FakeTransport(auto_ack=True)
        fetcher, _ = _mqtt_fetcher(transport)
        ChunkResponder(transport, {cmd.bundle_sha256: blob}, drop_after=4)  # then silence
        out = fetcher.fetch(cmd, tmp_path / "dl", lambda _f: None)
        assert out.read_bytes() == blob.read_bytes()
        assert fetcher.last_sources == ["mqtt", "http"]
        assert handler.ranges == [f"bytes={4 * CHUNK}-{len(blob.read_bytes()) - 1}"]
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_bundle_on_the_fleet_fails_fast(tmp_path: Path, blob: Path) -> None:
    cmd = _command(blob, url="http://127.0.0.1:9/nothing")
    transport = FakeTransport(auto_ack=True)
    fetcher, _ = _mqtt_fetcher(transport)
    ChunkResponder(transport, {})
    with pytest.raises(DownloadError, match="GET"):
        fetcher.fetch(cmd, tmp_path / "dl", lambda _f: None)


def test_bitmap_of_another_chunk_size_is_not_trusted(tmp_path: Path) -> None:
    d = PartialDownload(tmp_path, sha256="c" * 64, size=3 * CHUNK, chunk_size=CHUNK)
    d.open()
    d.write(0, b"x" * CHUNK)
    d.persist()
    d.close()
    again = PartialDownload(tmp_path, sha256="c" * 64, size=3 * CHUNK, chunk_size=2 * CHUNK)
    again.open()
    assert again.resumed_chunks == 0 and again.missing() == [0, 1]
    again.close()


def test_rate_limiter_paces_bytes() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    lim = RateLimiter(1000.0, burst_bytes=100, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        lim.take(100)
    assert now[0] == pytest.approx(0.9, rel=0.01)  # 1000 B at 1000 B/s, after a 100 B burst


def test_deploy_over_mqtt_reports_progress(rig: Rig) -> None:
    agent = rig.start()
    b = rig.bundle(1)
    from agent.transfer import ChunkedFetcher as CF

    agent.installer.fetcher = CF(
        mqtt=agent.chunks,
        http=HttpRangeSource(),
        max_bytes=1 << 30,
        chunk_size=CHUNK,
    )
    ChunkResponder(rig.transport, {b.sha256: b.path})
    ev = rig.send(b.deploy_command(DEVICE, transfer="mqtt"))
    assert ev[-1].state is S.COMMITTED
    progress = [e.progress for e in ev if e.state is S.DOWNLOADING]
    assert len(progress) >= 5 and progress[-1] == 1.0


# -- shadow mode -------------------------------------------------------------------------------


def test_shadow_deploy_runs_beside_active_and_reports_agreement(rig: Rig) -> None:
    agent = rig.start()
    v1 = rig.bundle(1)
    rig.deploy(v1)
    v2 = rig.bundle(2)
    ev = rig.deploy(v2, shadow=True, shadow_sample_rate=1.0)
    assert states(ev)[-1] is S.SHADOWING
    assert ev[-1].active_bundle_sha256 == v1.sha256
    assert agent.service.model.bundle_sha256 == v1.sha256  # type: ignore[union-attr]
    for _ in range(10):
        rig.predict()
    assert agent.shadow.wait_idle()
    agent.tick(now=agent.clock() + 3600)
    w = [decode_message(p) for p in rig.transport.on("/telemetry")][-1]
    assert isinstance(w, TelemetryWindow)
    assert w.shadow is not None and w.shadow.bundle_sha256 == v2.sha256
    assert w.shadow.samples == 10
    assert w.shadow.top1_agreement == 1.0  # same weights: the candidate agrees everywhere
    assert w.shadow.mean_abs_error == pytest.approx(0.0, abs=1e-5)
    assert w.shadow.latency_ms is not None

    # Promote: a normal deploy of the shadowed bundle switches without downloading it again.
    fetched = len(rig.fetcher.fetched)
    ev = rig.deploy(v2)
    assert ev[-1].state is S.COMMITTED
    assert S.DOWNLOADING not in states(ev)
    assert len(rig.fetcher.fetched) == fetched
    assert agent.service.model.bundle_sha256 == v2.sha256  # type: ignore[union-attr]
    assert agent.shadow.model is None


def test_shadow_survives_restart(rig: Rig) -> None:
    rig.start()
    rig.deploy(rig.bundle(1))
    v2 = rig.bundle(2)
    rig.deploy(v2, shadow=True, shadow_sample_rate=0.5)
    rig.agent.stop()  # type: ignore[union-attr]
    agent = rig.start()
    assert agent.shadow.model is not None and agent.shadow.model.bundle_sha256 == v2.sha256
    assert agent.service.model.model_version == 1  # type: ignore[union-attr]


# -- local API -------------------------------------------------------------------------------


def _post(url: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_local_api_predicts_and_refuses_bad_input_clearly(rig: Rig, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    agent = rig.start(api_port=0, api_socket=sock)
    assert agent.api is not None and agent.api.port
    base = f"http://127.0.0.1:{agent.api.port}"
    status, body = _post(f"{base}/v1/predict", json.dumps({"inputs": {"input": []}}).encode())
    assert (status, body["error"]["code"]) == (503, "no_model")

    b = rig.bundle(1)
    rig.deploy(b)
    x = rig.samples[:2]
    good = json.dumps({"inputs": {"input": x.tolist()}}).encode()
    status, body = _post(f"{base}/v1/predict", good)
    assert status == 200
    assert body["model"] == {"name": "digits", "version": 1, "bundle_sha256": b.sha256}
    np.testing.assert_allclose(np.asarray(body["outputs"]["logits"]), rig.predict()[:2], rtol=1e-5)
    assert len(body["prediction_id"]) == 32

    def inputs(v: object) -> bytes:
        return json.dumps({"inputs": v}).encode()

    js = "application/json"
    cases = [
        (b"{nope", js, 400, "bad_json"),
        (b'{"x": 1}', js, 400, "bad_request"),
        (inputs({"wrong": [1]}), js, 422, "invalid_input"),
        (inputs({"input": [[1, 2], [3]]}), js, 422, "invalid_input"),  # ragged
        (inputs({"input": [[[1.0] * 8] * 8]}), js, 422, "invalid_input"),  # wrong rank
        (inputs({"input": "abc"}), js, 422, "invalid_input"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
    ]
    for raw, ctype, want, code in cases:
        status, body = _post(f"{base}/v1/predict", raw, ctype)
        assert (status, body["error"]["code"]) == (want, code), raw
        assert body["error"]["message"]

    status, body = unix_http_request(sock, "GET", "/v1/model")
    assert status == 200 and body["inputs"][0]["name"] == "input"
    status, body = unix_http_request(sock, "GET", "/v1/health")
    assert status == 200 and body["status"] == "ok"
    status, body = unix_http_request(sock, "GET", "/v1/nothing")
    assert status == 404
    status, _ = unix_http_request(sock, "POST", "/v1/predict", good)
    assert status == 200
    assert agent.api.counters["invalid_input"] == 4
    agent.tick(now=agent.clock() + 3600)
    w = decode_message(rig.transport.on("/telemetry")[-1])
    assert w.extra["api"]["invalid_input"] == 4
