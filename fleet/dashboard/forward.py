"""Buttons act through the real REST API, in process, with the operator's own token.

Why not call the services directly: the API is where roles are checked, the audit log is
written ("who" is the token's name) and errors get their messages. Calling the fleet app as
an ASGI application keeps all of that, with no network hop and no HTTP client dependency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["ApiAnswer", "call_api"]

#: an API answer larger than this is cut (the dashboard shows messages, not bulk data)
MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiAnswer:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        """The API's own explanation (``detail``) of an error, else a short summary."""
        if isinstance(self.body, dict) and "detail" in self.body:
            detail = self.body["detail"]
            if isinstance(detail, str):
                return detail
            if isinstance(detail, list):  # FastAPI validation errors
                return "; ".join(str(d.get("msg", d)) for d in detail if isinstance(d, dict))
            return json.dumps(detail)[:500]
        if isinstance(self.body, str):
            return self.body[:500]
        return f"HTTP {self.status}"


async def call_api(
    app: Any,
    method: str,
    path: str,
    *,
    token: str | None,
    body: Any = None,
    client: tuple[str, int] | None = None,
    state: dict[str, Any] | None = None,
) -> ApiAnswer:
    """Send one request to the fleet app (an ASGI callable) and collect its JSON answer."""
    raw = b"" if body is None else json.dumps(body).encode()
    headers = [
        (b"host", b"dashboard.internal"),
        (b"accept", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
    ]
    if body is not None:
        headers.append((b"content-type", b"application/json"))
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": client or ("127.0.0.1", 0),
        "server": ("dashboard.internal", 80),
        "state": dict(state or {}),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    status = 500
    chunks: list[bytes] = []
    size = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            piece = message.get("body", b"")
            if size < MAX_ANSWER_BYTES:
                chunks.append(piece[: MAX_ANSWER_BYTES - size])
            size += len(piece)

    await app(scope, receive, send)
    text = b"".join(chunks).decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return ApiAnswer(status=status, body=parsed)
