"""The local inference API: HTTP/JSON on 127.0.0.1 and/or a Unix socket (stdlib only).

    POST /v1/predict  {"inputs": {"<name>": nested list}}  ->
                      {"prediction_id", "model": {...}, "outputs": {"<name>": nested list}}
    POST /v1/label    {"prediction_id", "label"}  -> {"outcome": "joined"}; 404 unknown
                      prediction, 409 duplicate, 422 wrong type (agent/quality.py)
    GET  /v1/model    the model being served (name, version, bundle, signature)
    GET  /v1/health   {"status": "ok"|"no_model", ...}

Inputs are checked against the bundle's signature; problems are 4xx with a JSON body
``{"error": {"code", "message"}}``: 400 malformed request, 404/405 wrong path or method,
413 body too large, 415 not JSON, 422 inputs do not match the signature, 503 no model
installed; 500 means the model itself failed. Every refused request is counted (telemetry
``error_counts`` via the service, and `LocalApi.counters`). The server only ever listens on
loopback or a Unix socket: it is for applications on the device.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceError, InvalidInputError, NoModelError
from agent.inference import InferenceService
from agent.model import LoadedModel

__all__ = ["LocalApi"]

log = logging.getLogger(__name__)


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _model_info(model: LoadedModel) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.model.name,
        "version": m.model.version,
        "bundle_sha256": model.bundle_sha256,
        "backend": model.backend.description,
        "task": m.task,
        "class_names": list(m.class_names) if m.class_names else None,
        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in m.inputs],
        "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in m.outputs],
    }


def _to_arrays(model: LoadedModel, body: Any) -> dict[str, np.ndarray]:
    """JSON inputs -> arrays of the signature's dtypes; 400/422 with a clear message."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
        raise _ApiError(400, "bad_request", 'body must be a JSON object {"inputs": {name: array}}')
    inputs = body["inputs"]
    specs = {s.name: s for s in model.manifest.inputs}
    unknown = sorted(set(inputs) - set(specs))
    missing = sorted(set(specs) - set(inputs))
    if unknown or missing:
        raise _ApiError(
            422,
            "invalid_input",
            f"the model takes inputs {sorted(specs)}; missing {missing}, unexpected {unknown}",
        )
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        spec = specs[name]
        try:
            arr = np.asarray(value, dtype=np.dtype(spec.dtype))
        except (ValueError, TypeError, OverflowError) as exc:
            raise _ApiError(
                422,
                "invalid_input",
                f"input {name!r} is not a rectangular array of numbers convertible to "
                f"{spec.dtype}: {exc}",
            ) from None
        out[name] = arr
    return out


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgefleet-agent"
    protocol_version = "HTTP/1.1"
    api: LocalApi  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("local api: " + format, *args)

    def address_string(self) -> str:
        return "unix" if not self.client_address else str(self.client_address[0])

    # -- plumbing --------------------------------------------------------------------------
    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, err: _ApiError) -> None:
        self.api.count(err.code)
        self._send(err.status, {"error": {"code": err.code, "message": err.message}})

    def _dispatch(self, method: str) -> None:
        try:
            route = self.api.routes.get((method, self.path.split("?", 1)[0]))
            if route is None:
                known = {p for (_, p) in self.api.routes}
                if self.path.split("?", 1)[0] in known:
                    raise _ApiError(405, "method_not_allowed", f"{method} is not allowed here")
                raise _ApiError(404, "not_found", f"no such endpoint {self.path!r}")
            status, body = route(self)
            self._send(status, body)
        except _ApiError as err:
            if err.status == 413:
                self.close_connection = True
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # the server must survive any request
            log.exception("local api: %s %s failed", method, self.path)
            self._error(_ApiError(500, "internal_error", "internal error; see the agent's log"))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def read_json(self) -> Any:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if ctype != "application/json":
            raise _ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
        try:
            n = int(self.headers.get("Content-Length") or "-1")
        except ValueError:
            n = -1
        if n < 0:
            raise _ApiError(411, "length_required", "a Content-Length header is required")
        if n > self.api.max_body_bytes:
            raise _ApiError(
                413, "too_large", f"body is {n} bytes; the limit is {self.api.max_body_bytes}"
            )
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _ApiError(400, "bad_json", f"body is not valid JSON: {exc}") from None


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class LocalApi:
    """Serves `InferenceService` over HTTP on 127.0.0.1:``port`` and/or a Unix socket."""

    def __init__(
        self,
        service: InferenceService,
        *,
        port: int | None = None,
        socket_path: Path | None = None,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.counters: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.port: int | None = None
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self._want_port = port
        self.routes = {
            ("POST", "/v1/predict"): self._predict,
            ("POST", "/v1/label"): self._label,
            ("GET", "/v1/model"): self._model,
            ("GET", "/v1/health"): self._health,
        }

    def count(self, code: str) -> None:
        with self._lock:
            self.counters[code] += 1

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"api": self})
        if self._want_port is not None:
            tcp = ThreadingHTTPServer(("127.0.0.1", self._want_port), handler)
            tcp.daemon_threads = True
            self.port = tcp.server_address[1]
            self._serve(tcp, "tcp")
            log.info("local inference API on http://127.0.0.1:%d", self.port)
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.socket_path.is_socket():
                    self.socket_path.unlink()  # left by a killed agent
            unix = _UnixServer(str(self.socket_path), handler)
            os.chmod(self.socket_path, 0o660)
            self._serve(unix, "unix")
            log.info("local inference API on unix:%s", self.socket_path)

    def _serve(self, server: socketserver.BaseServer, name: str) -> None:
        t = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"api-{name}"
        )
        t.daemon = True
        t.start()
        self._servers.append(server)
        self._threads.append(t)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()  # type: ignore[attr-defined]
        for t in self._threads:
            t.join(timeout=5.0)
        self._servers.clear()
        self._threads.clear()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()

    # -- routes ----------------------------------------------------------------------------
    def _predict(self, req: _Handler) -> tuple[int, dict[str, Any]]:
        body = req.read_json()
        model = self.service.model
        if model is None:
            raise _ApiError(503, "no_model", "no model is installed yet; deploy a bundle first")
        arrays = _to_arrays(model, body)
        try:
            prediction_id, outputs = self.service.predict_with_id(arrays)
        except InvalidInputError as exc:
            raise _ApiError(422, "invalid_input", str(exc)) from None
        except NoModelError as exc:
            raise _ApiError(503, "no_model", str(exc)) from None
        except InferenceError as exc:
            raise _ApiError(500, "runtime_error", str(exc)) from None
        served = self.service.model or model
        self.count("ok")
        return 200, {
            "prediction_id": prediction_id,
            "model": {
                "name": served.model_name,
                "version": served.model_version,
                "bundle_sha256": served.bundle_sha256,
            },
            "outputs": {k: v.tolist() for k, v in outputs.items()},
        }

    def _label(self, req: _Handler) -> tuple[int, dict[str, Any]]:
        body = req.read_json()
        if not isinstance(body, dict) or not isinstance(body.get("prediction_id"), str):
            raise _ApiError(
                400, "bad_request", 'body must be {"prediction_id": "<id>", "label": <class>}'
            )
        if "label" not in body:
            raise _ApiError(400, "bad_request", "the body has no label")
        outcome = self.service.report_label(body["prediction_id"], body["label"])
        status = {"joined": 200, "unknown_prediction": 404, "duplicate": 409}.get(
            outcome.value, 422
        )
        if status != 200:
            raise _ApiError(
                status,
                f"label_{outcome.value}",
                {
                    "unknown_prediction": "no recent prediction has this id (never made, or "
                    "older than the agent's record)",
                    "duplicate": "this prediction already has a label; the first one stands",
                }.get(
                    outcome.value,
                    "the label is not a class of the model (index or name; one per row)",
                ),
            )
        self.count("label_joined")
        return 200, {"outcome": outcome.value}

    def _model(self, _req: _Handler) -> tuple[int, dict[str, Any]]:
        model = self.service.model
        if model is None:
            raise _ApiError(503, "no_model", "no model is installed yet")
        return 200, _model_info(model)

    def _health(self, _req: _Handler) -> tuple[int, dict[str, Any]]:
        model = self.service.model
        h = self.service.health()
        return 200, {
            "status": "ok" if model is not None else "no_model",
            "model_version": model.model_version if model else None,
            "bundle_sha256": model.bundle_sha256 if model else None,
            "calls": h.calls,
            "runtime_errors": h.runtime_errors,
        }


def unix_http_request(
    path: Path, method: str, url: str, body: bytes | None = None, timeout_s: float = 10.0
) -> tuple[int, dict[str, Any]]:
    """A tiny HTTP/1.1 client over a Unix socket (for tests and `edgefleet agent` tools)."""
    import http.client

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout_s)
            s.connect(str(path))
            self.sock = s

    conn = _Conn("localhost", timeout=timeout_s)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()
