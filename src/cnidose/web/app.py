"""The clinician web app: FastAPI app factory, server-rendered pages and the JSON API under ``/api/v1``.

Every page and API call goes through :class:`cnidose.records.store.Store`, so role checks and the audit trail
are the same for both. Sessions are held in the database (the cookie carries a random token, the database its
SHA-256), so every worker shares them and logout, a password change or an administrator ends them at once;
they time out when idle and at an absolute limit. Each session has a CSRF token that every state-changing form
(hidden field ``csrf``) and API call (header ``X-CSRF-Token``) must echo; anonymous forms (sign-in, the public
booking request) use a double-submit cookie. Failed sign-ins slow further attempts per account and per address
(never a lockout), the address being the peer's unless it is a configured trusted proxy; an unknown user name
costs the same hash as a known one; sign-in and the public booking request are rate-limited. Every response
carries the security headers (CSP without inline scripts, no framing, nosniff, no referrer) and patient data
``Cache-Control: no-store``; bodies are limited to 1 MB (a FHIR bundle 10 MB) and every field to the length in
:data:`MAX`, the same for forms and API; dates outside 1900-2100 are a 422 naming the field. Times typed into
forms are read in the app's time zone (``CNIDOSE_TIMEZONE``, default UTC) and stored in UTC. JavaScript and CSS
are served by the app itself (Plotly from the installed ``plotly`` package, htmx from ``django-js-lib-htmx``);
nothing is fetched from elsewhere. The patient page's forms carry htmx attributes (the page's main region is
swapped in place) and work as plain forms without JavaScript. Page messages come from the server's own state,
never from the query string.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from cnidose import __version__
from cnidose.clinical.record import department_for, indications, lab_units, resolve_indication
from cnidose.errors import CnidoseError, InputError
from cnidose.records.plausibility import NeedsConfirmation
from cnidose.records.store import ENTRY_TABLES, PUBLIC, YEARS, AccessDenied, Actor, NotFound, SlotTaken, Store
from cnidose.records.units import FieldError, covariate_text
from cnidose.web.security import (
    AddressResolver,
    Guard,
    HashGate,
    RateLimits,
    hash_password,
    needs_rehash,
    security_headers,
    verify_or_dummy,
    verify_password,
)
from cnidose.web.services import analyse, clinical_assessment, model_choice, trends

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
ANON_CSRF = "cnidose_csrf"
DEPARTMENT = "dermatology"  # the department that takes consultation requests
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]  # database ids: a larger one is a 422, not a crash


_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _iso_string(pattern: re.Pattern[str], what: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, (dt.date, dt.datetime)) or (isinstance(v, str) and pattern.match(v)):
            return v
        raise ValueError(f"expected an ISO 8601 {what} (numbers and timestamps are not read as times)")
    return check


def _in_years(v: Any) -> Any:
    if not YEARS[0] <= v.year <= YEARS[1]:
        raise ValueError(f"outside the years {YEARS[0]}-{YEARS[1]}")
    return v


#: a date-time in the API: ISO 8601 text only, years 1900-2100 (a 422 naming the field otherwise, never a crash)
When = Annotated[dt.datetime, BeforeValidator(_iso_string(_ISO_DATETIME, "date-time such as 2026-11-24T08:00:00Z")),
                 AfterValidator(_in_years)]
Day = Annotated[dt.date, BeforeValidator(_iso_string(_ISO_DATE, "date such as 2026-11-24")), AfterValidator(_in_years)]


#: field lengths shared by the API's schemas and the forms (one place: the forms refuse what the API refuses)
MAX = {"username": 64, "password": 1024, "reason": 2000, "contact_name": 128, "contact_email": 254,
       "decision": 10_000, "text": 64, "number": 32, "time": 40, "source": 500, "note": 2000}
#: the largest request body accepted (bytes); a FHIR bundle may be larger
MAX_BODY = 1_000_000
MAX_BODY_FHIR = 10_000_000
SESSION_COOKIE = "cnidose_session"
#: a browser or client that signed in before: its failed sign-ins count against itself only (OWASP device cookies)
DEVICE_COOKIE = "cnidose_device"
DEVICE_AGE = dt.timedelta(days=180)
#: the least time a checked sign-in takes (s): above the hash's own ~0.11 s and an older hash's ~0.3 s
SIGN_IN_FLOOR_S = 0.35
UTC_ZONE = ZoneInfo("UTC")


class LevelIn(BaseModel):
    value: float
    unit: str = Field(default="ng/mL", max_length=MAX["text"])
    observed_at: When
    blq: bool = False
    lloq: float | None = None
    assay: str | None = Field(default=None, max_length=32)
    sample: str = Field(default="trough", pattern="^(trough|c2|other)$")
    matrix: str = Field(default="whole blood", max_length=32)
    confirm: bool = Field(default=False, description="store despite the plausibility flags of a 409 answer")


class DoseIn(BaseModel):
    amount: float
    unit: str = Field(default="mg", max_length=MAX["text"])
    given_at: When
    product: str = Field(default="Prograf", max_length=64)
    route: str = Field(default="oral", max_length=MAX["text"])
    infusion_h: float | None = None
    confirm: bool = Field(default=False, description="store despite the plausibility flags of a 409 answer")


class RegimenIn(BaseModel):
    product: str = Field(max_length=64)
    dose: float
    unit: str = Field(default="mg", max_length=MAX["text"])
    interval_h: float
    start_at: When
    route: str = Field(default="oral", max_length=MAX["text"])
    confirm: bool = False


class MedicationIn(BaseModel):
    name: str = Field(max_length=64)
    start_on: Day
    stop_on: Day | None = None
    daily_mg: float | None = None


class StopIn(BaseModel):
    stop_on: Day


class BloodPressureIn(BaseModel):
    systolic: float
    diastolic: float
    observed_at: When


class CovariateIn(BaseModel):
    name: str = Field(max_length=32)
    value: float
    unit: str = Field(max_length=16)
    measured_at: When


class GenotypeIn(BaseModel):
    gene: str = Field(max_length=16)
    result: str = Field(max_length=64)
    source: str = Field(max_length=500)
    tested_on: Day | None = None


class WithdrawIn(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


class PatientUpdate(BaseModel):
    region: str | None = Field(default=None, pattern="^(EU|US)$")
    indication: str | None = Field(default=None, max_length=64)
    severity: str | None = Field(default=None, max_length=64)
    product: str | None = Field(default=None, max_length=64)
    route: str | None = Field(default=None, max_length=16)
    strength_percent: float | None = None
    donor_type: str | None = Field(default=None, pattern="^(deceased|living)$")
    donor_cyp3a5: str | None = Field(default=None, max_length=32)
    transplant_date: Day | None = None
    therapy_start: Day | None = None
    conditions: list[Annotated[str, Field(max_length=MAX["text"])]] | None = Field(default=None, max_length=50)


class LabIn(BaseModel):
    name: str = Field(max_length=64)
    value: float
    unit: str = Field(max_length=MAX["text"])
    observed_at: When


class SignIn(BaseModel):
    """Sign with ``candidate`` (the index of a row of the recommendation's candidate table: the regimen signed,
    written out as the decision, ``decision`` appended as a note) or with a free-text ``decision``."""

    decision: str = Field("", max_length=MAX["decision"])
    candidate: int | None = Field(None, ge=0, le=10_000)


class BookingIn(BaseModel):
    starts_at: When
    minutes: int = Field(default=30, ge=15, le=240, multiple_of=15)
    reason: str | None = Field(default=None, max_length=MAX["reason"])
    contact_name: str | None = Field(default=None, max_length=MAX["contact_name"])
    contact_email: str | None = Field(default=None, max_length=MAX["contact_email"])
    patient_id: int | None = Field(default=None, ge=1, le=2**31 - 1)


class LoginIn(BaseModel):
    username: str = Field(max_length=MAX["username"])
    password: str = Field(max_length=MAX["password"])


class PasswordIn(BaseModel):
    current: str = Field(max_length=MAX["password"])
    new: str = Field(min_length=10, max_length=MAX["password"])


def _vendor_file(package: str, *parts: str) -> Path | None:
    """A file shipped inside an installed package (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).resolve().parent.joinpath(*parts)
    return p if p.exists() else None


# Third-party JavaScript, served from the installed Python packages: Plotly from ``plotly``; htmx 2 (0BSD)
# from ``django-js-lib-htmx``, a package of htmx's static files only (its Django app module is never imported).
# Both are optional at run time: without them the charts are off and the forms post and reload as plain HTML.
VENDOR = {"plotly.min.js": ("plotly", "package_data", "plotly.min.js"),
          "htmx.min.js": ("js_lib_htmx", "static", "htmx", "htmx.min.js")}


def create_app(store: Store, *, secret_key: str | None = None, timezone: str | None = None,
               today: Callable[[], dt.date] | None = None, secure_cookies: bool | None = None,
               trusted_proxies: str | None = None, session_idle_min: float | None = None,
               session_hours: float | None = None, rate_limits: dict[str, str] | None = None) -> FastAPI:
    """The app over ``store``; ``today`` fixes the clinical date (tests, demos).

    Sessions live in the database (shared by every worker, ended by logout, a password change or an
    administrator) with idle and absolute timeouts (``CNIDOSE_SESSION_IDLE_MIN``, default 30;
    ``CNIDOSE_SESSION_HOURS``, default 8). ``secure_cookies`` (``CNIDOSE_SECURE_COOKIES``; ``cnidose serve`` turns
    it on outside loopback) marks the cookies Secure, as any request over HTTPS does. ``trusted_proxies``
    (``CNIDOSE_TRUSTED_PROXIES``: addresses or networks, comma-separated) are the only peers whose
    X-Forwarded-For is read. ``secret_key`` is no longer used (sessions are not signed cookies)."""
    del secret_key
    # no Swagger/ReDoc pages: they load their scripts from a CDN; the schema is at /api/v1/openapi.json
    app = FastAPI(title="cnidose", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/v1/openapi.json")
    env = os.environ
    secure_flag = secure_cookies if secure_cookies is not None else env.get("CNIDOSE_SECURE_COOKIES", "0") == "1"
    idle = dt.timedelta(minutes=session_idle_min or float(env.get("CNIDOSE_SESSION_IDLE_MIN", "30")))
    absolute = dt.timedelta(hours=session_hours or float(env.get("CNIDOSE_SESSION_HOURS", "8")))
    client_address = AddressResolver(trusted_proxies if trusted_proxies is not None
                                     else env.get("CNIDOSE_TRUSTED_PROXIES", ""))
    guard = Guard()
    gate = HashGate()
    limits = RateLimits({
        "login": "60/minute",  # sign-in attempts per address (before any hash is computed)
        "login-device": "30/minute",  # sign-in attempts per known device (these are not counted per address)
        "booking": "5/hour;20/day",  # anonymous booking requests per address
        "booking-all": "300/day",  # anonymous booking requests, all addresses together
        **(rate_limits or {})})
    noted: OrderedDict[tuple[str, str], float] = OrderedDict()  # (kind, address) -> when its last audit row was
    headers_normal = dict(security_headers(https=secure_flag).headers)
    tz = ZoneInfo(timezone or os.environ.get("CNIDOSE_TIMEZONE", "UTC"))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["MAX"] = MAX  # the forms' maxlength: the same limits as the server's
    templates.env.globals["STRATEGIES"] = STRATEGIES
    templates.env.globals["LAB_UNITS"] = lab_units()  # each test's units, canonical first
    templates.env.globals["covariate_text"] = covariate_text  # a genotype by its meaning, not "0 1"
    # times are stored in UTC; pages show and forms read them in the app's time zone, which they name
    templates.env.globals["TZ"] = tz.key
    templates.env.filters["local"] = lambda t, seconds=False: _local(t, tz, seconds)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    vendor = {name: _vendor_file(*where) for name, where in VENDOR.items()}
    flights: dict[str, threading.Lock] = {}  # inputs key -> lock: one computation per key at a time
    computed: dict[str, int] = {}  # inputs key -> assessment id, for the requests that waited on the lock
    answers: dict[tuple[int, str, bool], bytes] = {}  # (assessment, status, computed now) -> the API's answer
    flights_lock = threading.Lock()

    def the_day() -> dt.date:
        return today() if today else dt.datetime.now(tz).date()

    # -- who is asking ---------------------------------------------------------------------------------------
    def address(request: Request) -> str:
        return client_address(request.client.host if request.client else None,
                              request.headers.get("x-forwarded-for"))

    def current(request: Request) -> tuple[Actor, str] | None:
        return store.session_actor(request.cookies.get(SESSION_COOKIE), idle=idle, absolute=absolute)

    def set_session_cookie(request: Request, resp: Response, token: str) -> None:
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax",
                        max_age=math.ceil(absolute.total_seconds()),
                        secure=secure_flag or request.url.scheme == "https")

    # -- every response: security headers, no caching of patient data, bounded bodies -------------------------
    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        limit = MAX_BODY_FHIR if request.url.path == "/api/v1/fhir" else MAX_BODY
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response: Response = JSONResponse({"detail": f"the request body is larger than {limit} bytes"},
                                              status_code=413)
        elif length is None and request.method in ("POST", "PUT", "PATCH") and \
                request.headers.get("transfer-encoding", "").lower() == "chunked":
            response = JSONResponse({"detail": "send a Content-Length (chunked bodies are not accepted)"},
                                    status_code=411)
        else:
            response = await call_next(request)
        if response.status_code == 405:  # Allow lists every method of the path, not only the first route's
            allowed = sorted({m for r in app.routes if isinstance(r, Route)
                              and r.matches(request.scope)[0] != Match.NONE for m in (r.methods or ())})
            response.headers["Allow"] = ", ".join(allowed)
        for k, v in headers_normal.items():
            response.headers.setdefault(k, v)
        path = request.url.path
        if not (path.startswith("/static/") or path.startswith("/vendor/")):
            response.headers["Cache-Control"] = "no-store"
        return response

    def page_user(request: Request) -> tuple[Actor, str]:
        who = current(request)
        if who is None:
            raise _Redirect("/login?next=" + request.url.path)
        return who

    def api_caller(request: Request) -> tuple[Actor, str] | None:
        """The signed-in caller (None: anonymous); a state-changing call must echo the session's CSRF token."""
        who = current(request)
        if who is not None and request.method not in ("GET", "HEAD") and not secrets.compare_digest(
                request.headers.get("X-CSRF-Token", ""), who[1]):
            raise HTTPException(403, "missing or wrong X-CSRF-Token header")
        return who

    def api_user(request: Request) -> tuple[Actor, str]:
        who = api_caller(request)
        if who is None:
            raise HTTPException(401, "sign in first: POST /api/v1/session")
        return who

    def check_csrf(who: tuple[Actor, str], token: str) -> None:
        if not secrets.compare_digest(token or "", who[1]):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page")

    class _Redirect(Exception):
        def __init__(self, to: str):
            self.to = to

    @app.exception_handler(_Redirect)
    async def _redirect(_: Request, exc: _Redirect) -> Response:
        return RedirectResponse(exc.to, status_code=303)

    def error_page(request: Request, status: int, title: str, message: str, field: str | None = None) -> Response:
        """An error on a page as a page (with the navigation and a way back), never raw JSON; the API answers
        JSON. The way back is the referring page of this site only (never an address from elsewhere)."""
        ref = request.headers.get("referer", "")
        here = f"{request.url.scheme}://{request.url.netloc}/"
        back = "/" + ref[len(here):] if ref.startswith(here) else "/"
        try:
            who = current(request)
        except Exception:  # an error page must not fail on the session
            who = None
        return render(request, "error.html", who, status, title=title, message=message, field=field, back=back)

    def _message(exc: Exception) -> str:
        return str(exc).split("] ", 1)[-1]

    @app.exception_handler(AccessDenied)
    async def _denied(request: Request, exc: AccessDenied) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return error_page(request, 403, "Not allowed", str(exc))

    @app.exception_handler(NotFound)
    async def _missing(request: Request, exc: NotFound) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return error_page(request, 404, "Not found", str(exc))

    @app.exception_handler(NeedsConfirmation)
    async def _confirm(request: Request, exc: NeedsConfirmation) -> Response:
        if not request.url.path.startswith("/api/"):
            return error_page(request, 409, "Please confirm", _message(exc) + ": " + "; ".join(exc.flags), exc.field)
        return JSONResponse({"detail": _message(exc), "field": exc.field, "flags": exc.flags,
                             "confirm": "repeat the request with \"confirm\": true to store it with these flags"},
                            status_code=409)

    @app.exception_handler(FieldError)
    async def _field(request: Request, exc: FieldError) -> Response:
        if not request.url.path.startswith("/api/"):
            return error_page(request, 422, "Not saved", _message(exc), exc.field)
        return JSONResponse({"detail": [{"loc": ["body", exc.field], "msg": _message(exc),
                                         "type": "value_error"}]}, status_code=422)

    @app.exception_handler(SlotTaken)
    async def _taken(request: Request, exc: SlotTaken) -> Response:
        if not request.url.path.startswith("/api/"):
            return error_page(request, 409, "Not booked", _message(exc), exc.field)
        return JSONResponse({"detail": [{"loc": ["body", exc.field], "msg": _message(exc),
                                         "type": "slot_taken"}]}, status_code=409)

    @app.exception_handler(CnidoseError)
    async def _cnidose(request: Request, exc: CnidoseError) -> Response:
        if not request.url.path.startswith("/api/"):
            return error_page(request, 422, "Not done", str(exc))
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = json.loads(json.dumps(exc.errors(), default=str))
        if not request.url.path.startswith("/api/"):
            said = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', [])[1:]) or 'request'}: {e.get('msg', '')}"
                             for e in errors[:5])
            return error_page(request, 422, "Not accepted", said)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        if request.url.path.startswith("/api/") or request.url.path.startswith("/vendor/") or \
                request.url.path.startswith("/static/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        titles = {400: "Bad request", 401: "Sign in first", 403: "Not allowed", 404: "Not found",
                  405: "Not allowed", 413: "Too large", 429: "Too many requests"}
        resp = error_page(request, exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail))
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    def render(request: Request, name: str, who: tuple[Actor, str] | None, status: int = 200,
               **ctx: Any) -> HTMLResponse:
        anon = None
        if who is None:
            anon = request.cookies.get(ANON_CSRF) or secrets.token_urlsafe(24)
        resp = templates.TemplateResponse(request, name, {"actor": who[0] if who else None,
                                                          "csrf": who[1] if who else anon, "version": __version__,
                                                          **ctx}, status_code=status)
        if anon is not None:
            resp.set_cookie(ANON_CSRF, anon, httponly=True, samesite="strict")
        return resp

    def form_time(value: str, field: str) -> dt.datetime:
        try:
            t = dt.datetime.fromisoformat(value)
        except ValueError:
            raise FieldError(f"not a date and time: {value!r}", field=field) from None
        return t if t.tzinfo else t.replace(tzinfo=tz)

    # -- static ----------------------------------------------------------------------------------------------
    @app.get("/vendor/{name}", include_in_schema=False)
    def vendor_js(name: str) -> Response:
        if name not in VENDOR:
            raise HTTPException(404, "no such file")
        path = vendor[name]
        if path is None:
            return PlainTextResponse(f"/* {VENDOR[name][0]} is not installed: {name} is off */",
                                     media_type="text/javascript")
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    # -- sign in / out ---------------------------------------------------------------------------------------
    damped = {"minute": 0.0, "written": 0, "suppressed": 0}

    def note_refusal(action: str, username: str, addr: str) -> None:
        """Sign-in noise an anonymous client can make at will -- throttled or busy attempts, wrong passwords for
        user names that do not exist -- goes to the audit log once a minute per kind and address, and at most 30
        rows a minute in all (the next row written counts the ones left out), so a flood from rotating
        addresses does not grow the database. Wrong passwords for real accounts are all logged: the account's
        delay bounds them."""
        now = time.monotonic()
        with flights_lock:
            if now - damped["minute"] >= 60:
                damped["minute"], damped["written"] = now, 0
            key = (action, addr)
            if now - noted.get(key, -1e9) < 60 or damped["written"] >= 30:
                damped["suppressed"] += 1
                return
            noted[key] = now
            noted.move_to_end(key)
            while len(noted) > 20_000:
                noted.popitem(last=False)
            damped["written"] += 1
            left_out, damped["suppressed"] = int(damped["suppressed"]), 0
        store.record_event(Actor((username or "?")[:64], "anonymous"), action, "session", None, None,
                           {"address": addr, **({"left out since the last such row": left_out} if left_out else {})})

    async def _login(request: Request, username: str, password: str
                     ) -> tuple[Actor, str, str, str | None] | tuple[str, float, int]:
        """(actor, session token, CSRF token, a new device token or None), or (why not, seconds to wait, HTTP
        status). Every attempt that gets past the throttles costs one argon2 hash (a dummy one for an unknown user
        name), within the hash gate; waiting happens without holding a worker thread."""
        addr = address(request)
        u = await run_in_threadpool(store.user, username) if username else None
        cookie = request.cookies.get(DEVICE_COOKIE)
        device = None
        if u is not None and cookie and \
                await run_in_threadpool(lambda: store.device_user(cookie, max_age=DEVICE_AGE)) == int(u["id"]):
            device = hashlib.sha256(cookie.encode()).hexdigest()
        if device is not None:
            wait = max(limits.hit("login-device", device), guard.wait(username, addr, device))
        else:
            wait = max(limits.hit("login", addr), guard.wait(username, addr))
        if wait > 0:
            await run_in_threadpool(note_refusal, "login-throttled", username, addr)
            return f"too many sign-in attempts: try again in {int(wait) + 1} s", wait, 429
        t0 = time.monotonic()
        async with gate.slot(device is not None) as got:
            if not got:
                await run_in_threadpool(note_refusal, "login-busy", username, addr)
                return "the server is busy with other sign-ins: try again in a few seconds", 5.0, 503
            ok = await run_in_threadpool(verify_or_dummy, u["password_hash"] if u is not None else None, password)
        # every checked attempt takes at least SIGN_IN_FLOOR_S (a sleep that holds no thread and no CPU), so its
        # time tells nothing of the user name, of an older hash's parameters or of the database
        await asyncio.sleep(max(0.0, SIGN_IN_FLOOR_S - (time.monotonic() - t0)))
        if not ok or u is None or not u["active"]:
            guard.fail(username, addr, device)
            if u is None:
                await run_in_threadpool(note_refusal, "login-unknown-user", username, addr)
            else:
                await run_in_threadpool(store.record_event, Actor(username[:64], "anonymous"), "login-failed",
                                        "session", None, None, {"address": addr})
            return "wrong user name or password", 0.0, 401
        guard.succeed(username, device)
        uid = int(u["id"])

        def finish() -> tuple[Actor, str, str, str | None]:
            actor = store.actor(uid)
            token, csrf = store.open_session(uid, addr)
            new_device = None if device is not None else store.remember_device(uid, max_age=DEVICE_AGE)
            if needs_rehash(str(u["password_hash"])):
                store.upgrade_password_hash(uid, hash_password(password))
            store.record_event(actor, "login", "session", uid, actor.patient_id, {"address": addr})
            return actor, token, csrf, new_device

        return await run_in_threadpool(finish)

    def signed_in(request: Request, resp: Response, got: tuple[Actor, str, str, str | None]) -> Response:
        set_session_cookie(request, resp, got[1])
        if got[3] is not None:
            resp.set_cookie(DEVICE_COOKIE, got[3], httponly=True, samesite="strict",
                            max_age=int(DEVICE_AGE.total_seconds()),
                            secure=secure_flag or request.url.scheme == "https")
        return resp

    def refused(resp: Response, got: tuple[str, float, int]) -> Response:
        if got[1]:
            resp.headers["Retry-After"] = str(int(got[1]) + 1)
        return resp

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        return render(request, "login.html", None, next=_safe_next(next), error=None)

    @app.post("/login", include_in_schema=False)
    async def login_post(request: Request, username: str = Form("", max_length=MAX["username"]),
                   password: str = Form("", max_length=MAX["password"]), csrf: str = Form("", max_length=64),
                   next: str = Form("/", max_length=512)) -> Response:
        if not secrets.compare_digest(csrf, request.cookies.get(ANON_CSRF, "")) or not csrf:
            return render(request, "login.html", None, 403, next=_safe_next(next),
                          error="the form expired: please try again")
        got = await _login(request, username.strip(), password)
        if isinstance(got[0], str):
            return refused(render(request, "login.html", None, got[2], next=_safe_next(next), error=got[0],
                                  username=username), got)  # type: ignore[arg-type]
        return signed_in(request, RedirectResponse(_safe_next(next), status_code=303), got)  # type: ignore[arg-type]

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: str = Form("", max_length=64)) -> Response:
        who = current(request)
        if who is not None:
            check_csrf(who, csrf)
            store.revoke_session(request.cookies.get(SESSION_COOKIE, ""))
            store.record_event(who[0], "logout", "session", who[0].user_id)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    @app.post("/api/v1/session", tags=["session"], responses={
        401: {"description": "wrong user name or password"},
        429: {"description": "too many attempts: wait (Retry-After)"},
        503: {"description": "busy with other sign-ins: try again (Retry-After)"}})
    async def api_login(request: Request, body: LoginIn) -> Response:
        got = await _login(request, body.username.strip(), body.password)
        if isinstance(got[0], str):
            return refused(JSONResponse({"detail": got[0]}, status_code=got[2]), got)  # type: ignore[arg-type]
        actor = got[0]
        return signed_in(request, JSONResponse({"user": actor.username, "role": actor.role, "csrf": got[2]}),
                         got)  # type: ignore[arg-type]

    @app.delete("/api/v1/session", tags=["session"])
    def api_logout(request: Request, who: tuple[Actor, str] = Depends(api_user)
                   ) -> dict[str, str]:
        """End this session (the cookie stops working everywhere at once)."""
        store.revoke_session(request.cookies.get(SESSION_COOKIE, ""))
        store.record_event(who[0], "logout", "session", who[0].user_id)
        return {"status": "signed out"}

    def _change_password(request: Request, who: tuple[Actor, str], current_pw: str, new_pw: str) -> None:
        u = store.user(who[0].username)
        if u is None or not verify_password(u["password_hash"], current_pw):
            raise FieldError("the current password is wrong", field="current")
        if len(new_pw) < 10:
            raise FieldError("at least 10 characters", field="new")
        store.set_password(who[0], int(u["id"]), hash_password(new_pw), keep=request.cookies.get(SESSION_COOKIE))

    @app.post("/api/v1/account/password", tags=["session"])
    def api_password(request: Request, body: PasswordIn,
                     who: tuple[Actor, str] = Depends(api_user)) -> dict[str, str]:
        """Change your password: every other session of yours ends."""
        _change_password(request, who, body.current, body.new)
        return {"status": "password changed; other sessions ended"}

    @app.post("/account/password", include_in_schema=False)
    def password_form(request: Request, current_pw: str = Form("", alias="current", max_length=MAX["password"]),
                      new_pw: str = Form("", alias="new", max_length=MAX["password"]),
                      csrf: str = Form("", max_length=64), who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        try:
            _change_password(request, who, current_pw, new_pw)
        except FieldError as exc:
            return render(request, "account.html", who, 422, error=str(exc).split("] ", 1)[-1], done=False)
        # the answer itself says so (no redirect with a message in the query string, which anyone could forge)
        return render(request, "account.html", who, error=None, done=True)

    @app.get("/account", response_class=HTMLResponse, include_in_schema=False)
    def account_page(request: Request, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        return render(request, "account.html", who, error=None, done=False)

    @app.post("/api/v1/users/{uid}/sessions/revoke", tags=["session"])
    def api_revoke(uid: Id, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        """End every session of a user (administrators)."""
        return {"revoked": store.revoke_sessions(who[0], uid)}

    @app.post("/api/v1/users/{uid}/deactivate", tags=["session"])
    def api_deactivate(uid: Id, who: tuple[Actor, str] = Depends(api_user)
                       ) -> dict[str, Any]:
        """Deactivate a user (administrators): their sessions end at once."""
        store.set_user_active(who[0], uid, False)
        return {"id": uid, "active": False}

    # -- pages -----------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        who = current(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        a = who[0]
        if a.role == "patient":
            return RedirectResponse(f"/patients/{a.patient_id}", status_code=303)
        if a.role == "admin":
            return RedirectResponse("/admin/audit", status_code=303)
        return RedirectResponse("/patients", status_code=303)

    def _summaries(actor: Actor, q: str = "") -> list[dict[str, Any]]:
        rows = store.patients(actor)
        words = q.lower().split()
        if words:  # every word in the name or the MRN
            rows = [p for p in rows if all(w in f"{p['family_name']} {p['given_name']} {p['mrn']}".lower()
                                           for w in words)]
        out = []
        for p in rows:
            chart = store.chart(actor, int(p["id"]))
            clin = clinical_assessment(chart, the_day())
            levels = [o for o in chart.observations if o["category"] == "level" and o["status"] == "final"]
            out.append({**p, "alerts": clin["alerts"], "last_level": levels[-1] if levels else None})
        return out

    @app.get("/patients", response_class=HTMLResponse, include_in_schema=False)
    def patient_list(request: Request, q: Annotated[str, Query(max_length=MAX["text"])] = "",
                     who: tuple[Actor, str] = Depends(page_user)) -> Response:
        if who[0].role == "patient":
            return RedirectResponse(f"/patients/{who[0].patient_id}", status_code=303)
        return render(request, "patients.html", who, patients=_summaries(who[0], q.strip()), q=q.strip())

    def patient_response(request: Request, who: tuple[Actor, str], pid: int, status: int = 200,
                         error: str | None = None, error_field: str | None = None,
                         confirm: dict[str, Any] | None = None, follow_up_report: list[str] | None = None,
                         form: str | None = None, values: dict[str, str] | None = None) -> HTMLResponse:
        chart = store.chart(who[0], pid)
        latest = chart.assessments[-1]["result"] if chart.assessments else None
        picked = model_choice(chart, the_day())
        return render(request, "patient.html", who, status, chart=chart, plot=_plot_data(chart, latest, tz),
                      has_model=picked is not None and picked.id is not None,
                      model_why=picked.explanation() if picked is not None else "the record cannot be read",
                      model_id=picked.id if picked is not None else None,
                      clinical=clinical_assessment(chart, the_day()), trends=_local_trends(trends(chart), tz),
                      staff=who[0].role in ("clinician", "pharmacist"), error=error, error_field=error_field,
                      latest=latest, confirm=confirm, today=the_day(),
                      follow_up_report=follow_up_report, form_id=form, values=values or {},
                      department=_department(chart.patient))

    @app.get("/patients/{pid}", response_class=HTMLResponse, include_in_schema=False)
    def patient_page(request: Request, pid: Id, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        # messages come only from the server's own state (a form answered in place), never from the query string
        return patient_response(request, who, pid)

    def refused_form(request: Request, who: tuple[Actor, str], pid: int, status: int, form: str,
                     values: dict[str, str], exc: FieldError | None = None,
                     confirm: dict[str, Any] | None = None) -> HTMLResponse:
        """The patient page with ``form``'s refusal (a field error, 422, or a confirmation to give, 409) at its
        field and the typed ``values`` kept; htmx is told to swap only that form's box (HX-Retarget/Reselect),
        while a plain form gets the whole page with the same markup."""
        resp = patient_response(request, who, pid, status, None if exc is None else _message(exc),
                                None if exc is None else exc.field, confirm=confirm, form=form, values=values)
        resp.headers.update({"HX-Retarget": f"#{form}-box", "HX-Reselect": f"#{form}-box", "HX-Reswap": "outerHTML"})
        return resp

    def _entry_form(request: Request, pid: int, who: tuple[Actor, str], add: Callable[[], Any], form: str,
                    fields: dict[str, str]) -> Response:
        """Run ``add``; a field error comes back at its field of ``form`` (422) with the typed ``fields`` kept, a
        plausibility warning asks for confirmation at the form (409: the same values, posted again with
        confirm=1, store the entry with its flags) -- :func:`refused_form`."""
        try:
            add()
        except NeedsConfirmation as exc:
            return refused_form(request, who, pid, 409, form, fields, confirm={
                "action": request.url.path, "flags": exc.flags, "field": exc.field, "fields": fields, "form": form})
        except FieldError as exc:
            return refused_form(request, who, pid, 422, form, fields, exc)
        return RedirectResponse(f"/patients/{pid}", status_code=303)

    @app.post("/patients/{pid}/levels", include_in_schema=False)
    def add_level_form(request: Request, pid: Id, value: str = Form("", max_length=MAX["number"]),
                       unit: str = Form("ng/mL", max_length=MAX["text"]),
                       observed_at: str = Form("", max_length=MAX["time"]), sample: str = Form("trough",
                       max_length=MAX["text"]), assay: str = Form("", max_length=MAX["text"]),
                       confirm: str = Form("", max_length=MAX["text"]), csrf: str = Form("", max_length=64),
                       who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_level(
            who[0], pid, value=_form_number(value, "value"), unit=unit, sample=sample, assay=assay or None,
            observed_at=form_time(observed_at, "observed_at"), confirm=confirm == "1"), "level",
            {"value": value, "unit": unit, "observed_at": observed_at, "sample": sample, "assay": assay})

    @app.post("/patients/{pid}/doses", include_in_schema=False)
    def add_dose_form(request: Request, pid: Id, amount: str = Form("", max_length=MAX["number"]),
                      unit: str = Form("mg", max_length=MAX["text"]),
                      given_at: str = Form("", max_length=MAX["time"]), product: str = Form("Prograf",
                      max_length=MAX["text"]), route: str = Form("oral", max_length=MAX["text"]),
                      confirm: str = Form("", max_length=MAX["text"]), csrf: str = Form("", max_length=64),
                      who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_dose(
            who[0], pid, product=product, amount=_form_number(amount, "amount"), unit=unit, route=route,
            given_at=form_time(given_at, "given_at"), confirm=confirm == "1"), "dose",
            {"amount": amount, "unit": unit, "given_at": given_at, "product": product, "route": route})

    @app.post("/patients/{pid}/regimens", include_in_schema=False)
    def add_regimen_form(request: Request, pid: Id, product: str = Form("", max_length=MAX["text"]),
                         dose: str = Form("", max_length=MAX["number"]),
                         interval_h: str = Form("", max_length=MAX["number"]), start_at: str = Form("",
                         max_length=MAX["time"]), route: str = Form("oral", max_length=MAX["text"]),
                         confirm: str = Form("", max_length=MAX["text"]), csrf: str = Form("", max_length=64),
                         who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)

        def add() -> None:
            agent = store.chart(who[0], pid, assessments="latest").patient["agent"]
            store.add_regimen(who[0], pid, drug=agent, product=product, dose=_form_number(dose, "dose"), unit="mg",
                              interval_h=_form_number(interval_h, "interval_h"),
                              start_at=form_time(start_at, "start_at"), route=route, confirm=confirm == "1")
        return _entry_form(request, pid, who, add, "regimen", {"product": product, "dose": dose,
                                                               "interval_h": interval_h, "start_at": start_at,
                                                               "route": route})

    @app.post("/patients/{pid}/medications", include_in_schema=False)
    def add_medication_form(request: Request, pid: Id, name: str = Form("", max_length=MAX["text"]),
                            start_on: str = Form("", max_length=MAX["time"]),
                            stop_on: str = Form("", max_length=MAX["time"]), daily_mg: str = Form("",
                            max_length=MAX["number"]), csrf: str = Form("", max_length=64),
                            who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_medication(
            who[0], pid, name=name, start_on=start_on, stop_on=stop_on or None,
            daily_mg=_form_number(daily_mg, "daily_mg") if daily_mg else None), "medication",
            {"name": name, "start_on": start_on, "stop_on": stop_on, "daily_mg": daily_mg})

    @app.post("/patients/{pid}/medications/{mid}/stop", include_in_schema=False)
    def stop_medication_form(request: Request, pid: Id, mid: Id, stop_on: str = Form("", max_length=MAX["time"]),
                             csrf: str = Form("", max_length=64),
                             who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.stop_medication(who[0], mid, stop_on), f"stop-{mid}",
                           {"stop_on": stop_on})

    @app.post("/patients/{pid}/vitals", include_in_schema=False)
    def add_bp_form(request: Request, pid: Id, systolic: str = Form("", max_length=MAX["number"]),
                    diastolic: str = Form("", max_length=MAX["number"]),
                    observed_at: str = Form("", max_length=MAX["time"]), csrf: str = Form("", max_length=64),
                    who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_blood_pressure(
            who[0], pid, systolic=_form_number(systolic, "systolic"), diastolic=_form_number(diastolic, "diastolic"),
            observed_at=form_time(observed_at, "observed_at")), "bp",
            {"systolic": systolic, "diastolic": diastolic, "observed_at": observed_at})

    @app.post("/patients/{pid}/covariates", include_in_schema=False)
    def add_covariate_form(request: Request, pid: Id, name: str = Form("", max_length=MAX["text"]),
                           value: str = Form("", max_length=MAX["number"]),
                           unit: str = Form("", max_length=MAX["text"]), measured_at: str = Form("",
                           max_length=MAX["time"]), csrf: str = Form("", max_length=64),
                           who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_covariate(
            who[0], pid, name, _form_number(value, "value"), unit, form_time(measured_at, "measured_at")), "covariate",
            {"name": name, "value": value, "unit": unit, "measured_at": measured_at})

    @app.post("/patients/{pid}/genotypes", include_in_schema=False)
    def add_genotype_form(request: Request, pid: Id, gene: str = Form("", max_length=MAX["text"]),
                          result: str = Form("", max_length=MAX["text"]),
                          source: str = Form("", max_length=MAX["source"]), tested_on: str = Form("",
                          max_length=MAX["time"]), csrf: str = Form("", max_length=64),
                          who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_genotype(
            who[0], pid, gene=gene, result=result, source=source, tested_on=tested_on or None), "genotype",
            {"gene": gene, "result": result, "source": source, "tested_on": tested_on})

    @app.post("/patients/{pid}/record", include_in_schema=False)
    def update_record_form(request: Request, pid: Id, region: str = Form("", max_length=MAX["text"]),
                           indication: str = Form("", max_length=MAX["text"]),
                           severity: str = Form("", max_length=MAX["text"]), product: str = Form("",
                           max_length=MAX["text"]), route: str = Form("", max_length=MAX["text"]),
                           csrf: str = Form("", max_length=64), who: tuple[Actor,
                           str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        given = {k: v for k, v in {"region": region, "indication": indication, "severity": severity,
                                   "product": product, "route": route}.items() if v}
        return _entry_form(request, pid, who, lambda: store.update_patient(who[0], pid, **given), "record",
                           {"region": region, "indication": indication, "severity": severity, "product": product,
                            "route": route})

    @app.post("/patients/{pid}/entries/{kind}/{eid}/withdraw", include_in_schema=False)
    def withdraw_form(request: Request, pid: Id, kind: str, eid: Id, reason: str = Form("",
                      max_length=MAX["reason"]), csrf: str = Form("", max_length=64),
                      who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        if kind not in ENTRY_TABLES:
            raise HTTPException(404, "no such kind of entry")
        return _entry_form(request, pid, who, lambda: store.mark_entered_in_error(
            who[0], kind, eid, reason, patient_id=pid), f"withdraw-{kind}-{eid}", {"reason": reason})

    @app.post("/patients/{pid}/labs", include_in_schema=False)
    def add_lab_form(request: Request, pid: Id, name: str = Form("", max_length=MAX["text"]), value: str = Form("",
                     max_length=MAX["number"]), unit: str = Form("", max_length=MAX["text"]),
                     observed_at: str = Form("", max_length=MAX["time"]), csrf: str = Form("", max_length=64),
                     who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_lab(
            who[0], pid, name=name, value=_form_number(value, "value"), unit=unit,
            observed_at=form_time(observed_at, "observed_at")), "lab",
            {"name": name, "value": value, "unit": unit, "observed_at": observed_at})

    def _run_assessment(actor: Actor, pid: int, aim: float | None = None, strategy: str = "map"
                        ) -> tuple[int, bool, dict[str, Any] | None]:
        """The assessment of the patient's chart as it is now, the dose choice aiming at ``aim`` (default: the
        target's middle): (id, computed now, the stored row when it was already read). The analysis is a function
        of its inputs (the chart's entries, the date, the settings -- the aim among them -- and this version), so
        when the newest stored assessment has exactly these inputs it is returned instead of a
        duplicate -- compared first by the patient's revision (raised by the database on every change of an
        entry) without reading the chart; concurrent requests for the same inputs in this process compute once."""
        settings = _settings(aim, strategy)
        store.authorize(actor, "write", "assessment", pid)
        patient, latest = store.latest_assessment(actor, pid)
        if latest is not None and _same_inputs(latest, _reuse_key(patient, the_day(), settings)):
            return int(latest["id"]), False, latest
        chart = store.chart(actor, pid, assessments="latest")
        inputs = _analysis_inputs(chart, the_day(), settings)
        latest = chart.assessments[-1] if chart.assessments else None
        if latest is not None and _same_inputs(latest, inputs["reuse"]):
            return int(latest["id"]), False, latest
        key = f"{pid}:" + json.dumps(inputs["reuse"], sort_keys=True)
        with flights_lock:
            lock = flights.setdefault(key, threading.Lock())
        with lock:
            aid = computed.get(key)
            if aid is not None:
                return aid, False, None
            try:
                result = analyse(chart, the_day(), **settings)
                aid = store.save_assessment(actor, pid, kind="recommendation" if "recommendation" in result
                                            else "assessment", inputs=inputs, result=result,
                                            model_ref=result.get("model"), package_version=__version__)
                with flights_lock:
                    computed[key] = aid
                    while len(computed) > 4096:
                        computed.pop(next(iter(computed)))
            finally:  # whatever happened, the next request for these inputs takes a new lock
                with flights_lock:
                    flights.pop(key, None)
            return aid, True, None

    @app.post("/patients/{pid}/assess", include_in_schema=False)
    def assess_form(request: Request, pid: Id, csrf: str = Form("", max_length=64),
                    aim: str = Form("", max_length=MAX["number"]),
                    strategy: str = Form("map", max_length=64),
                    who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        try:
            value = _form_number(aim, "aim") if aim.strip() else None
            if value is not None and not 0 < value < 1e4:
                raise FieldError(f"the aim must be a positive level, got {aim!r}", field="aim")
            if strategy not in STRATEGIES:
                raise FieldError(f"not a strategy of this page: {strategy!r}", field="strategy")
            aid, _, _ = _run_assessment(who[0], pid, value, strategy)
        except FieldError as exc:
            return refused_form(request, who, pid, 422, "assess", {"aim": aim, "strategy": strategy}, exc)
        return RedirectResponse(f"/patients/{pid}#assessment-{aid}", status_code=303)

    @app.post("/assessments/{aid}/sign", include_in_schema=False)
    def sign_form(request: Request, aid: Id, decision: str = Form("", max_length=MAX["decision"]),
                  candidate: str = Form("", max_length=MAX["number"]),
                  pid: int = Form(0, ge=0, le=2**31 - 1), csrf: str = Form("", max_length=64),
                  who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        try:
            index = None
            if candidate.strip():
                if not candidate.strip().isdigit():
                    raise FieldError(f"not a candidate: {candidate!r}", field="candidate")
                index = int(candidate)
            store.sign_assessment(who[0], aid, _decision(store.assessment(who[0], aid), index, decision))
        except FieldError as exc:
            return refused_form(request, who, pid, 422, f"sign-{aid}", {"decision": decision, "candidate": candidate},
                                exc)
        return RedirectResponse(f"/patients/{pid}#assessment-{aid}", status_code=303)

    @app.post("/patients/{pid}/follow-ups", include_in_schema=False)
    def follow_ups(request: Request, pid: Id, csrf: str = Form("", max_length=64),
                   department: str = Form("", max_length=MAX["text"]),
                   who: tuple[Actor, str] = Depends(page_user)) -> Response:
        """Book every follow-up due from today on in the patient's department (its indication's, from
        indications.toml, unless the form names one), at the first free quarter hour from 09:00 to 16:45 (the
        app's time zone) still ahead; the answer lists what was booked and what could not be, never dropping a
        visit silently."""
        check_csrf(who, csrf)
        store.authorize(who[0], "schedule", "follow-ups", pid)
        chart = store.chart(who[0], pid)
        dept = department.strip() or _department(chart.patient)
        now = dt.datetime.now(tz)
        report: list[str] = []
        for d in clinical_assessment(chart, the_day())["due"]:
            day = dt.date.fromisoformat(d["date"])
            if any(a["source"] == d["source"] and _utc_time(a["starts_at"]).astimezone(tz).date() == day
                   and a["status"] != "cancelled" for a in chart.appointments):
                continue  # booked before
            if day < the_day():
                report.append(f"not booked: {d['what']} was due on {day} (overdue): book it by hand")
                continue
            start = None
            for minute in range(9 * 60, 17 * 60, 15):
                at = dt.datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=tz)
                if at <= now:
                    continue
                try:
                    store.book(who[0], department=dept, kind="follow-up", starts_at=at, patient_id=pid,
                               reason=d["what"], source=d["source"])
                    start = at
                    break
                except FieldError as exc:
                    if exc.field != "starts_at":
                        raise
            report.append(f"booked: {d['what']}, {dept}, {start:%Y-%m-%d %H:%M} ({tz.key})" if start is not None
                          else f"not booked: {d['what']} on {day}: no free {dept} slot left that day: book it by "
                               "hand")
        return patient_response(request, who, pid, 200, follow_up_report=report or ["nothing new to book"])

    @app.get("/appointments/{appt_id}.ics", include_in_schema=False)
    def ics(request: Request, appt_id: Id, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        pid = store.appointment_patient(who[0], appt_id)
        a = next(x for x in store.chart(who[0], pid).appointments if x["id"] == appt_id)
        return Response(_ics(a), media_type="text/calendar",
                        headers={"Content-Disposition": f'attachment; filename="appointment-{appt_id}.ics"'})

    @app.get("/book", response_class=HTMLResponse, include_in_schema=False)
    def book_page(request: Request) -> Response:
        return render(request, "book.html", current(request), done=None, error=None, error_field=None, form={})

    def booking_limit(request: Request, actor: Actor) -> float:
        """Anonymous (and patients') booking requests are rate-limited per address and overall."""
        if actor.role in ("clinician", "pharmacist"):
            return 0.0
        return max(limits.hit("booking", address(request)), limits.hit("booking-all", "all"))

    @app.post("/book", response_class=HTMLResponse, include_in_schema=False)
    def book_post(request: Request, starts_at: str = Form("", max_length=MAX["time"]),
                  reason: str = Form("", max_length=MAX["reason"]),
                  contact_name: str = Form("", max_length=MAX["contact_name"]),
                  contact_email: str = Form("", max_length=MAX["contact_email"]),
                  csrf: str = Form("", max_length=64)) -> Response:
        who = current(request)
        if who is not None:
            check_csrf(who, csrf)
        elif not csrf or not secrets.compare_digest(csrf, request.cookies.get(ANON_CSRF, "")):
            raise HTTPException(403, "the form expired: please reload it")
        actor = who[0] if who else PUBLIC
        form = {"starts_at": starts_at, "reason": reason, "contact_name": contact_name, "contact_email": contact_email}
        wait = booking_limit(request, actor)
        if wait > 0:
            return render(request, "book.html", who, 429, done=None, error=f"too many requests: try again in "
                          f"{int(wait / 60) + 1} min", error_field="starts_at", form=form)
        try:
            aid = store.book(actor, department=DEPARTMENT, starts_at=form_time(starts_at, "starts_at"),
                             reason=reason or None, contact_name=contact_name or None,
                             contact_email=contact_email or None,
                             patient_id=actor.patient_id if actor.role == "patient" else None)
        except FieldError as exc:
            return render(request, "book.html", who, 422, done=None, error=str(exc).split("] ", 1)[-1],
                          error_field=exc.field, form=form)
        return render(request, "book.html", who, done=store.booking_reference(aid), error=None, error_field=None,
                      form={})

    @app.get("/calendar", response_class=HTMLResponse, include_in_schema=False)
    def calendar_page(request: Request, department: str = DEPARTMENT, who: tuple[Actor, str] = Depends(page_user)
                      ) -> Response:
        start = dt.datetime.combine(the_day(), dt.time(0), tzinfo=tz)
        rows = store.calendar(who[0], department, start, start + dt.timedelta(days=60))
        # every department is one click away: those the indications' follow-ups go to, the consultation desk's,
        # and any that has appointments
        known = {department_for(str(i["key"])) for i in indications()["indications"]}
        departments = sorted(known | {DEPARTMENT} | set(store.departments(who[0])) | {department.lower()})
        return render(request, "calendar.html", who, rows=rows, department=department.lower(),
                      departments=departments)

    @app.post("/appointments/{appt_id}/status", include_in_schema=False)
    def appt_status(request: Request, appt_id: Id, status: str = Form("", max_length=MAX["text"]),
                    department: str = Form(DEPARTMENT, max_length=MAX["text"]),
                    csrf: str = Form("", max_length=64), who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        store.set_appointment_status(who[0], appt_id, status)
        return RedirectResponse(f"/calendar?department={_q(department)}", status_code=303)

    @app.get("/patients/{pid}/report", response_class=HTMLResponse, include_in_schema=False)
    def report(request: Request, pid: Id, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        chart = store.chart(who[0], pid)
        return render(request, "report.html", who, chart=chart, clinical=clinical_assessment(chart, the_day()),
                      latest=chart.assessments[-1] if chart.assessments else None, today=the_day())

    @app.get("/patients/{pid}/report.pdf", include_in_schema=False)
    def report_pdf(pid: Id, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        chart = store.chart(who[0], pid)
        body = _report_pdf(chart, clinical_assessment(chart, the_day()), the_day(), tz)
        store.record_event(who[0], "export", "report-pdf", pid, pid)
        return Response(body, media_type="application/pdf",
                        headers={"Content-Disposition": f'inline; filename="cnidose-report-{pid}.pdf"'})

    @app.get("/admin/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        return render(request, "audit.html", who, rows=store.audit_log(who[0], limit=500))

    # -- JSON API --------------------------------------------------------------------------------------------
    @app.get("/api/v1/patients", tags=["patients"])
    def api_patients(who: tuple[Actor, str] = Depends(api_user)) -> list[dict[str, Any]]:
        return json.loads(json.dumps(store.patients(who[0]), default=str))

    @app.get("/api/v1/patients/{pid}", tags=["patients"], response_model=dict[str, Any])
    def api_patient(pid: Id, who: tuple[Actor, str] = Depends(api_user)) -> Response:
        chart = store.chart(who[0], pid)
        return Response(json.dumps({k: getattr(chart, k) for k in chart.__dataclass_fields__}, default=str),
                        media_type="application/json")

    confirm_answer: dict[int | str, dict[str, Any]] = {409: {
        "description": "the entry is possible but suspicious: its flags are listed; repeat with confirm=true to store "
                       "it with them"}}

    @app.patch("/api/v1/patients/{pid}", tags=["patients"])
    def api_update_patient(pid: Id, body: PatientUpdate, who: tuple[Actor, str] = Depends(api_user)
                           ) -> dict[str, Any]:
        """Change record-level fields (region, indication, severity, product, route, donor, dates); audited."""
        store.update_patient(who[0], pid, **body.model_dump(exclude_unset=True))
        return {"id": pid, "updated": sorted(body.model_dump(exclude_unset=True))}

    @app.get("/api/v1/patients/{pid}/record", tags=["patients"])
    def api_record(pid: Id, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, Any]:
        """The patient as a ``cnidose.patient/2`` document (every entry, of every status)."""
        from cnidose.records.exchange import chart_to_record_document

        return chart_to_record_document(store.chart(who[0], pid))

    @app.post("/api/v1/patients/{pid}/regimens", status_code=201, tags=["entries"], responses=confirm_answer)
    def api_regimen(pid: Id, body: RegimenIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        """A regimen from ``start_at`` (a regimen change: the open one is closed at that time)."""
        agent = store.chart(who[0], pid, assessments="latest").patient["agent"]
        return {"id": store.add_regimen(who[0], pid, drug=agent, product=body.product, dose=body.dose,
                                        unit=body.unit, interval_h=body.interval_h, start_at=body.start_at,
                                        route=body.route, confirm=body.confirm)}

    @app.post("/api/v1/patients/{pid}/medications", status_code=201, tags=["entries"])
    def api_medication(pid: Id, body: MedicationIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        return {"id": store.add_medication(who[0], pid, name=body.name, start_on=body.start_on,
                                           stop_on=body.stop_on, daily_mg=body.daily_mg)}

    @app.post("/api/v1/medications/{mid}/stop", tags=["entries"])
    def api_stop_medication(mid: Id, body: StopIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, Any]:
        store.stop_medication(who[0], mid, body.stop_on)
        return {"id": mid, "stop_on": body.stop_on.isoformat()}

    @app.post("/api/v1/patients/{pid}/blood-pressure", status_code=201, tags=["entries"])
    def api_bp(pid: Id, body: BloodPressureIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, list[int]]:
        return {"ids": list(store.add_blood_pressure(who[0], pid, systolic=body.systolic, diastolic=body.diastolic,
                                                     observed_at=body.observed_at))}

    @app.post("/api/v1/patients/{pid}/covariates", status_code=201, tags=["entries"])
    def api_covariate(pid: Id, body: CovariateIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        return {"id": store.add_covariate(who[0], pid, body.name, body.value, body.unit, body.measured_at)}

    @app.post("/api/v1/patients/{pid}/genotypes", status_code=201, tags=["entries"])
    def api_genotype(pid: Id, body: GenotypeIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        return {"id": store.add_genotype(who[0], pid, gene=body.gene, result=body.result, source=body.source,
                                         tested_on=body.tested_on)}

    @app.post("/api/v1/entries/{kind}/{eid}/entered-in-error", tags=["entries"])
    def api_withdraw(kind: str, eid: Id, body: WithdrawIn, who: tuple[Actor, str] = Depends(api_user)
                     ) -> dict[str, Any]:
        """Withdraw a wrong entry (it stays, struck through, out of rules and fits); audited."""
        if kind not in ENTRY_TABLES:
            raise HTTPException(404, f"no such kind of entry (known: {', '.join(ENTRY_TABLES)})")
        store.mark_entered_in_error(who[0], kind, eid, body.reason)
        return {"kind": kind, "id": eid, "status": "entered-in-error"}

    @app.post("/api/v1/patients/{pid}/levels", status_code=201, tags=["entries"], responses=confirm_answer)
    def api_level(pid: Id, body: LevelIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        return {"id": store.add_level(who[0], pid, value=body.value, unit=body.unit,
                                      observed_at=body.observed_at, blq=body.blq, lloq=body.lloq, assay=body.assay,
                                      sample=body.sample, matrix=body.matrix, confirm=body.confirm)}

    @app.post("/api/v1/patients/{pid}/doses", status_code=201, tags=["entries"], responses=confirm_answer)
    def api_dose(pid: Id, body: DoseIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        return {"id": store.add_dose(who[0], pid, product=body.product, amount=body.amount,
                                     unit=body.unit, given_at=body.given_at, route=body.route,
                                     infusion_h=body.infusion_h, confirm=body.confirm)}

    @app.post("/api/v1/patients/{pid}/labs", status_code=201, tags=["entries"])
    def api_lab(pid: Id, body: LabIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        return {"id": store.add_lab(who[0], pid, name=body.name, value=body.value, unit=body.unit,
                                    observed_at=body.observed_at)}

    @app.post("/api/v1/patients/{pid}/recommendation", status_code=201, tags=["assessments"],
              response_model=dict[str, Any], responses={200: {"description": "the stored assessment, reused"}})
    def api_recommend(pid: Id, aim: Annotated[float | None, Query(gt=0, lt=1e4, description=(
                          "the level the dose choice aims at (default: the middle of the patient's target); "
                          "outside the target: 422 on aim"))] = None,
                      strategy: Annotated[str, Query(max_length=64, pattern=r"^[a-z0-9:.+ -]+$", description=(
                          "how the levels are fitted (cnidose.dosing.strategies): map, flat:L, log, forget:D, "
                          "occ-last, joined by +; unknown: 422 on strategy"))] = "map",
                      who: tuple[Actor, str] = Depends(api_user)) -> Response:
        """Fit and recommend on the chart as it is (201, stored as a draft); when the newest stored assessment
        has exactly these inputs, that one is returned instead (200, ``"reused": true``). The result's plot data
        (PLOT_KEYS: ``curve``, the fitted curve; ``forecast``, the current and proposed regimens' next days;
        ``pd_curve``, the effect over time: tens of kB) is left out here: ``GET /api/v1/assessments/{id}``
        (``curve_url``) has it."""
        aid, fresh, row = _run_assessment(who[0], pid, aim, strategy)
        row = row if row is not None else store.assessment(who[0], aid)
        key = (aid, row["status"], fresh)  # a stored assessment changes only when it is signed
        body = answers.get(key)
        if body is None:
            result = {k: v for k, v in row["result"].items() if k not in PLOT_KEYS}
            body = json.dumps({**row, "result": result, "reused": not fresh,
                               "curve_url": f"/api/v1/assessments/{aid}" if "curve" in row["result"] else None},
                              default=str).encode()
            with flights_lock:
                answers[key] = body
                while len(answers) > 1024:
                    answers.pop(next(iter(answers)))
        return Response(body, status_code=201 if fresh else 200, media_type="application/json")

    @app.get("/api/v1/assessments/{aid}", tags=["assessments"])
    def api_assessment(aid: Id, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, Any]:
        return json.loads(json.dumps(store.assessment(who[0], aid), default=str))

    @app.post("/api/v1/assessments/{aid}/sign", tags=["assessments"])
    def api_sign(aid: Id, body: SignIn, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, Any]:
        text = _decision(store.assessment(who[0], aid), body.candidate, body.decision)
        store.sign_assessment(who[0], aid, text)
        return {"id": aid, "status": "signed", "decision": text}

    @app.post("/api/v1/bookings", status_code=201, tags=["appointments"],
              responses={429: {"description": "too many booking requests from this address (Retry-After)"}})
    def api_book(request: Request, body: BookingIn) -> Response:
        """A consultation request (anyone; rate-limited) or, for staff, a booked visit. The answer's ``reference``
        is opaque; staff also get the ``id``."""
        who = api_caller(request)
        actor = who[0] if who else PUBLIC
        wait = booking_limit(request, actor)
        if wait > 0:
            return JSONResponse({"detail": "too many booking requests: try again later"}, status_code=429,
                                headers={"Retry-After": str(int(wait) + 1)})
        aid = store.book(actor, department=DEPARTMENT, starts_at=body.starts_at, minutes=body.minutes,
                         reason=body.reason, contact_name=body.contact_name, contact_email=body.contact_email,
                         patient_id=body.patient_id)
        staff = actor.role in ("clinician", "pharmacist")
        out: dict[str, Any] = {"reference": store.booking_reference(aid),
                               "status": "confirmed" if staff else "requested"}
        if staff:
            out["id"] = aid
        return JSONResponse(out, status_code=201)

    @app.get("/api/v1/calendar", tags=["appointments"])
    def api_calendar(start: When, end: When, department: Annotated[str, Query(max_length=MAX["text"])] = DEPARTMENT,
                     who: tuple[Actor, str] = Depends(api_user)) -> list[dict[str, Any]]:
        return json.loads(json.dumps(store.calendar(who[0], department, start, end), default=str))

    @app.get("/api/v1/patients/{pid}/fhir", tags=["interchange"])
    def api_fhir_export(pid: Id, who: tuple[Actor, str] = Depends(api_user)) -> dict[str, Any]:
        """The patient as a FHIR bundle (type collection)."""
        from cnidose.records.fhir import export_bundle

        bundle = export_bundle(store.chart(who[0], pid))
        store.record_event(who[0], "export", "fhir-bundle", pid, pid)
        return bundle

    @app.post("/api/v1/fhir", status_code=201, tags=["interchange"])
    def api_fhir_import(body: dict[str, Any], who: tuple[Actor, str] = Depends(api_user)) -> dict[str, int]:
        """Create a patient from a FHIR bundle (one Patient and its resources), all or nothing."""
        from cnidose.records.fhir import import_bundle

        return {"id": import_bundle(store, who[0], body)}

    # every status code the API can answer is in its schema (schemathesis checks it)
    common: dict[int | str, dict[str, Any]] = {
        400: {"description": "the body cannot be read (not JSON, or not the declared content type)"},
        401: {"description": "not signed in"}, 403: {"description": "not allowed, or a missing X-CSRF-Token"},
        404: {"description": "no such object"}, 411: {"description": "a body without Content-Length"},
        413: {"description": "the request body is too large"}, 422: {"description": "a field is invalid (named)"},
        429: {"description": "too many requests (Retry-After)"}}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/api/") and route.include_in_schema:
            for code, what in common.items():
                route.responses.setdefault(code, what)
    app.state.store = store
    return app


def app_from_env() -> FastAPI:
    """The app over ``CNIDOSE_DATABASE_URL`` (schema already migrated): the factory ``cnidose serve
    --workers N`` gives each uvicorn worker process."""
    from cnidose.models.kernel import warm
    from cnidose.models.library import library_models
    from cnidose.records.db import make_engine

    app = create_app(Store(make_engine()))
    warm(library_models())  # compiled in the background: no request waits for the compiler
    return app


#: the parts of a stored result that only plots read (left out of the recommendation answer)
PLOT_KEYS = ("curve", "forecast", "pd_curve")


def _decision(assessment: dict[str, Any], candidate: int | None, note: str) -> str:
    """The decision signed: the candidate regimen chosen (a row of the stored candidate table, written out with
    its units and predictions, so the signature names exactly what is to be given), a note after it; or the
    free-text decision alone."""
    from cnidose.dosing.regimen import regimen_text  # the numerical stack only when a candidate is signed

    note = note.strip()
    if candidate is None:
        if not note:
            raise FieldError("choose a regimen or write the decision", field="decision")
        return note
    rec = (assessment.get("result") or {}).get("recommendation") or {}
    cands = rec.get("candidates") or []
    if not 0 <= candidate < len(cands):
        raise FieldError(f"assessment {assessment.get('id')} has no candidate {candidate}", field="candidate")
    text = regimen_text(cands[candidate], rec.get("product", ""), rec.get("metric", "trough"), rec["target"])
    text = text[:1].upper() + text[1:]
    return text + (f". {note}" if note else "")


def _report_pdf(chart: Any, clinical: dict[str, Any], today: dt.date, tz: ZoneInfo = UTC_ZONE) -> bytes:
    """The printable report as a PDF (:mod:`cnidose.web.pdf`): patient, alerts, the regimen signed (the latest
    signed recommendation's decision, in a box, with who signed it and when; a newer draft is named as not signed),
    its provenance, the inputs the model read, the concentration plot, levels and the regimens recorded."""
    from cnidose.web.pdf import plot_png, report_pdf

    p = chart.patient
    blocks: list[tuple[str, Any]] = [
        ("h1", "Therapeutic drug monitoring report"),
        ("p", f"{p['family_name']}, {p['given_name']} · MRN {p['mrn']} · born {p['birth_date']} · {p['sex']}"),
        ("p", f"{p['agent']} for {p['indication']}" + (f"; transplanted {p['transplant_date']}"
                                                      if p.get("transplant_date") else "")
         + f" · printed {today.isoformat()} by cnidose {__version__} · times in {tz.key}")]
    signed = next((a for a in reversed(chart.assessments) if a["status"] == "signed"), None)
    latest = chart.assessments[-1] if chart.assessments else None
    shown = signed or latest
    if signed is not None:
        blocks.append(("box", f"Regimen signed: {signed['decision']}\nSigned by {signed.get('signed_by_name') or '?'}"
                              f", {_local(signed['signed_at'], tz)} {tz.key}"))
    else:
        blocks.append(("box", "No signed recommendation: nothing in this report is an order."))
    if latest is not None and latest is not signed:
        blocks.append(("p", f"A newer {latest['kind']} of {_local(latest['created_at'], tz)} {tz.key} is a draft, "
                            "not signed" + (f": it proposed {latest['result']['recommendation']['summary']}"
                                            if latest["result"].get("recommendation") else ".")))
    blocks.append(("h2", "Alerts"))
    blocks += [("p", f"[{a['severity']}] {a['message']} ({a['source']})") for a in clinical["alerts"]] or [
        ("p", "None.")]
    if clinical["due"]:
        blocks.append(("h2", "Due"))
        blocks += [("p", f"{d['date']}: {d['what']} ({d['source']})") for d in clinical["due"][:8]]
    if shown is not None:
        r = shown["result"]
        blocks.append(("h2", f"{shown['kind'].capitalize()} of {_local(shown['created_at'], tz)} {tz.key} "
                             f"({shown['status']})"))
        if r.get("recommendation"):
            blocks += [("p", "Recommended: " + r["recommendation"]["summary"]), ("p", f"Target: {r.get('target')}"),
                       ("p", f"Model: {r.get('model')}; cnidose {shown['package_version']}; "
                             f"choice rule: {_rule(r['recommendation']['inputs'])}")]
        mi = r.get("model_inputs")
        if mi:
            blocks.append(("p", f"Model chosen: {mi['model']['title']} ({mi['model'].get('citation') or ''}); "
                                f"why: {mi['model']['why']}"))
            blocks += [("p", f"  {c['description'] or c['name']} ({c['name']}): {c['shown']} {c['unit']}".rstrip()
                             + (f", recorded {_local(c['at'], tz)}" if c.get("at") else "")
                             + f" — {c['source']}") for c in mi["covariates"]]
        blocks += [("p", f"Warning: {w}") for w in r.get("warnings", [])]
        plot = _plot_data(chart, r, tz)
        if plot["levels"]["time"] or plot["fit"]:
            blocks += [("h2", f"Concentrations ({tz.key})"), ("png", plot_png(plot))]
    blocks.append(("h2", "Drug levels"))
    blocks += [("p", f"{_local(o['observed_at'], tz)} {tz.key}  {o['value']:.3g} {o['unit']}"
                     + (" (below LLOQ)" if o["blq"] else ""))
               for o in chart.observations if o["category"] == "level" and o["status"] == "final"] or [
        ("p", "None recorded.")]
    blocks.append(("h2", "Regimens recorded"))
    blocks += [("p", f"{r['product']} {r['dose_mg']:g} mg every {r['interval_h']:g} h from "
                     f"{_local(r['start_at'], tz)}" + (f" to {_local(r['stop_at'], tz)}" if r["stop_at"] else
                                                       " (open)"))
               for r in chart.regimens if r["status"] == "final"] or [("p", "None recorded.")]
    return report_pdf(blocks, title=f"cnidose report {p['mrn']}")


#: how the app analyses a chart (recorded in every assessment's inputs)
def _local(t: Any, tz: ZoneInfo, seconds: bool = False) -> str:
    """A stored (UTC) time -- a datetime, or an ISO string with its offset as in a stored result -- as the
    app's wall-clock time, for pages."""
    if isinstance(t, str) and "T" in t:
        try:
            t = dt.datetime.fromisoformat(t)
        except ValueError:
            return t
    if not isinstance(t, dt.datetime):
        return "" if t is None else str(t)
    return _utc_time(t).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _wall(t: dt.datetime, tz: ZoneInfo) -> str:
    """ISO wall-clock time in ``tz`` without an offset: what Plotly draws as it is (it ignores offsets)."""
    return _utc_time(t).astimezone(tz).strftime("%Y-%m-%dT%H:%M:%S")


def _plot_data(chart: Any, result: dict[str, Any] | None, tz: ZoneInfo) -> dict[str, Any]:
    """What the concentration plot draws, times as wall-clock times in ``tz``: the measured levels and the doses
    given (shown before any fit), the target band, and from the latest assessment the fitted curve with its 80 %
    band and the forecast of the current and the proposed regimens."""
    result = result or {}
    levels = [o for o in chart.observations if o["category"] == "level" and o["status"] == "final"]
    doses = [d for d in chart.doses if d["status"] == "final"]
    rec = result.get("recommendation") or {}
    target = rec.get("target") or {}
    out: dict[str, Any] = {
        "timezone": tz.key, "unit": target.get("unit") or (levels[0]["unit"] if levels else "ng/mL"),
        "target": [target["low"], target["high"]] if target else None,
        "levels": {"time": [_wall(o["observed_at"], tz) for o in levels], "value": [o["value"] for o in levels],
                   "sample": [o.get("sample") or "" for o in levels]},
        "doses": {"time": [_wall(d["given_at"], tz) for d in doses], "mg": [d["amount_mg"] for d in doses]},
        "fit": None, "forecast": None}
    curve = result.get("curve")
    if curve and "hours" in curve:
        origin = dt.datetime.fromisoformat(curve["origin"])

        def clock(hours: list[float]) -> list[str]:
            return [_wall(origin + dt.timedelta(hours=h), tz) for h in hours]

        out["fit"] = {"time": clock(curve["hours"]), **{q: curve[q] for q in ("p10", "p50", "p90")}}
        pdc = result.get("pd_curve")
        if pdc:
            out["pd"] = [{"id": x["id"], "effect": x["effect"], "fit_time": clock(x["fit"]["hours"]),
                          "fit": x["fit"]["fraction"],
                          **({"forecast_time": clock(x["forecast_hours"])} if "forecast_hours" in x else {}),
                          **{k: x[k] for k in ("current", "proposed") if k in x}} for x in pdc["series"]]
        fc = result.get("forecast")
        if fc:
            out["forecast"] = {"time": clock(fc["hours"]), "days": fc["days"],
                               **{name: {**{k: fc[name][k] for k in ("dose", "interval", "p10", "p50", "p90")},
                                         "dose_time": clock(fc[name]["dose_hours"])}
                                  for name in ("current", "proposed") if name in fc}}
    return out


def _local_trends(tr: dict[str, Any], tz: ZoneInfo) -> dict[str, Any]:
    return {"egfr": [(_wall(dt.datetime.fromisoformat(t), tz), v) for t, v in tr["egfr"]],
            "bp": [(_wall(dt.datetime.fromisoformat(t), tz), s, d) for t, s, d in tr["bp"]]}


def _utc_time(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)  # SQLite gives stored UTC times back naive


def _department(patient: dict[str, Any]) -> str:
    """The department whose calendar the patient's follow-ups go to (by the indication)."""
    try:
        key = resolve_indication(patient.get("indication") or "")[0]
    except CnidoseError:
        return "clinic"
    return department_for(key)


def _rule(inputs: dict[str, Any]) -> str:
    choice = inputs.get("choice", "smallest")
    return f"aim at {inputs['aim']:g}" if choice == "aim" and "aim" in inputs else str(choice)


ANALYSIS: dict[str, Any] = {"n_draws": 500, "seed": 0, "choice": "aim"}


#: The strategies the page offers (any valid spec through the API): name -> what a clinician reads
STRATEGIES: dict[str, str] = {
    "map": "standard (published priors)",
    "log": "log-scale fit (no pull towards low forecasts)",
    "forget:14": "recent levels weigh more (half weight after 14 days)",
    "log+forget:14": "log-scale fit, recent levels weigh more",
    "flat:2": "wider priors (trust the levels more)",
    "drift:0.2": "clearance may drift: the next occasion follows the recent ones (random walk)",
}


def _settings(aim: float | None, strategy: str = "map") -> dict[str, Any]:
    """The analysis settings of a request: the app's (ANALYSIS), the aim when the clinician set one, and the
    forecasting strategy (its canonical name) when it is not the standard one. FieldError on ``strategy``."""
    from cnidose.dosing.strategies import strategy as parse_strategy

    try:
        name = parse_strategy(strategy).name
    except InputError as exc:
        raise FieldError(str(exc), field="strategy") from None
    return {**ANALYSIS, **({"aim": float(aim)} if aim is not None else {}),
            **({"strategy": name} if name != "map" else {})}


def _reuse_key(patient: dict[str, Any], as_of: dt.date, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """When two analyses have equal keys their inputs are equal: the patient row and its revision (raised on every
    change of an entry), the date, the settings and the package version."""
    row = {k: v for k, v in patient.items() if k != "revision"}
    return {"patient_revision": int(patient["revision"]), "patient_sha256": hashlib.sha256(
        json.dumps(row, default=str, sort_keys=True).encode()).hexdigest(), "as_of": as_of.isoformat(),
        "settings": settings or ANALYSIS, "version": __version__}


def _analysis_inputs(chart: Any, as_of: dt.date, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an analysis depends on, recorded with it: a hash of the chart's entries (patient, covariates, regimens,
    doses, observations, medications; statuses included), the counts, and the reuse key."""
    entries = [chart.patient, chart.covariates, chart.regimens, chart.doses, chart.observations, chart.medications]
    return {"as_of": as_of.isoformat(), "chart_sha256": hashlib.sha256(
        json.dumps(entries, default=str, sort_keys=True).encode()).hexdigest(),
        "doses": len(chart.doses), "observations": len(chart.observations), "settings": settings or ANALYSIS,
        "reuse": _reuse_key(chart.patient, as_of, settings)}


def _same_inputs(assessment: dict[str, Any], key: dict[str, Any]) -> bool:
    """Whether ``assessment`` was made from inputs with this reuse key (JSON values only; it holds the version)."""
    inputs = assessment["inputs"]
    return isinstance(inputs, dict) and inputs.get("reuse") == key


def _safe_next(target: str) -> str:
    """A redirect target on this site only (a path, not //host or a scheme)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _form_number(value: str, field: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise FieldError(f"expected a number, got {value!r}", field=field) from None


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _q(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def _ics(a: dict[str, Any]) -> bytes:
    """An iCalendar (RFC 5545) event for one appointment, written by the ``icalendar`` library (escaping, line
    folding at 75 octets, CRLF)."""
    import icalendar

    cal = icalendar.Calendar()
    cal.add("prodid", "-//cnidose//appointments//EN")
    cal.add("version", "2.0")
    ev = icalendar.Event()
    ev.add("uid", f"cnidose-appointment-{a['reference'] or a['id']}")
    ev.add("dtstamp", a["created_at"].astimezone(dt.UTC))
    ev.add("dtstart", a["starts_at"].astimezone(dt.UTC))
    ev.add("dtend", a["ends_at"].astimezone(dt.UTC))
    ev.add("summary", a["department"].title() + " " + a["kind"])
    ev.add("status", "CONFIRMED" if a["status"] == "confirmed" else "TENTATIVE")
    if a.get("reason"):
        # a bare CR is no line break in iCalendar text: normalise every line break to LF (escaped as \n)
        ev.add("description", a["reason"].replace("\r\n", "\n").replace("\r", "\n"))
    cal.add_component(ev)
    return bytes(cal.to_ical())
