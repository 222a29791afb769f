"""The fleet service's settings: environment (``EDGEFLEET_FLEET_*``) or keyword arguments.

Built once at the entry point (`fleet.cli` or the caller of `fleet.app.create_app`), frozen,
and passed down. Nothing here opens a file or a connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.errors import TopicError
from protocol.limits import MAX_BUNDLE_BYTES
from protocol.topics import validate_device_id

__all__ = ["FleetSettings"]

_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


class FleetSettings(BaseSettings):
    """Everything the fleet process needs; limits carry their unit in the name."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FLEET_", frozen=True, extra="forbid")

    #: ``sqlite:///path.db`` or ``postgresql+psycopg://user:pw@host/db``
    database_url: str = "sqlite:///./fleet.db"

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    #: the ``$share/<group>/...`` group: every fleet process of one fleet uses the same one
    mqtt_share_group: str = "fleet"
    #: None: ``edgefleet-fleet-<host>-<http_port>``, stable across restarts, so a restarted
    #: process resumes its broker session and gets the messages queued while it was down
    mqtt_client_id: str | None = None
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    #: how long the broker keeps this process's session (and queues its messages) after a
    #: crash; a clean shutdown ends the session at once
    mqtt_session_expiry_s: int = Field(default=300, ge=0, le=86400)
    #: QoS 1 messages the broker may send this process before it acknowledges them (MQTT 5
    #: Receive Maximum). Messages are acknowledged after their batch commits, so this caps a
    #: batch: Mosquitto's own default is 20 unacknowledged messages per client
    mqtt_receive_maximum: int = Field(default=2000, ge=1, le=65535)
    #: how long `publish_command` waits for the broker's PUBACK
    publish_timeout_s: float = Field(default=5.0, gt=0.0, le=120.0)

    #: the trust root bundles are verified against (required)
    trust_root: Path
    #: where uploaded bundles live, as ``<sha256>.efb``
    bundle_dir: Path = Path("./bundles")

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=1, le=65535)
    #: base URL devices use to reach this service (``bundle_url`` in deploy commands);
    #: defaults to ``http://<http_host>:<http_port>`` (127.0.0.1 for a wildcard host)
    public_url: str = ""

    #: a device not heard from for this long is shown offline
    offline_after_s: float = Field(default=180.0, gt=0.0)
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1, le=MAX_BUNDLE_BYTES)

    #: bearer tokens with roles on the REST API (docs/security.md); turn off for local
    #: experiments only (EDGEFLEET_FLEET_AUTH_ENABLED=false): the fleet logs a loud warning
    auth_enabled: bool = True
    #: the broker directory written by `edgefleet fleet broker-config` (passwd, acl, CA);
    #: when set, enrolling or revoking a device rewrites the password file and reloads
    broker_dir: Path | None = None
    #: Mosquitto's pid file (SIGHUP reloads it); default ``<broker_dir>/mosquitto.pid``
    broker_pid_file: Path | None = None

    #: bounded queue between the MQTT thread and the DB writer, and the writer's batch size
    ingest_queue_max: int = Field(default=10_000, ge=1)
    ingest_batch_max: int = Field(default=500, ge=1, le=100_000)
    #: a batch waits up to this long for more messages (fewer commits under load)
    ingest_linger_ms: float = Field(default=20.0, ge=0.0, le=1000.0)

    #: rollouts: how often each process steps active rollouts, and how long a process's
    #: claim on a rollout (and on outbox rows it is sending) lasts without renewal
    rollout_tick_s: float = Field(default=1.0, gt=0.0, le=3600.0)
    rollout_lease_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    #: commands published at once (each waits for its PUBACK)
    rollout_publish_concurrency: int = Field(default=16, ge=1, le=256)
    #: run the rollout loop in this process (every fleet process may; leases share the work)
    rollout_loop: bool = True
    #: re-send a device its desired bundle at most this often (0 = never), this many times
    reconcile_interval_s: float = Field(default=300.0, ge=0.0)
    reconcile_max_attempts: int = Field(default=3, ge=1, le=1000)
    #: service-level objectives for /metrics burn rates, over the last slo_window_s
    slo_success_rate: float = Field(default=0.999, gt=0.0, lt=1.0)
    slo_latency_p95_ms: float = Field(default=100.0, gt=0.0)
    slo_window_s: float = Field(default=300.0, gt=0.0)
    #: tests only: SIGKILL this process at the Nth rollout checkpoint (see fleet.rollout.crash)
    crash_at_checkpoint: int | None = Field(default=None, ge=1)

    @field_validator("database_url")
    @classmethod
    def _database_url_ok(cls, v: str) -> str:
        v = v.strip()
        # psycopg (3) is the driver we ship; a bare postgresql:// would pick psycopg2.
        for bare in ("postgresql://", "postgres://"):
            if v.startswith(bare):
                return "postgresql+psycopg://" + v[len(bare) :]
        if not (v.startswith("sqlite://") or v.startswith("postgresql+psycopg://")):
            raise ValueError(
                f"database_url {v!r} is not supported; use sqlite:///path/to/fleet.db or "
                "postgresql+psycopg://user:password@host/dbname"
            )
        return v

    @field_validator("mqtt_share_group")
    @classmethod
    def _share_group_ok(cls, v: str) -> str:
        try:
            return validate_device_id(v)
        except TopicError as exc:
            raise ValueError(f"mqtt_share_group: {exc}") from None

    @field_validator("public_url")
    @classmethod
    def _public_url_ok(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if v and not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError(f"public_url {v!r} must start with http:// or https://")
        return v

    @model_validator(mode="after")
    def _default_public_url(self) -> Self:
        if not self.public_url:
            host = "127.0.0.1" if self.http_host in _WILDCARD_HOSTS else self.http_host
            if ":" in host:  # IPv6 literal
                host = f"[{host}]"
            # frozen model: set through the object, once, during validation
            object.__setattr__(self, "public_url", f"http://{host}:{self.http_port}")
        return self

    def bundle_url(self, sha256: str) -> str:
        """The absolute download URL of one bundle, as put into deploy commands."""
        return f"{self.public_url}/api/v1/bundles/{sha256}/download"
