"""Who may use the dashboard: login token, session cookies, CSRF token, response headers."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

__all__ = ["SECURITY_HEADERS", "Access"]

#: Sent with every response: scripts and styles only from the dashboard itself (no inline
#: script can run), no framing, no sniffing, no referrer.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)

#: The session cookie's name.
COOKIE = "flctl_session"

#: How long a login lasts.
SESSION_S = 12 * 3600.0


@dataclass
class Access:
    """The dashboard's secrets and rules, made once per process.

    Attributes:
        login_required: A visitor must log in with :attr:`token` first (any address but
            loopback).
        secure_cookies: Cookies only over TLS.
        allow_actions: Rollback, tag, cancel, evict and revoke are offered and performed.
        token: The login token, printed at start.
        csrf: The token every action must carry in ``X-CSRF-Token``.
    """

    login_required: bool
    secure_cookies: bool
    allow_actions: bool
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _sessions: dict[str, float] = field(default_factory=dict)

    def check_token(self, offered: str) -> bool:
        """Whether ``offered`` is the login token (in constant time)."""
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def check_csrf(self, offered: str) -> bool:
        """Whether ``offered`` is the CSRF token (in constant time)."""
        return bool(offered) and hmac.compare_digest(offered.encode(), self.csrf.encode())

    def new_session(self) -> str:
        """A new login session's id (the cookie's value)."""
        now = time.monotonic()
        for sid, expires in list(self._sessions.items()):
            if expires < now:
                del self._sessions[sid]
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = now + SESSION_S
        return sid

    def is_session(self, sid: str) -> bool:
        """Whether ``sid`` names a live login session."""
        expires = self._sessions.get(sid)
        return expires is not None and expires >= time.monotonic()

    def cookie(self, sid: str) -> str:
        """The ``Set-Cookie`` value for a session."""
        secure = "; Secure" if self.secure_cookies else ""
        return (
            f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(SESSION_S)}{secure}"
        )
