"""API authentication and roles: bearer tokens, stored hashed, checked once per request.

Roles are ordered: ``viewer`` (read) < ``operator`` (deploy, roll out, roll back) <
``admin`` (devices' identities, keys and trust roots, tokens). No route says what it needs:
`authorize` is one dependency on the routers and maps (method, route) to a role with
`required_role`, so a new route is protected the day it is written (GET: viewer; any other
method: operator; the admin prefixes: admin).

Tokens are ``eft_`` + 256 random bits. The database keeps only their sha256: a token that
random cannot be guessed from its hash, so a slow salted hash (bcrypt, PBKDF2) would add
cost per request and nothing else; lookups go through a unique index on the hash.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request
from pydantic import StringConstraints
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from fleet.db import SessionDep
from fleet.errors import Conflict, FleetError, NotFound
from fleet.models import UTCDateTime, utcnow

__all__ = [
    "ADMIN_ROUTES",
    "OPEN_ROUTES",
    "ApiToken",
    "Forbidden",
    "Principal",
    "Role",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "Unauthorized",
    "actor_of",
    "authenticate",
    "authorize",
    "create_token",
    "hash_token",
    "required_role",
    "tokens_router",
]

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "eft_"
_BEARER = re.compile(r"Bearer\s+(\S+)\s*", re.IGNORECASE)


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}

#: route templates (prefix match) that need admin for every method
ADMIN_ROUTES: Final = (
    "/api/v1/tokens",
    "/api/v1/devices/enroll",
    "/api/v1/devices/{device_id}/revoke",
    "/api/v1/devices/{device_id}/identity",
    "/api/v1/trust-root",
    "/api/v1/keys",
    "/api/v1/audit",
)
#: no token needed: liveness for load balancers and Prometheus scraping (counts only; no
#: device ids or bundle contents) - keep the port on a private network
OPEN_ROUTES: Final = frozenset({"/healthz", "/metrics"})
#: admin routes a viewer may still read (the trust root is public information)
_READABLE_ADMIN: Final = ("/api/v1/trust-root",)
_READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class Unauthorized(FleetError):
    status_code = 401
    code = "unauthorized"


class Forbidden(FleetError):
    status_code = 403
    code = "forbidden"


def required_role(method: str, route: str) -> Role:
    """Pure: the role a request needs, from its method and route template."""
    method = method.upper()
    for prefix in ADMIN_ROUTES:
        if route == prefix or route.startswith(prefix + "/"):
            if method in _READ_METHODS and route.startswith(_READABLE_ADMIN):
                return Role.VIEWER
            return Role.ADMIN
    return Role.VIEWER if method in _READ_METHODS else Role.OPERATOR


# -- storage ------------------------------------------------------------------------------


class ApiToken(SQLModel, table=True):
    """An API token: its name (the audit log's "who"), role, and sha256 (never the token)."""

    __tablename__ = "api_token"
    id: str = Field(primary_key=True, max_length=16)
    name: str = Field(max_length=64, unique=True)
    role: str = Field(max_length=16)
    token_sha256: str = Field(max_length=64, unique=True, sa_type=String(64))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str = Field(max_length=64)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


TokenName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
]


class TokenCreate(SQLModel):
    name: TokenName
    role: Role


class TokenPublic(SQLModel):
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    #: shown once; only its hash is kept
    token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who is calling: the token's name and role."""

    name: str
    role: Role
    token_id: str | None = None


def hash_token(token: str) -> str:
    """sha256 hex of the token (see the module docstring for why no salt or stretching)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    session: Session, *, name: str, role: Role | str, created_by: str
) -> tuple[ApiToken, str]:
    """Store a new token's hash; returns (row, the token itself, to show once). Commits."""
    role = Role(role)
    TokenCreate(name=name, role=role)  # validates the name
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=secrets.token_hex(8),
        name=name,
        role=role.value,
        token_sha256=hash_token(token),
        created_by=created_by,
    )
    from fleet.audit import record

    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a token named {name!r} exists; pick another name") from None
    record(
        session,
        created_by,
        "token.create",
        after={"id": row.id, "name": name, "role": role.value},
        target=name,
    )
    session.commit()
    session.refresh(row)
    return row, token


def authenticate(session: Session, token: str) -> Principal | None:
    """The principal for a token, or None if unknown or revoked."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.exec(select(ApiToken).where(ApiToken.token_sha256 == hash_token(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(name=row.name, role=Role(row.role), token_id=row.id)


# -- the dependency -----------------------------------------------------------------------

_DISABLED = Principal(name="auth-disabled", role=Role.ADMIN)
_OPEN = Principal(name="anonymous", role=Role.VIEWER)


def _route_template(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else request.url.path


def authorize(request: Request) -> Principal:
    """App dependency: authenticate the bearer token and check the route's role."""
    settings = request.app.state.settings
    if _route_template(request) in OPEN_ROUTES:
        return _OPEN
    if not getattr(settings, "auth_enabled", True):
        request.state.principal = _DISABLED
        return _DISABLED
    header = request.headers.get("authorization", "")
    match = _BEARER.fullmatch(header)
    if match is None:
        raise Unauthorized(
            "this API needs 'Authorization: Bearer <token>' (make one with "
            "`edgefleet fleet token create`; clients read EDGEFLEET_TOKEN)"
        )
    engine: Engine = request.app.state.engine
    with Session(engine) as session:
        principal = authenticate(session, match.group(1))
    if principal is None:
        raise Unauthorized("the bearer token is unknown or revoked")
    need = required_role(request.method, _route_template(request))
    if principal.role.rank < need.rank:
        raise Forbidden(
            f"{request.method} {_route_template(request)} needs role {need.value}; "
            f"token {principal.name!r} has {principal.role.value}",
            extra={"required_role": need.value},
        )
    request.state.principal = principal
    return principal


def actor_of(request: Request) -> str:
    """The audit log's "who" for this request (the token's name)."""
    principal = getattr(request.state, "principal", None)
    return principal.name if isinstance(principal, Principal) else "unknown"


PrincipalDep = Annotated[Principal, Depends(authorize)]

# -- routes (admin) -----------------------------------------------------------------------

tokens_router = APIRouter(prefix="/api/v1/tokens")


@tokens_router.post("", response_model=TokenCreated, status_code=201)
def post_token(body: TokenCreate, session: SessionDep, principal: PrincipalDep) -> Any:
    """Create a token (admin); the token is in the response once and never again."""
    row, token = create_token(session, name=body.name, role=body.role, created_by=principal.name)
    return TokenCreated(
        **TokenPublic.model_validate(row, from_attributes=True).model_dump(), token=token
    )


@tokens_router.get("", response_model=list[TokenPublic])
def get_tokens(session: SessionDep) -> Any:
    """Every token's name, role and state (admin); never the tokens."""
    return session.exec(select(ApiToken).order_by(col(ApiToken.created_at))).all()


@tokens_router.delete("/{token_id}", response_model=TokenPublic)
def delete_token(token_id: str, session: SessionDep, principal: PrincipalDep) -> Any:
    """Revoke a token (admin); it stops working at once."""
    from fleet.audit import record

    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no token with id {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record(
            session,
            principal.name,
            "token.revoke",
            before={"id": row.id, "name": row.name, "role": row.role},
            target=row.name,
        )
        session.commit()
        session.refresh(row)
    return row
