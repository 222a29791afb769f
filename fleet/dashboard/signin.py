"""Who is looking at the dashboard: the API's own bearer token, kept in an HttpOnly cookie.

The operator pastes a token (made with `edgefleet fleet token create`) on the sign-in page;
it is checked against the token table (`fleet.auth.authenticate`) and kept in a cookie the
page's JavaScript cannot read (HttpOnly), sent only to ``/ui`` on the same site
(SameSite=Strict). Every page and live update checks it again, so a revoked token sends the
operator back to sign-in at the next refresh. Buttons act through the real API with the same
token (`fleet.dashboard.forward`), so the API's roles and audit log apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, quote

from fastapi import Request
from sqlmodel import Session

from fleet.auth import Role, authenticate
from fleet.errors import FleetError

__all__ = [
    "COOKIE",
    "SignInRequired",
    "Viewer",
    "current_viewer",
    "login_url",
    "read_form",
    "safe_next",
    "token_of",
]

COOKIE: Final = "edgefleet_token"
#: a sign-in form larger than this is refused (a token is ~50 characters)
MAX_FORM_BYTES: Final = 8 * 1024


class SignInRequired(FleetError):
    """No valid token: pages redirect to sign-in, JSON answers 401 with where to go."""

    status_code = 401
    code = "unauthorized"


@dataclass(frozen=True, slots=True, kw_only=True)
class Viewer:
    """The signed-in person: the token's name and role."""

    name: str
    role: Role
    auth_enabled: bool = True

    @property
    def can_operate(self) -> bool:
        """Operators and admins see (and may press) the action buttons."""
        return self.role.rank >= Role.OPERATOR.rank


def token_of(request: Request) -> str | None:
    """The token from the dashboard cookie, if any."""
    token = request.cookies.get(COOKIE)
    return token or None


def current_viewer(request: Request, fleet_state: Any) -> Viewer:
    """The viewer for this request; raises `SignInRequired` when the token is missing or bad."""
    if not getattr(fleet_state.settings, "auth_enabled", True):
        return Viewer(name="auth-disabled", role=Role.ADMIN, auth_enabled=False)
    token = token_of(request)
    if token is None:
        raise SignInRequired("sign in with an API token to see the dashboard")
    with Session(fleet_state.engine) as session:
        principal = authenticate(session, token)
    if principal is None:
        raise SignInRequired("your token is unknown or was revoked; sign in again")
    return Viewer(name=principal.name, role=principal.role)


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (first value of each field); no multipart parser needed."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise SignInRequired("the sign-in form is too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items() if v}


def safe_next(value: str | None, base: str) -> str:
    """Where to go after sign-in: a dashboard path on this site, never another site."""
    ok = (
        value is not None
        and value.startswith(base + "/")
        and not value.startswith("//")
        and not any(c in value for c in "\\\r\n")
    )
    return value if ok and value else base + "/"


def login_url(base: str, next_path: str, reason: str = "") -> str:
    """The sign-in page's URL, remembering where the operator was going and why."""
    url = f"{base}/login?next={quote(next_path, safe='/')}"
    return url + (f"&why={quote(reason)}" if reason else "")
