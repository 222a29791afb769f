"""The agent's exception tree: one root, each error carrying the ReasonCode it reports."""

from __future__ import annotations

from protocol.messages import ReasonCode

__all__ = [
    "AgentError",
    "BackendError",
    "ConfigError",
    "DownloadError",
    "InferenceError",
    "InstallError",
    "InvalidInputError",
    "ModelLoadError",
    "NoModelError",
    "OutboxError",
    "StateError",
]


class AgentError(Exception):
    """Root of every error raised by agent/. ``reason`` is what the fleet is told."""

    reason: ReasonCode = ReasonCode.INTERNAL

    def __init__(self, message: str, *, reason: ReasonCode | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(AgentError):
    """The agent's configuration or command line is wrong; the message says which value."""


class StateError(AgentError):
    """The state directory is unreadable, inconsistent or belongs to another device."""


class OutboxError(AgentError):
    """The on-disk outbox (SQLite) failed; telemetry is at risk, serving is not."""


class InstallError(AgentError):
    """An install step failed; ``reason`` says which and the install ends there."""


class DownloadError(InstallError):
    reason = ReasonCode.DOWNLOAD_FAILED


class BackendError(AgentError):
    """An inference runtime failed (loading or running a model)."""


class ModelLoadError(BackendError):
    reason = ReasonCode.LOAD_FAILED


class InferenceError(AgentError):
    """A prediction failed. ``kind`` is the key it is counted under in telemetry."""

    kind: str = "runtime_error"


class InvalidInputError(InferenceError):
    """The caller's inputs do not match the model's input signature (the caller's bug)."""

    kind = "invalid_input"


class NoModelError(InferenceError):
    """No model is installed yet, so nothing can be predicted."""

    kind = "no_model"
