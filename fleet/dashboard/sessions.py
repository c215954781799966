"""Browser sessions kept on the server, in the dashboard's database.

A signed cookie that carries the role cannot be taken back: a user removed from
queues.yaml, demoted, or signed out would keep whatever the cookie says until it
expires, and the cookie would show the role and the CSRF secret to anyone who reads it.
So the cookie holds only a random token, and every request looks the session up: sign-out
deletes it, and the authenticator re-checks the user and role it names each time
(``Authenticator.still_valid``). In the database it is stored under a keyed hash of the
token, so reading the table (a backup, a shared PostgreSQL) signs no one in. Dashboards
sharing one database share their sessions (several replicas behind one ingress).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from fleet.dashboard.store import sessions

#: A session ends this long after sign-in, or after this long without a request.
MAX_AGE = 12 * 3600.0
IDLE = 2 * 3600.0
#: ``seen`` is written at most this often per session (not one write per request).
TOUCH_EVERY = 60.0


@dataclass(frozen=True)
class Session:
    key: str
    user: str
    role: str
    #: "password" (form sign-in) or "oidc"
    via: str
    fingerprint: str | None
    csrf: str
    created: float
    seen: float


class SessionStore:
    def __init__(self, engine: Engine, secret: str):
        self.engine = engine
        self._secret = secret.encode()

    def _key(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def create(self, user: str, role: str, via: str, fingerprint: str | None,
               address: str | None = None, now: float | None = None) -> str:
        """A new session; returns the cookie's token (shown once, stored only hashed)."""
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            # Expired sessions go at each sign-in: the table stays as small as the users.
            conn.execute(delete(sessions).where(
                (sessions.c.created < now - MAX_AGE) | (sessions.c.seen < now - IDLE)))
            conn.execute(sessions.insert(), {
                "id": self._key(token), "user": user[:255], "role": role, "via": via,
                "fingerprint": fingerprint, "csrf": secrets.token_urlsafe(24),
                "address": (address or "")[:64], "created": now, "seen": now})
        return token

    def get(self, token: str, now: float | None = None) -> Session | None:
        """The live session for a cookie's token, or None (unknown, expired, idle)."""
        if not token or len(token) > 200:
            return None
        now = time.time() if now is None else now
        key = self._key(token)
        with self.engine.connect() as conn:
            row = conn.execute(select(sessions).where(sessions.c.id == key)).first()
        if row is None:
            return None
        if row.created < now - MAX_AGE or row.seen < now - IDLE:
            self.revoke(token)
            return None
        if row.seen < now - TOUCH_EVERY:
            with self.engine.begin() as conn:
                conn.execute(update(sessions).where(sessions.c.id == key).values(seen=now))
        return Session(key, row.user, row.role, row.via, row.fingerprint, row.csrf,
                       row.created, row.seen)

    def revoke(self, token: str) -> None:
        self.revoke_key(self._key(token))

    def revoke_key(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.id == key))

    def count(self, user: str | None = None) -> int:
        query = select(sessions.c.id)
        if user is not None:
            query = query.where(sessions.c.user == user)
        with self.engine.connect() as conn:
            return len(conn.execute(query).all())
