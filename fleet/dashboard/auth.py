"""Who is asking, and may they: basic auth, API tokens, sessions (form login or OIDC),
and three roles instead of Flower's one read-only switch.

Secrets come from the environment (named in queues.yaml), never from the file, and are
compared in constant time. Browsers authenticate with a signed session cookie and send
its CSRF token with every POST; scripts send ``Authorization`` (Basic or Bearer). The
dashboard never answers 401 with a ``WWW-Authenticate: Basic`` challenge, so a browser
never caches basic credentials that a cross-site form could ride on.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from fleet.config import Dashboard
from fleet.errors import FleetError

ROLES = ("viewer", "operator", "admin")
LEVEL = {role: i for i, role in enumerate(ROLES)}
SESSION_COOKIE = "fleet_session"
SESSION_MAX_AGE = 12 * 3600


class AuthConfigError(FleetError):
    exit_code = 2


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    #: basic, token, session, or none (auth is off: loopback only)
    via: str
    csrf: str | None = None

    def may(self, role: str) -> bool:
        return LEVEL[self.role] >= LEVEL[role]


class Authenticator:
    def __init__(self, settings: Dashboard, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        missing = []
        self.users: dict[str, tuple[str, str]] = {}
        for user in settings.users:
            password = env.get(user.password_env)
            if not password:
                missing.append(f"dashboard.users[{user.name}].password_env: "
                               f"${user.password_env} is not set")
                continue
            self.users[user.name] = (password, user.role)
        self.tokens: list[tuple[str, str, str]] = []
        for token in settings.tokens:
            value = env.get(token.token_env)
            if not value:
                missing.append(f"dashboard.tokens[{token.name}].token_env: "
                               f"${token.token_env} is not set")
                continue
            self.tokens.append((value, token.name, token.role))
        self.oidc = settings.oidc
        self.oidc_secret = None
        if self.oidc and self.oidc.client_secret_env:
            self.oidc_secret = env.get(self.oidc.client_secret_env)
            if not self.oidc_secret:
                missing.append(f"dashboard.oidc.client_secret_env: "
                               f"${self.oidc.client_secret_env} is not set")
        if missing:
            raise AuthConfigError("dashboard authentication is configured but its secrets "
                                  "are missing: " + "; ".join(missing))
        secret = env.get(settings.session_secret_env) if settings.session_secret_env else None
        self.session_secret = secret or secrets.token_urlsafe(32)
        self._signer = URLSafeTimedSerializer(self.session_secret, salt="fleet-session")

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.tokens or self.oidc)

    # -- credentials -------------------------------------------------------------------

    def check_password(self, name: str, password: str) -> Principal | None:
        found = self.users.get(name)
        # Compare against something even for an unknown user: no timing oracle for names.
        expected, role = found or (secrets.token_hex(16), "viewer")
        if hmac.compare_digest(expected.encode(), password.encode()) and found:
            return Principal(name, role, "basic")
        return None

    def check_token(self, value: str) -> Principal | None:
        hit = None
        for token, name, role in self.tokens:
            if hmac.compare_digest(token.encode(), value.encode()):
                hit = Principal(name, role, "token")
        return hit

    def from_headers(self, authorization: str | None, cookie: str | None) -> Principal | None:
        if not self.enabled:
            return Principal("anonymous", "admin", "none")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                return self.check_token(value.strip())
            if scheme.lower() == "basic":
                try:
                    name, _, password = base64.b64decode(value).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return None
                return self.check_password(name, password)
            return None
        if cookie:
            return self.read_session(cookie)
        return None

    # -- sessions ----------------------------------------------------------------------

    def session(self, name: str, role: str) -> str:
        return self._signer.dumps({"n": name, "r": role, "c": secrets.token_urlsafe(16)})

    def read_session(self, cookie: str) -> Principal | None:
        try:
            data = self._signer.loads(cookie, max_age=SESSION_MAX_AGE)
        except BadSignature:
            return None
        if data.get("r") not in LEVEL:
            return None
        return Principal(data["n"], data["r"], "session", data.get("c"))

    def oidc_role(self, claims: Mapping) -> str | None:
        """The highest role any of the user's groups maps to, else the default."""
        assert self.oidc is not None
        groups = claims.get(self.oidc.groups_claim) or []
        if isinstance(groups, str):
            groups = [groups]
        roles = [self.oidc.roles[g] for g in groups if g in self.oidc.roles]
        if roles:
            return max(roles, key=LEVEL.__getitem__)
        return self.oidc.default_role


def is_loopback(address: str) -> bool:
    import ipaddress

    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
