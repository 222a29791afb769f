"""Device identity: enrollment, revocation, and the broker files that follow from them.

Enrolling a device creates its MQTT identity: user name = device id, a random password
returned once (the fleet keeps only Mosquitto's ``$7$`` PBKDF2 hash of it), and, on request,
a client certificate (CN = device id) from the fleet's own CA for mutual TLS. The device id
must be a safe identifier (`protocol.topics.validate_device_id`: no ``+``, ``#``, ``/``), or
the broker ACL ``pattern readwrite edgefleet/v1/%u/#`` could be widened by a name.

After every change the password file is rebuilt from this table (`sync_broker`) and
Mosquitto reloads on SIGHUP; a revoked device is disconnected by that reload.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict
from sqlmodel import Field, Session, SQLModel, select

from fleet.audit import record
from fleet.auth import Principal, authorize
from fleet.broker_config import (
    DEFAULT_SERVICE_USER,
    BrokerFiles,
    generate_password,
    mosquitto_hash,
    reload_broker,
    write_password_file,
)
from fleet.db import SessionDep
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.models import Device, UTCDateTime, utcnow
from protocol.errors import TopicError
from protocol.topics import validate_device_id

__all__ = [
    "CertificateAuthority",
    "DeviceIdentity",
    "EnrollRequest",
    "Enrollment",
    "enroll_device",
    "enroll_router",
    "revoke_device",
    "sync_broker",
]

log = logging.getLogger(__name__)

RESERVED_USERS = frozenset({DEFAULT_SERVICE_USER})
CERT_DAYS = 825


class DeviceIdentity(SQLModel, table=True):
    """A device's broker identity; ``revoked_at`` set means it may not connect."""

    __tablename__ = "device_identity"
    device_id: str = Field(primary_key=True, max_length=64)
    password_hash: str = Field(max_length=256)
    enrolled_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    enrolled_by: str = Field(max_length=64)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_by: str | None = Field(default=None, max_length=64)
    cert_serial: str | None = Field(default=None, max_length=64)


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: Annotated[str, Field(max_length=64)]
    profile: Annotated[str, Field(min_length=1, max_length=64)]
    tags: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=32)
    #: also issue a client certificate (mTLS) from the fleet's CA
    certificate: bool = False


class Enrollment(BaseModel):
    """What the device needs; the password (and key) are shown once and never stored."""

    device_id: str
    username: str
    password: str
    mqtt_host: str
    mqtt_port: int
    certificate_pem: str | None = None
    private_key_pem: str | None = None
    ca_pem: str | None = None


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """The fleet's CA (EC P-256), in ``<dir>/ca.key`` (0600) and ``<dir>/ca.pem``."""

    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "ca.key"

    def ensure(self) -> None:
        """Create the CA once."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        if self.cert_path.exists() and self.key_path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EdgeFleet device CA")])
        now = datetime.now(_dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(
            self.key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, common_name: str, *, server_names: tuple[str, ...] = (), days: int = CERT_DAYS
    ) -> tuple[bytes, bytes, str]:
        """A certificate for a device (client) or the broker (server); (cert, key, serial)."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.ensure()
        ca_key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(_dt.UTC)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names:
            alt: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, format(serial, "x")


def _write_private(path: Path, data: bytes) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# -- enrollment -----------------------------------------------------------------------------


def _check_identity(device_id: str) -> str:
    try:
        validate_device_id(device_id)
    except TopicError as exc:
        raise InvalidRequest(
            f"cannot enroll: {exc} (a broker identity may not contain '+', '#' or '/')"
        ) from None
    if device_id in RESERVED_USERS:
        raise InvalidRequest(f"{device_id!r} is reserved for the fleet's service account")
    return device_id


def sync_broker(session: Session, settings: Any) -> bool:
    """Rebuild the broker's password file from the identity table and reload Mosquitto.

    Does nothing (False) when the fleet does not manage a broker (no ``broker_dir``).
    """
    broker_dir = getattr(settings, "broker_dir", None)
    if broker_dir is None:
        return False
    files = BrokerFiles(directory=Path(broker_dir))
    rows = session.exec(select(DeviceIdentity).where(DeviceIdentity.revoked_at == None)).all()  # noqa: E711
    write_password_file(files, {r.device_id: r.password_hash for r in rows})
    pid_file = getattr(settings, "broker_pid_file", None) or files.pid_file
    return reload_broker(pid_file)


def enroll_device(
    session: Session, settings: Any, request: EnrollRequest, *, actor: str
) -> Enrollment:
    """Create (or re-issue) a device's identity; registers the device too. Commits."""
    device_id = _check_identity(request.device_id)
    for tag in request.tags:
        try:
            validate_device_id(tag)
        except TopicError as exc:
            raise InvalidRequest(f"tag {tag!r}: {exc}") from None
    device = session.get(Device, device_id)
    if device is not None and device.profile not in (None, request.profile):
        raise Conflict(f"device {device_id!r} is registered with profile {device.profile!r}")
    if device is None:
        device = Device(id=device_id, profile=request.profile, tags=sorted(set(request.tags)))
        session.add(device)
    else:
        device.profile = request.profile
        device.tags = sorted({*(device.tags or []), *request.tags})
        device.auto_registered = False
    password = generate_password()
    identity = session.get(DeviceIdentity, device_id)
    before = None
    if identity is None:
        identity = DeviceIdentity(
            device_id=device_id, password_hash=mosquitto_hash(password), enrolled_by=actor
        )
        session.add(identity)
    else:
        before = {
            "enrolled_at": identity.enrolled_at.isoformat(),
            "revoked": identity.revoked_at is not None,
        }
        identity.password_hash = mosquitto_hash(password)
        identity.enrolled_at, identity.enrolled_by = utcnow(), actor
        identity.revoked_at = identity.revoked_by = None
    out = Enrollment(
        device_id=device_id,
        username=device_id,
        password=password,
        mqtt_host=settings.mqtt_host,
        mqtt_port=settings.mqtt_port,
    )
    if request.certificate:
        broker_dir = getattr(settings, "broker_dir", None)
        if broker_dir is None:
            raise InvalidRequest("certificates need the fleet's broker_dir (it holds the CA)")
        ca = CertificateAuthority(Path(broker_dir) / "ca")
        cert, key, serial = ca.issue(device_id)
        identity.cert_serial = serial
        out = out.model_copy(
            update={
                "certificate_pem": cert.decode(),
                "private_key_pem": key.decode(),
                "ca_pem": ca.cert_path.read_text(),
            }
        )
    record(
        session,
        actor,
        "device.enroll",
        before=before,
        after={"profile": request.profile, "tags": device.tags, "certificate": request.certificate},
        target=device_id,
    )
    session.commit()
    sync_broker(session, settings)
    log.info("enrolled device %s (by %s)", device_id, actor)
    return out


def revoke_device(session: Session, settings: Any, device_id: str, *, actor: str) -> DeviceIdentity:
    """Revoke a device's identity: removed from the password file, broker reloaded. Commits."""
    identity = session.get(DeviceIdentity, device_id)
    if identity is None:
        raise NotFound(f"device {device_id!r} has no enrolled identity")
    if identity.revoked_at is None:
        identity.revoked_at, identity.revoked_by = utcnow(), actor
        record(
            session,
            actor,
            "device.revoke",
            before={"enrolled": True},
            after={"revoked": True},
            target=device_id,
        )
        session.commit()
    session.refresh(identity)
    sync_broker(session, settings)
    log.warning("revoked device %s (by %s)", device_id, actor)
    return identity


def write_credentials(path: Path, enrollment: Enrollment) -> None:
    """The agent's ``--credentials`` file: JSON {username, password}, mode 0600."""
    _write_private(
        path,
        json.dumps({"username": enrollment.username, "password": enrollment.password}).encode(),
    )


# -- routes (admin) -------------------------------------------------------------------------

enroll_router = APIRouter(prefix="/api/v1/devices")


class IdentityPublic(BaseModel):
    device_id: str
    enrolled_at: datetime
    enrolled_by: str
    revoked_at: datetime | None
    revoked_by: str | None
    cert_serial: str | None


@enroll_router.post("/enroll", response_model=Enrollment, status_code=201)
def post_enroll(
    body: EnrollRequest,
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(authorize)],
) -> Any:
    """Enroll a device (admin): its broker identity; the password is in this response only."""
    return enroll_device(session, request.app.state.settings, body, actor=principal.name)


@enroll_router.post("/{device_id}/revoke", response_model=IdentityPublic)
def post_revoke(
    device_id: str,
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, Depends(authorize)],
) -> Any:
    """Revoke a device's identity (admin); the broker drops it on reload."""
    row = revoke_device(session, request.app.state.settings, device_id, actor=principal.name)
    return IdentityPublic.model_validate(row, from_attributes=True)


@enroll_router.get("/{device_id}/identity", response_model=IdentityPublic)
def get_identity(device_id: str, session: SessionDep) -> Any:
    """A device's enrollment record (admin); never its password."""
    row = session.get(DeviceIdentity, device_id)
    if row is None:
        raise NotFound(f"device {device_id!r} has no enrolled identity")
    return IdentityPublic.model_validate(row, from_attributes=True)
