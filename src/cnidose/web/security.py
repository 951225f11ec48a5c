"""Sign-in security: argon2 password hashes, signed session cookies carrying a CSRF token, and login
throttling (per user name and per client address)."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer

__all__ = ["Sessions", "Throttle", "hash_password", "verify_password"]

_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


class Sessions:
    """Session cookies: {user id, CSRF token}, signed and time-limited (default 8 h)."""

    cookie = "cnidose_session"

    def __init__(self, secret: str, max_age_s: int = 8 * 3600):
        self._s = URLSafeTimedSerializer(secret, salt="cnidose-session")
        self.max_age_s = max_age_s

    def issue(self, user_id: int) -> tuple[str, str]:
        """(cookie value, CSRF token) for a user who just signed in."""
        csrf = secrets.token_urlsafe(24)
        return self._s.dumps({"uid": user_id, "csrf": csrf}), csrf

    def read(self, value: str | None) -> dict[str, Any] | None:
        if not value:
            return None
        try:
            data = self._s.loads(value, max_age=self.max_age_s)
        except BadSignature:
            return None
        return data if isinstance(data, dict) and "uid" in data and "csrf" in data else None


@dataclass
class Throttle:
    """At most ``limit`` failed sign-ins per user name and per address within ``window_s``; then wait."""

    limit: int = 5
    window_s: float = 300.0
    _fails: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._fails.get(key, []) if now - t < self.window_s]
        self._fails[key] = times
        return times

    def blocked(self, *keys: str) -> float:
        """Seconds to wait (0 when not blocked)."""
        now = time.monotonic()
        with self._lock:
            waits = [self.window_s - (now - t[0]) for k in keys if len(t := self._recent(k, now)) >= self.limit]
        return max(waits, default=0.0)

    def fail(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def clear(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._fails.pop(k, None)
