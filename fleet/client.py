"""A small client for the fleet's REST API, on the standard library only.

`edgefleet devices`, `upload` and `deploy` use it, so they need no HTTP package installed.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["FleetClient", "FleetClientError"]

DEFAULT_TIMEOUT_S = 30.0


class FleetClientError(Exception):
    """The fleet answered with an error, or could not be reached; the message says which."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FleetClient:
    """``token`` defaults to $EDGEFLEET_TOKEN; it is sent as ``Authorization: Bearer``."""

    def __init__(
        self, base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, token: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.token = token or os.environ.get("EDGEFLEET_TOKEN") or None

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        hdrs = {"Accept": "application/json", **(headers or {})}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        url = f"{self.base_url}{path}"
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise FleetClientError(
                f"{method} {url} failed with HTTP {exc.code}: {_error_text(exc.read())}",
                status=exc.code,
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetClientError(f"cannot reach the fleet at {self.base_url}: {reason}") from None
        return json.loads(raw) if raw else None

    def devices(self) -> list[dict[str, Any]]:
        """GET /api/v1/devices."""
        return self._call("GET", "/api/v1/devices")  # type: ignore[no-any-return]

    def upload(self, path: Path) -> dict[str, Any]:
        """POST the bundle file as a raw body (streamed from disk)."""
        size = path.stat().st_size
        with open(path, "rb") as f:
            return self._call(  # type: ignore[no-any-return]
                "POST",
                "/api/v1/bundles",
                data=f,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )

    def deploy(
        self, bundle_sha256: str, *, device_ids: list[str] | None = None, profile: str | None = None
    ) -> dict[str, Any]:
        """POST /api/v1/deployments."""
        body: dict[str, Any] = {"bundle_sha256": bundle_sha256}
        if device_ids:
            body["device_ids"] = device_ids
        if profile is not None:
            body["profile"] = profile
        return self._call("POST", "/api/v1/deployments", body=body)  # type: ignore[no-any-return]

    def rollback(
        self, device_id: str, *, target_bundle_sha256: str | None = None, reason: str = ""
    ) -> dict[str, Any]:
        """POST /api/v1/devices/{id}/rollback."""
        body = {"target_bundle_sha256": target_bundle_sha256, "reason": reason}
        return self._call(  # type: ignore[no-any-return]
            "POST", f"/api/v1/devices/{device_id}/rollback", body=body
        )

    def enroll(
        self,
        device_id: str,
        *,
        profile: str,
        tags: list[str] | None = None,
        certificate: bool = False,
    ) -> dict[str, Any]:
        """POST /api/v1/devices/enroll (admin): the device's credentials, shown once."""
        body = {
            "device_id": device_id,
            "profile": profile,
            "tags": tags or [],
            "certificate": certificate,
        }
        return self._call("POST", "/api/v1/devices/enroll", body=body)  # type: ignore[no-any-return]

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        """POST /api/v1/devices/{id}/revoke (admin)."""
        return self._call("POST", f"/api/v1/devices/{device_id}/revoke")  # type: ignore[no-any-return]

    def create_token(self, name: str, role: str) -> dict[str, Any]:
        """POST /api/v1/tokens (admin)."""
        body = {"name": name, "role": role}
        return self._call("POST", "/api/v1/tokens", body=body)  # type: ignore[no-any-return]

    def install_trust_root(self, raw: bytes) -> dict[str, Any]:
        """POST /api/v1/trust-root (admin): root N+1, pushed to devices."""
        return self._call(  # type: ignore[no-any-return]
            "POST",
            "/api/v1/trust-root",
            data=raw,
            headers={"Content-Type": "application/json"},
        )


def _error_text(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:500]
    if isinstance(obj, dict) and "detail" in obj:
        detail = obj["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return json.dumps(obj)[:500]
