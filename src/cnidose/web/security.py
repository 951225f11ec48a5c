"""Sign-in security: argon2 password hashes (with a dummy hash, so an unknown user name costs what a known one
does), a progressive delay per account and per address that slows guessing without locking anyone out (a device
that signed in before is judged on its own failures: OWASP's device cookies), a bound on the hashing work that
sign-in attempts can cause, the client address behind trusted proxies only, request-rate limits (the ``limits``
library: moving windows in an in-memory storage whose entries expire), and the security headers of every response
(the ``secure`` library).

Sessions themselves live in the database (:meth:`cnidose.records.store.Store.open_session`), so every worker
shares them and logout, a password change or an administrator ends them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "AddressResolver",
    "Guard",
    "HashGate",
    "RateLimits",
    "hash_password",
    "needs_rehash",
    "security_headers",
    "verify_or_dummy",
    "verify_password",
]

#: argon2id with OWASP's first recommended setting (Password Storage Cheat Sheet: m = 47,104 KiB (46 MiB), t = 1,
#: p = 1): ~0.11 s of one core here, where argon2-cffi's default (64 MiB, t = 3, p = 4) took ~0.31 s of CPU on
#: both cores -- a flood of sign-ins through the hash gate then takes at most one core from the clinicians.
#: Hashes made with other parameters still verify and are upgraded at the user's next sign-in.
_HASHER = PasswordHasher(time_cost=1, memory_cost=47_104, parallelism=1)
_DUMMY = _HASHER.hash("cnidose: no such user")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """True when a stored hash was made with other parameters than today's (upgrade it at sign-in)."""
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def verify_or_dummy(stored_hash: str | None, password: str) -> bool:
    """Verify against ``stored_hash``, or against a dummy hash when there is none: the same work either way, so
    the answer's time does not tell whether the user name exists."""
    ok = verify_password(stored_hash or _DUMMY, password)
    return ok and stored_hash is not None


@dataclass
class _Count:
    n: int
    last: float


@dataclass
class Guard:
    """Failed sign-ins slow the next attempt, never block it for long.

    After ``free`` failures for a key (an account, or an address with its own, larger ``free``), each further
    attempt must wait ``2 ** (failures - free)`` seconds after the previous failure, at most ``cap`` seconds; a
    correct password is accepted as soon as the wait is over and clears the account's count. Counts are forgotten
    ``window_s`` after the last failure, and at most ``max_keys`` are kept (the oldest go first), so memory is
    bounded whatever is sent.
    """

    free_account: int = 3
    free_address: int = 20
    cap_s: float = 30.0
    window_s: float = 900.0
    max_keys: int = 20_000
    _counts: OrderedDict[str, _Count] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _get(self, key: str, now: float) -> _Count | None:
        c = self._counts.get(key)
        if c is not None and now - c.last > self.window_s:
            del self._counts[key]
            return None
        return c

    def _keys(self, account: str, address: str, device: str | None) -> list[tuple[str, int]]:
        # a known device (it signed in as this account before) is judged on its own failures only: an attacker's
        # failures for the account or from a shared address do not slow it
        if device is not None:
            return [(f"dev:{device}", self.free_account)]
        return [(f"user:{account}", self.free_account), (f"addr:{address}", self.free_address)]

    def wait(self, account: str, address: str, device: str | None = None) -> float:
        """Seconds before the next attempt is allowed (0: go ahead)."""
        now = time.monotonic()
        with self._lock:
            waits = []
            for key, free in self._keys(account, address, device):
                c = self._get(key, now)
                if c is not None and c.n >= free:
                    waits.append(c.last + min(2.0 ** (c.n - free), self.cap_s) - now)
            return max([0.0, *waits])

    def fail(self, account: str, address: str, device: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            for key, _ in self._keys(account, address, device):
                c = self._get(key, now)
                if c is None:
                    self._counts[key] = _Count(1, now)
                else:
                    c.n, c.last = c.n + 1, now
                    self._counts.move_to_end(key)
            while len(self._counts) > self.max_keys:
                self._counts.popitem(last=False)

    def succeed(self, account: str, device: str | None = None) -> None:
        """A correct password clears the count it was judged on: the device's, or the account's (a sign-in from a
        known device leaves an attacker's count for the account as it is)."""
        with self._lock:
            self._counts.pop(f"dev:{device}" if device is not None else f"user:{account}", None)

    def __len__(self) -> int:
        return len(self._counts)


class HashGate:
    """Bounds the password hashing that sign-in attempts can cause: at most ``general`` hashes at a time for
    attempts from unknown devices and ``reserved`` more that only known devices may use (a flood of guesses from
    anywhere cannot take every slot from the users), each argon2 hash costing ~0.25 s of CPU and 64 MiB. Attempts
    wait for a slot without holding a thread, at most ``queue`` of them and for at most ``wait_s`` seconds; beyond
    that the server answers "busy" (503) at once."""

    def __init__(self, general: int = 1, reserved: int = 1, queue: int = 64, wait_s: float = 20.0):
        self._general = threading.BoundedSemaphore(general)
        self._reserved = threading.BoundedSemaphore(reserved)
        self.queue, self.wait_s = queue, wait_s
        self._waiting = 0
        self._lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def slot(self, known_device: bool) -> AsyncIterator[bool]:
        """``async with gate.slot(known) as got:`` -- ``got`` is False when no slot came in time (answer busy)."""
        pools = (self._reserved, self._general) if known_device else (self._general,)
        with self._lock:
            if self._waiting >= self.queue:
                yield False
                return
            self._waiting += 1
        held = None
        try:
            deadline = time.monotonic() + self.wait_s
            while held is None and time.monotonic() < deadline:
                held = next((p for p in pools if p.acquire(blocking=False)), None)
                if held is None:
                    await asyncio.sleep(0.02)  # polling keeps the gate free of any one event loop
        finally:
            with self._lock:
                self._waiting -= 1
        if held is None:
            yield False
            return
        try:
            yield True
        finally:
            held.release()


class AddressResolver:
    """The client's address: the peer's, unless the peer is a configured trusted proxy, in which case the
    right-most address of ``X-Forwarded-For`` that is not itself a trusted proxy. ``X-Forwarded-For`` from anyone
    else is ignored (so rotating it gains nothing)."""

    def __init__(self, trusted: str | Iterable[str] | None = None):
        items = trusted.split(",") if isinstance(trusted, str) else list(trusted or [])
        self.networks = [ipaddress.ip_network(x.strip(), strict=False) for x in items if x.strip()]

    def _trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def __call__(self, peer: str | None, forwarded_for: str | None) -> str:
        addr = peer or "unknown"
        if not self.networks or not self._trusted(addr) or not forwarded_for:
            return addr[:64]
        for hop in reversed([h.strip() for h in forwarded_for.split(",")][-16:]):
            if hop and not self._trusted(hop):
                return hop[:64]
        return addr[:64]


class RateLimits:
    """Request-rate limits per address (and overall) with the ``limits`` library: moving windows in its
    in-memory storage, whose keys expire with their window."""

    def __init__(self, rules: dict[str, str]):
        from limits import parse_many
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._rules = {name: parse_many(spec) for name, spec in rules.items()}

    def hit(self, name: str, *keys: str) -> float:
        """Count one request against the rule ``name`` for ``keys``; seconds to wait when a limit is reached."""
        waits = []
        for item in self._rules[name]:
            if not self._limiter.hit(item, name, *keys):
                reset, _ = self._limiter.get_window_stats(item, name, *keys)
                waits.append(max(1.0, reset - time.time()))
        return max([0.0, *waits])


def security_headers(*, https: bool) -> Any:
    """Every response's security headers: a CSP with no inline scripts (styles may be inline: Plotly and htmx
    set them), no framing, no MIME sniffing, no referrer, no powerful features; HSTS when served over HTTPS."""
    import secure

    csp = (secure.ContentSecurityPolicy().default_src("'self'").script_src("'self'")
           .style_src("'self'", "'unsafe-inline'").img_src("'self'", "data:").font_src("'self'")
           .connect_src("'self'").object_src("'none'").base_uri("'self'").form_action("'self'")
           .frame_ancestors("'none'"))
    return secure.Secure(
        csp=csp, xfo=secure.XFrameOptions().deny(), xcto=secure.XContentTypeOptions().nosniff(),
        referrer=secure.ReferrerPolicy().no_referrer(),
        permissions=secure.PermissionsPolicy().geolocation().camera().microphone(),
        hsts=secure.StrictTransportSecurity().max_age(31_536_000) if https else None)
