"""The fleet's exception tree: one root, a shallow tree, each with its HTTP status.

The HTTP mapping lives here and in one exception handler (`fleet.app`); routes raise these.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerUnavailable",
    "BundleRejected",
    "BundleTooLarge",
    "Conflict",
    "FleetError",
    "InvalidRequest",
    "NotFound",
    "SettingsError",
]


class FleetError(Exception):
    """Root of every error raised by fleet/."""

    status_code: int = 500
    #: stable, machine-readable reason in the JSON error body
    code: str = "fleet_error"

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": code, "detail": message, ...extra}``."""
        return {"error": self.code, "detail": self.message, **self.extra}


class SettingsError(FleetError):
    code = "bad_settings"


class InvalidRequest(FleetError):
    status_code = 422
    code = "invalid_request"


class BundleRejected(InvalidRequest):
    """The trust root (or the bundle format) rejected an uploaded bundle."""

    code = "bundle_rejected"


class BundleTooLarge(FleetError):
    status_code = 413
    code = "bundle_too_large"


class NotFound(FleetError):
    status_code = 404
    code = "not_found"


class Conflict(FleetError):
    status_code = 409
    code = "conflict"


class BrokerUnavailable(FleetError):
    """The MQTT broker is down or did not acknowledge a command in time."""

    status_code = 503
    code = "broker_unavailable"
