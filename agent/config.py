"""The agent's configuration: built once at the entry point, validated, frozen, passed down."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError
from hardware_profiles import HardwareProfile, ProfileError, load_profile
from protocol.errors import TopicError
from protocol.topics import validate_device_id

__all__ = ["AgentConfig", "load_agent_profile"]

_MAX_TAGS = 32


def load_agent_profile(name_or_path: str) -> HardwareProfile:
    """Load a hardware profile, mapping its errors to ConfigError."""
    try:
        return load_profile(name_or_path)
    except ProfileError as exc:
        raise ConfigError(f"--profile: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """Everything the agent needs to run; resource limits carry their units in their names."""

    device_id: str
    profile: HardwareProfile
    state_dir: Path
    #: the trust root to install on first start (later starts use state_dir/trust/root.json)
    trust_root_path: Path | None = None
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_keepalive_s: int = 30
    #: how long the broker keeps this device's session (and queued commands) while offline
    mqtt_session_expiry_s: int = 7 * 24 * 3600
    telemetry_window_s: float = 60.0
    heartbeat_s: float = 30.0
    #: health window after a switch: this many inferences, waiting up to this long for
    #: real traffic before topping up with golden inputs
    health_inferences: int = 20
    health_timeout_s: float = 30.0
    #: p95 budget of the health window; None: the profile's ``limits.latency_budget_ms``.
    #: For a device slower than its class (or a simulated one on a shared host).
    latency_budget_ms: float | None = None
    #: zlib each telemetry window's sketch pack: ~20% fewer bytes on the device's link for
    #: ~0.14 ms of fleet CPU per window (as much as storing the window); for metered links
    compress_sketches: bool = False
    outbox_max_bytes: int = 64 * 1024 * 1024
    outbox_max_age_s: float = 7 * 24 * 3600.0
    download_max_bytes: int = 1024 * 1024 * 1024
    download_timeout_s: float = 30.0
    tags: tuple[str, ...] = ()
    #: bundle transfer: chunk size, cap on download speed (None = unlimited), chunks kept
    #: requested at once over MQTT, seconds without a chunk before asking again, and the
    #: transfer used when a command gives no hint ("mqtt" falls back to HTTP range requests)
    chunk_size_bytes: int = 64 * 1024
    max_download_bps: float | None = None
    chunk_window: int = 16
    chunk_timeout_s: float = 5.0
    default_transfer: str = "mqtt"
    #: an install interrupted by a crash or restart is resumed this many times, then FAILED
    install_attempts_max: int = 3
    #: test hook: ``<point>:<n>`` kills the process there (see agent.crashpoint)
    crash_at: str | None = None
    #: local inference API: a TCP port on 127.0.0.1 and/or a Unix socket path (None = off)
    api_port: int | None = None
    api_socket: Path | None = None
    api_max_body_bytes: int = 32 * 1024 * 1024
    #: shadow mode: inputs waiting for the candidate; more are skipped (and counted)
    shadow_queue_max: int = 64

    def __post_init__(self) -> None:
        try:
            validate_device_id(self.device_id)
        except TopicError as exc:
            raise ConfigError(f"--device-id: {exc}") from exc
        positive = {
            "telemetry_window_s": self.telemetry_window_s,
            "heartbeat_s": self.heartbeat_s,
            "outbox_max_bytes": self.outbox_max_bytes,
            "outbox_max_age_s": self.outbox_max_age_s,
            "download_max_bytes": self.download_max_bytes,
            "download_timeout_s": self.download_timeout_s,
            "mqtt_keepalive_s": self.mqtt_keepalive_s,
            "chunk_timeout_s": self.chunk_timeout_s,
            "api_max_body_bytes": self.api_max_body_bytes,
        }
        if self.max_download_bps is not None:
            positive["max_download_bps"] = self.max_download_bps
        for name, value in positive.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number; got {value!r}")
        if self.health_inferences < 1:
            raise ConfigError(f"health_inferences must be >= 1; got {self.health_inferences}")
        if self.latency_budget_ms is not None and not (
            math.isfinite(self.latency_budget_ms) and self.latency_budget_ms > 0
        ):
            raise ConfigError(f"latency_budget_ms must be > 0; got {self.latency_budget_ms}")
        if not (math.isfinite(self.health_timeout_s) and self.health_timeout_s >= 0):
            raise ConfigError(f"health_timeout_s must be >= 0; got {self.health_timeout_s}")
        if not 0 < self.mqtt_port < 65536:
            raise ConfigError(f"mqtt_port must be 1..65535; got {self.mqtt_port}")
        if not 4096 <= self.chunk_size_bytes <= 1024 * 1024:
            raise ConfigError(
                f"chunk_size_bytes must be 4096..1048576; got {self.chunk_size_bytes}"
            )
        if not 1 <= self.chunk_window <= 64:
            raise ConfigError(f"chunk_window must be 1..64; got {self.chunk_window}")
        if self.default_transfer not in ("mqtt", "http"):
            raise ConfigError(
                f"default_transfer must be mqtt or http; got {self.default_transfer!r}"
            )
        if self.install_attempts_max < 1:
            raise ConfigError(f"install_attempts_max must be >= 1; got {self.install_attempts_max}")
        if self.api_port is not None and not 0 <= self.api_port < 65536:
            raise ConfigError(f"api_port must be 0..65535; got {self.api_port}")
        if self.shadow_queue_max < 1:
            raise ConfigError(f"shadow_queue_max must be >= 1; got {self.shadow_queue_max}")
        if len(self.tags) > _MAX_TAGS:
            raise ConfigError(f"{len(self.tags)} tags; at most {_MAX_TAGS}")
        for tag in self.tags:
            try:
                validate_device_id(tag)
            except TopicError as exc:
                raise ConfigError(f"--tag {tag!r}: use letters, digits, '.', '-', '_'") from exc
