"""Who is asking, and may they: basic auth, API tokens, sessions (form login or OIDC),
and three roles instead of Flower's one read-only switch.

Secrets come from the environment (named in queues.yaml), never from the file, and are
compared in constant time. Browsers sign in once and get a server-side session
(sessions.py) whose cookie is an opaque token; scripts send ``Authorization`` (Basic or
Bearer). The dashboard never answers 401 with a ``WWW-Authenticate: Basic`` challenge, so
a browser never caches basic credentials that a cross-site form could ride on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from fleet.config import Dashboard
from fleet.errors import FleetError

ROLES = ("viewer", "operator", "admin")
LEVEL = {role: i for i, role in enumerate(ROLES)}
SESSION_COOKIE = "fleet_session"


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
        self.load(settings, env)
        secret = self._env.get(settings.session_secret_env) if settings.session_secret_env \
            else None
        self.session_secret = secret or secrets.token_urlsafe(32)

    def load(self, settings: Dashboard, env: Mapping[str, str] | None = None) -> None:
        """Read the users, tokens and OIDC settings (again): a user removed or demoted
        here loses every session at its next request (``still_valid``)."""
        env = os.environ if env is None else env
        missing = []
        users: dict[str, tuple[str, str]] = {}
        for user in settings.users:
            password = env.get(user.password_env)
            if not password:
                missing.append(f"dashboard.users[{user.name}].password_env: "
                               f"${user.password_env} is not set")
                continue
            users[user.name] = (password, user.role)
        tokens: list[tuple[str, str, str]] = []
        for token in settings.tokens:
            value = env.get(token.token_env)
            if not value:
                missing.append(f"dashboard.tokens[{token.name}].token_env: "
                               f"${token.token_env} is not set")
                continue
            tokens.append((value, token.name, token.role))
        oidc_secret = None
        if settings.oidc and settings.oidc.client_secret_env:
            oidc_secret = env.get(settings.oidc.client_secret_env)
            if not oidc_secret:
                missing.append(f"dashboard.oidc.client_secret_env: "
                               f"${settings.oidc.client_secret_env} is not set")
        if missing:
            raise AuthConfigError("dashboard authentication is configured but its secrets "
                                  "are missing: " + "; ".join(missing))
        # All or nothing: a reload with a missing secret keeps the users it had.
        self._env = env
        self.users, self.tokens = users, tokens
        self.oidc, self.oidc_secret = settings.oidc, oidc_secret

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

    def basic(self, value: str) -> tuple[str, str] | None:
        """(name, password) from a Basic credential, or None when it is not one."""
        try:
            name, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return (name, password) if sep else None

    # -- sessions: still the same user, with the same role? -----------------------------

    def fingerprint(self, name: str, via: str, role: str) -> str | None:
        """What a session must still match: for a password user, the user's current
        password and role (a changed password or role ends the session); for single
        sign-on, the provider and a role it can still grant. None: no such user now."""
        if via == "password":
            found = self.users.get(name)
            if found is None or found[1] != role:
                return None
            material = f"password\0{name}\0{found[0]}\0{role}"
        elif via == "oidc":
            if self.oidc is None or role not in self._oidc_roles():
                return None
            material = f"oidc\0{self.oidc.issuer}\0{self.oidc.client_id}\0{name}\0{role}"
        else:
            return None
        return hmac.new(self.session_secret.encode(), material.encode(),
                        hashlib.sha256).hexdigest()

    def still_valid(self, name: str, via: str, role: str, fingerprint: str | None) -> bool:
        now = self.fingerprint(name, via, role)
        return bool(now and fingerprint and hmac.compare_digest(now, fingerprint))

    def _oidc_roles(self) -> set[str]:
        assert self.oidc is not None
        roles = set(self.oidc.roles.values())
        if self.oidc.default_role:
            roles.add(self.oidc.default_role)
        return roles

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
