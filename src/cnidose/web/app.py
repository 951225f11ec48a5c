"""The clinician web app: FastAPI app factory, server-rendered pages and the JSON API under ``/api/v1``.

Every page and API call goes through :class:`cnidose.records.store.Store`, so role checks and the audit trail
are the same for both. Sessions are signed cookies carrying a CSRF token that every state-changing form
(hidden field ``csrf``) and API call (header ``X-CSRF-Token``) must echo; anonymous forms (sign-in, the
public booking request) use a signed double-submit cookie. Sign-in failures are throttled per user name
and per client address. Times typed into forms are read in the app's time zone (``CNIDOSE_TIMEZONE``,
default UTC) and stored in UTC. JavaScript and CSS are served by the app itself (Plotly from the installed
``plotly`` package, htmx from ``django-js-lib-htmx``); nothing is fetched from elsewhere. The patient page's
forms carry htmx attributes (the page's main region is swapped in place) and work as plain forms without
JavaScript.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from cnidose import __version__
from cnidose.errors import CnidoseError
from cnidose.records.plausibility import NeedsConfirmation
from cnidose.records.store import ENTRY_TABLES, PUBLIC, AccessDenied, Actor, NotFound, Store
from cnidose.records.units import FieldError
from cnidose.web.security import Sessions, Throttle, verify_password
from cnidose.web.services import analyse, clinical_assessment, trends

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
ANON_CSRF = "cnidose_csrf"
DEPARTMENT = "dermatology"  # the department that takes consultation requests
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]  # database ids: a larger one is a 422, not a crash


class LevelIn(BaseModel):
    value: float
    unit: str = "ng/mL"
    observed_at: dt.datetime
    blq: bool = False
    lloq: float | None = None
    assay: str | None = Field(default=None, max_length=32)
    sample: str = Field(default="trough", pattern="^(trough|c2|other)$")
    matrix: str = Field(default="whole blood", max_length=32)
    confirm: bool = Field(default=False, description="store despite the plausibility flags of a 409 answer")


class DoseIn(BaseModel):
    amount: float
    unit: str = "mg"
    given_at: dt.datetime
    product: str = Field(default="Prograf", max_length=64)
    route: str = "oral"
    infusion_h: float | None = None
    confirm: bool = Field(default=False, description="store despite the plausibility flags of a 409 answer")


class RegimenIn(BaseModel):
    product: str = Field(max_length=64)
    dose: float
    unit: str = "mg"
    interval_h: float
    start_at: dt.datetime
    route: str = "oral"
    confirm: bool = False


class MedicationIn(BaseModel):
    name: str = Field(max_length=64)
    start_on: dt.date
    stop_on: dt.date | None = None
    daily_mg: float | None = None


class StopIn(BaseModel):
    stop_on: dt.date


class BloodPressureIn(BaseModel):
    systolic: float
    diastolic: float
    observed_at: dt.datetime


class CovariateIn(BaseModel):
    name: str = Field(max_length=32)
    value: float
    unit: str = Field(max_length=16)
    measured_at: dt.datetime


class GenotypeIn(BaseModel):
    gene: str = Field(max_length=16)
    result: str = Field(max_length=64)
    source: str = Field(max_length=500)
    tested_on: dt.date | None = None


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
    transplant_date: dt.date | None = None
    therapy_start: dt.date | None = None
    conditions: list[str] | None = None


class LabIn(BaseModel):
    name: str = Field(max_length=64)
    value: float
    unit: str
    observed_at: dt.datetime


class SignIn(BaseModel):
    decision: str = Field(min_length=1, max_length=10_000)


class BookingIn(BaseModel):
    starts_at: dt.datetime
    minutes: int = 30
    reason: str | None = Field(default=None, max_length=2000)
    contact_name: str | None = Field(default=None, max_length=128)
    contact_email: str | None = Field(default=None, max_length=254)
    patient_id: int | None = None


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


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
               today: Callable[[], dt.date] | None = None) -> FastAPI:
    """The app over ``store``. ``secret_key`` signs sessions (default: random per process, so sessions end
    when it restarts); ``today`` fixes the clinical date (tests, demos)."""
    # no Swagger/ReDoc pages: they load their scripts from a CDN; the schema is at /api/v1/openapi.json
    app = FastAPI(title="cnidose", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/v1/openapi.json")
    sessions = Sessions(secret_key or os.environ.get("CNIDOSE_SECRET_KEY") or secrets.token_urlsafe(32))
    throttle = Throttle()
    tz = ZoneInfo(timezone or os.environ.get("CNIDOSE_TIMEZONE", "UTC"))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    vendor = {name: _vendor_file(*where) for name, where in VENDOR.items()}
    flights: dict[str, threading.Lock] = {}  # inputs key -> lock: one computation per key at a time
    computed: dict[str, int] = {}  # inputs key -> assessment id, for the requests that waited on the lock
    answers: dict[tuple[int, str, bool], bytes] = {}  # (assessment, status, computed now) -> the API's answer
    flights_lock = threading.Lock()

    def the_day() -> dt.date:
        return today() if today else dt.datetime.now(tz).date()

    # -- who is asking ---------------------------------------------------------------------------------------
    def current(request: Request) -> tuple[Actor, str] | None:
        data = sessions.read(request.cookies.get(Sessions.cookie))
        if data is None:
            return None
        try:
            return store.actor(int(data["uid"])), str(data["csrf"])
        except NotFound:
            return None

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

    @app.exception_handler(AccessDenied)
    async def _denied(request: Request, exc: AccessDenied) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return HTMLResponse(f"<h1>Forbidden</h1><p>{_esc(str(exc))}</p>", status_code=403)

    @app.exception_handler(NotFound)
    async def _missing(request: Request, exc: NotFound) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return HTMLResponse(f"<h1>Not found</h1><p>{_esc(str(exc))}</p>", status_code=404)

    @app.exception_handler(NeedsConfirmation)
    async def _confirm(request: Request, exc: NeedsConfirmation) -> Response:
        return JSONResponse({"detail": str(exc).split("] ", 1)[-1], "field": exc.field, "flags": exc.flags,
                             "confirm": "repeat the request with \"confirm\": true to store it with these flags"},
                            status_code=409)

    @app.exception_handler(FieldError)
    async def _field(request: Request, exc: FieldError) -> Response:
        return JSONResponse({"detail": [{"loc": ["body", exc.field], "msg": str(exc).split("] ", 1)[-1],
                                         "type": "value_error"}]}, status_code=422)

    @app.exception_handler(CnidoseError)
    async def _cnidose(request: Request, exc: CnidoseError) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"detail": json.loads(json.dumps(exc.errors(), default=str))}, status_code=422)

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
    def _login(request: Request, username: str, password: str) -> tuple[Actor, str, str] | str:
        addr = request.client.host if request.client else "unknown"
        wait = throttle.blocked(f"user:{username}", f"addr:{addr}")
        if wait > 0:
            store.record_event(Actor(username or "?", "anonymous"), "login-throttled", "session", None, None,
                               {"address": addr})
            return f"too many failed sign-ins: try again in {int(wait) + 1} s"
        u = store.user(username)
        if u is None or not u["active"] or not verify_password(u["password_hash"], password):
            throttle.fail(f"user:{username}", f"addr:{addr}")
            store.record_event(Actor(username or "?", "anonymous"), "login-failed", "session", None, None,
                               {"address": addr})
            return "wrong user name or password"
        throttle.clear(f"user:{username}")
        actor = store.actor(int(u["id"]))
        cookie, csrf = sessions.issue(int(u["id"]))
        store.record_event(actor, "login", "session", u["id"], actor.patient_id, {"address": addr})
        return actor, cookie, csrf

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        return render(request, "login.html", None, next=next, error=None)

    @app.post("/login", include_in_schema=False)
    def login_post(request: Request, username: str = Form(""), password: str = Form(""), csrf: str = Form(""),
                   next: str = Form("/")) -> Response:
        if not secrets.compare_digest(csrf, request.cookies.get(ANON_CSRF, "")) or not csrf:
            return render(request, "login.html", None, 403, next=next, error="the form expired: please try again")
        got = _login(request, username.strip(), password)
        if isinstance(got, str):
            return render(request, "login.html", None, 401, next=next, error=got, username=username)
        resp = RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/", status_code=303)
        resp.set_cookie(Sessions.cookie, got[1], httponly=True, samesite="lax", max_age=sessions.max_age_s)
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: str = Form("")) -> Response:
        who = current(request)
        if who is not None:
            check_csrf(who, csrf)
            store.record_event(who[0], "logout", "session", who[0].user_id)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(Sessions.cookie)
        return resp

    @app.post("/api/v1/session", tags=["session"])
    def api_login(request: Request, body: LoginIn) -> Response:
        got = _login(request, body.username.strip(), body.password)
        if isinstance(got, str):
            return JSONResponse({"detail": got}, status_code=429 if got.startswith("too many") else 401)
        resp = JSONResponse({"user": got[0].username, "role": got[0].role, "csrf": got[2]})
        resp.set_cookie(Sessions.cookie, got[1], httponly=True, samesite="lax", max_age=sessions.max_age_s)
        return resp

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

    def _summaries(actor: Actor) -> list[dict[str, Any]]:
        rows = store.patients(actor)
        out = []
        for p in rows:
            chart = store.chart(actor, int(p["id"]))
            clin = clinical_assessment(chart, the_day())
            levels = [o for o in chart.observations if o["category"] == "level" and o["status"] == "final"]
            out.append({**p, "alerts": clin["alerts"], "last_level": levels[-1] if levels else None})
        return out

    @app.get("/patients", response_class=HTMLResponse, include_in_schema=False)
    def patient_list(request: Request, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        if who[0].role == "patient":
            return RedirectResponse(f"/patients/{who[0].patient_id}", status_code=303)
        return render(request, "patients.html", who, patients=_summaries(who[0]))

    def patient_response(request: Request, who: tuple[Actor, str], pid: int, status: int = 200,
                         error: str | None = None, error_field: str | None = None,
                         confirm: dict[str, Any] | None = None) -> HTMLResponse:
        chart = store.chart(who[0], pid)
        curve = chart.assessments[-1]["result"].get("curve") if chart.assessments else None
        return render(request, "patient.html", who, status, chart=chart,
                      clinical=clinical_assessment(chart, the_day()), trends=trends(chart),
                      staff=who[0].role in ("clinician", "pharmacist"), error=error, error_field=error_field,
                      curve=curve, confirm=confirm, today=the_day())

    @app.get("/patients/{pid}", response_class=HTMLResponse, include_in_schema=False)
    def patient_page(request: Request, pid: Id, who: tuple[Actor, str] = Depends(page_user),
                     error_field: str | None = None, error: str | None = None) -> Response:
        return patient_response(request, who, pid, error=error, error_field=error_field)

    def _entry_form(request: Request, pid: int, who: tuple[Actor, str], add: Callable[[], Any],
                    fields: dict[str, str] | None = None) -> Response:
        """Run ``add``; a field error re-renders the page (422), a plausibility warning asks for confirmation
        (409: the same values, posted again with confirm=1, store the entry with its flags)."""
        try:
            add()
        except NeedsConfirmation as exc:
            return patient_response(request, who, pid, 409, confirm={
                "action": request.url.path, "flags": exc.flags, "field": exc.field, "fields": fields or {}})
        except FieldError as exc:
            return patient_response(request, who, pid, 422, str(exc).split("] ", 1)[-1], exc.field)
        return RedirectResponse(f"/patients/{pid}", status_code=303)

    @app.post("/patients/{pid}/levels", include_in_schema=False)
    def add_level_form(request: Request, pid: Id, value: str = Form(""), unit: str = Form("ng/mL"),
                       observed_at: str = Form(""), sample: str = Form("trough"), assay: str = Form(""),
                       confirm: str = Form(""), csrf: str = Form(""),
                       who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_level(
            who[0], pid, value=_form_number(value, "value"), unit=unit, sample=sample, assay=assay or None,
            observed_at=form_time(observed_at, "observed_at"), confirm=confirm == "1"),
            {"value": value, "unit": unit, "observed_at": observed_at, "sample": sample, "assay": assay})

    @app.post("/patients/{pid}/doses", include_in_schema=False)
    def add_dose_form(request: Request, pid: Id, amount: str = Form(""), unit: str = Form("mg"),
                      given_at: str = Form(""), product: str = Form("Prograf"), route: str = Form("oral"),
                      confirm: str = Form(""), csrf: str = Form(""),
                      who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_dose(
            who[0], pid, product=product, amount=_form_number(amount, "amount"), unit=unit, route=route,
            given_at=form_time(given_at, "given_at"), confirm=confirm == "1"),
            {"amount": amount, "unit": unit, "given_at": given_at, "product": product, "route": route})

    @app.post("/patients/{pid}/regimens", include_in_schema=False)
    def add_regimen_form(request: Request, pid: Id, product: str = Form(""), dose: str = Form(""),
                         interval_h: str = Form(""), start_at: str = Form(""), route: str = Form("oral"),
                         confirm: str = Form(""), csrf: str = Form(""),
                         who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)

        def add() -> None:
            agent = store.chart(who[0], pid, assessments="latest").patient["agent"]
            store.add_regimen(who[0], pid, drug=agent, product=product, dose=_form_number(dose, "dose"), unit="mg",
                              interval_h=_form_number(interval_h, "interval_h"),
                              start_at=form_time(start_at, "start_at"), route=route, confirm=confirm == "1")
        return _entry_form(request, pid, who, add, {"product": product, "dose": dose, "interval_h": interval_h,
                                                    "start_at": start_at, "route": route})

    @app.post("/patients/{pid}/medications", include_in_schema=False)
    def add_medication_form(request: Request, pid: Id, name: str = Form(""), start_on: str = Form(""),
                            stop_on: str = Form(""), daily_mg: str = Form(""), csrf: str = Form(""),
                            who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_medication(
            who[0], pid, name=name, start_on=start_on, stop_on=stop_on or None,
            daily_mg=_form_number(daily_mg, "daily_mg") if daily_mg else None))

    @app.post("/patients/{pid}/medications/{mid}/stop", include_in_schema=False)
    def stop_medication_form(request: Request, pid: Id, mid: Id, stop_on: str = Form(""), csrf: str = Form(""),
                             who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.stop_medication(who[0], mid, stop_on))

    @app.post("/patients/{pid}/vitals", include_in_schema=False)
    def add_bp_form(request: Request, pid: Id, systolic: str = Form(""), diastolic: str = Form(""),
                    observed_at: str = Form(""), csrf: str = Form(""),
                    who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_blood_pressure(
            who[0], pid, systolic=_form_number(systolic, "systolic"), diastolic=_form_number(diastolic, "diastolic"),
            observed_at=form_time(observed_at, "observed_at")))

    @app.post("/patients/{pid}/covariates", include_in_schema=False)
    def add_covariate_form(request: Request, pid: Id, name: str = Form(""), value: str = Form(""),
                           unit: str = Form(""), measured_at: str = Form(""), csrf: str = Form(""),
                           who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_covariate(
            who[0], pid, name, _form_number(value, "value"), unit, form_time(measured_at, "measured_at")))

    @app.post("/patients/{pid}/genotypes", include_in_schema=False)
    def add_genotype_form(request: Request, pid: Id, gene: str = Form(""), result: str = Form(""),
                          source: str = Form(""), tested_on: str = Form(""), csrf: str = Form(""),
                          who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_genotype(
            who[0], pid, gene=gene, result=result, source=source, tested_on=tested_on or None))

    @app.post("/patients/{pid}/record", include_in_schema=False)
    def update_record_form(request: Request, pid: Id, region: str = Form(""), indication: str = Form(""),
                           severity: str = Form(""), product: str = Form(""), route: str = Form(""),
                           csrf: str = Form(""), who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        given = {k: v for k, v in {"region": region, "indication": indication, "severity": severity,
                                   "product": product, "route": route}.items() if v}
        return _entry_form(request, pid, who, lambda: store.update_patient(who[0], pid, **given))

    @app.post("/patients/{pid}/entries/{kind}/{eid}/withdraw", include_in_schema=False)
    def withdraw_form(request: Request, pid: Id, kind: str, eid: Id, reason: str = Form(""), csrf: str = Form(""),
                      who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        if kind not in ENTRY_TABLES:
            raise HTTPException(404, "no such kind of entry")
        return _entry_form(request, pid, who, lambda: store.mark_entered_in_error(
            who[0], kind, eid, reason, patient_id=pid))

    @app.post("/patients/{pid}/labs", include_in_schema=False)
    def add_lab_form(request: Request, pid: Id, name: str = Form(""), value: str = Form(""), unit: str = Form(""),
                     observed_at: str = Form(""), csrf: str = Form(""),
                     who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        return _entry_form(request, pid, who, lambda: store.add_lab(
            who[0], pid, name=name, value=_form_number(value, "value"), unit=unit,
            observed_at=form_time(observed_at, "observed_at")))

    def _run_assessment(actor: Actor, pid: int) -> tuple[int, bool, dict[str, Any] | None]:
        """The assessment of the patient's chart as it is now: (id, computed now, the stored row when it was
        already read). The analysis is a function of its inputs (the chart's entries, the date, the settings and
        this version), so when the newest stored assessment has exactly these inputs it is returned instead of a
        duplicate -- compared first by the patient's revision (raised by the database on every change of an
        entry) without reading the chart; concurrent requests for the same inputs in this process compute once."""
        store.authorize(actor, "write", "assessment", pid)
        patient, latest = store.latest_assessment(actor, pid)
        if latest is not None and _same_inputs(latest, _reuse_key(patient, the_day())):
            return int(latest["id"]), False, latest
        chart = store.chart(actor, pid, assessments="latest")
        inputs = _analysis_inputs(chart, the_day())
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
                result = analyse(chart, the_day(), **ANALYSIS)
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
    def assess_form(request: Request, pid: Id, csrf: str = Form(""),
                    who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        aid, _, _ = _run_assessment(who[0], pid)
        return RedirectResponse(f"/patients/{pid}#assessment-{aid}", status_code=303)

    @app.post("/assessments/{aid}/sign", include_in_schema=False)
    def sign_form(request: Request, aid: Id, decision: str = Form(""), pid: int = Form(0), csrf: str = Form(""),
                  who: tuple[Actor, str] = Depends(page_user)) -> Response:
        check_csrf(who, csrf)
        try:
            store.sign_assessment(who[0], aid, decision)
        except FieldError as exc:
            return RedirectResponse(f"/patients/{pid}?error_field={exc.field}&error={_q(str(exc))}", status_code=303)
        return RedirectResponse(f"/patients/{pid}#assessment-{aid}", status_code=303)

    @app.post("/patients/{pid}/follow-ups", include_in_schema=False)
    def follow_ups(request: Request, pid: Id, csrf: str = Form(""), department: str = Form("transplant clinic"),
                   who: tuple[Actor, str] = Depends(page_user)) -> Response:
        """Book every follow-up the assessment says is due (09:00, the app's time zone), skipping taken slots."""
        check_csrf(who, csrf)
        store.authorize(who[0], "schedule", "follow-ups", pid)
        chart = store.chart(who[0], pid)
        for d in clinical_assessment(chart, the_day())["due"]:
            day = dt.date.fromisoformat(d["date"])
            if day < the_day() or any(a["source"] == d["source"] and a["starts_at"].date() == day
                                      for a in chart.appointments):
                continue
            for hour in range(9, 17):
                try:
                    store.book(who[0], department=department, kind="follow-up",
                               starts_at=dt.datetime(day.year, day.month, day.day, hour, tzinfo=tz),
                               patient_id=pid, reason=d["what"], source=d["source"])
                    break
                except FieldError as exc:
                    if exc.field != "starts_at":
                        raise
        return RedirectResponse(f"/patients/{pid}#appointments", status_code=303)

    @app.get("/appointments/{appt_id}.ics", include_in_schema=False)
    def ics(request: Request, appt_id: Id, who: tuple[Actor, str] = Depends(page_user)) -> Response:
        pid = store.appointment_patient(who[0], appt_id)
        a = next(x for x in store.chart(who[0], pid).appointments if x["id"] == appt_id)
        return Response(_ics(a), media_type="text/calendar",
                        headers={"Content-Disposition": f'attachment; filename="appointment-{appt_id}.ics"'})

    @app.get("/book", response_class=HTMLResponse, include_in_schema=False)
    def book_page(request: Request) -> Response:
        return render(request, "book.html", current(request), done=None, error=None, error_field=None, form={})

    @app.post("/book", response_class=HTMLResponse, include_in_schema=False)
    def book_post(request: Request, starts_at: str = Form(""), reason: str = Form(""), contact_name: str = Form(""),
                  contact_email: str = Form(""), csrf: str = Form("")) -> Response:
        who = current(request)
        if who is not None:
            check_csrf(who, csrf)
        elif not csrf or not secrets.compare_digest(csrf, request.cookies.get(ANON_CSRF, "")):
            raise HTTPException(403, "the form expired: please reload it")
        actor = who[0] if who else PUBLIC
        form = {"starts_at": starts_at, "reason": reason, "contact_name": contact_name, "contact_email": contact_email}
        try:
            aid = store.book(actor, department=DEPARTMENT, starts_at=form_time(starts_at, "starts_at"),
                             reason=reason or None, contact_name=contact_name or None,
                             contact_email=contact_email or None,
                             patient_id=actor.patient_id if actor.role == "patient" else None)
        except FieldError as exc:
            return render(request, "book.html", who, 422, done=None, error=str(exc).split("] ", 1)[-1],
                          error_field=exc.field, form=form)
        return render(request, "book.html", who, done=aid, error=None, error_field=None, form={})

    @app.get("/calendar", response_class=HTMLResponse, include_in_schema=False)
    def calendar_page(request: Request, department: str = DEPARTMENT, who: tuple[Actor, str] = Depends(page_user)
                      ) -> Response:
        start = dt.datetime.combine(the_day(), dt.time(0), tzinfo=tz)
        rows = store.calendar(who[0], department, start, start + dt.timedelta(days=60))
        return render(request, "calendar.html", who, rows=rows, department=department)

    @app.post("/appointments/{appt_id}/status", include_in_schema=False)
    def appt_status(request: Request, appt_id: Id, status: str = Form(""), department: str = Form(DEPARTMENT),
                    csrf: str = Form(""), who: tuple[Actor, str] = Depends(page_user)) -> Response:
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
        body = _report_pdf(chart, clinical_assessment(chart, the_day()), the_day())
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
    def api_recommend(pid: Id, who: tuple[Actor, str] = Depends(api_user)) -> Response:
        """Fit and recommend on the chart as it is (201, stored as a draft); when the newest stored assessment
        has exactly these inputs, that one is returned instead (200, ``"reused": true``). The result's plot data
        (``curve``, tens of kB) is left out here: ``GET /api/v1/assessments/{id}`` (``curve_url``) has it."""
        aid, fresh, row = _run_assessment(who[0], pid)
        row = row if row is not None else store.assessment(who[0], aid)
        key = (aid, row["status"], fresh)  # a stored assessment changes only when it is signed
        body = answers.get(key)
        if body is None:
            result = {k: v for k, v in row["result"].items() if k != "curve"}
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
        store.sign_assessment(who[0], aid, body.decision)
        return {"id": aid, "status": "signed"}

    @app.post("/api/v1/bookings", status_code=201, tags=["appointments"])
    def api_book(request: Request, body: BookingIn) -> dict[str, Any]:
        who = api_caller(request)
        actor = who[0] if who else PUBLIC
        aid = store.book(actor, department=DEPARTMENT, starts_at=body.starts_at, minutes=body.minutes,
                         reason=body.reason, contact_name=body.contact_name, contact_email=body.contact_email,
                         patient_id=body.patient_id)
        return {"id": aid, "status": "confirmed" if actor.role in ("clinician", "pharmacist") else "requested"}

    @app.get("/api/v1/calendar", tags=["appointments"])
    def api_calendar(start: dt.datetime, end: dt.datetime, department: str = DEPARTMENT,
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

    app.state.store = store
    return app


def app_from_env() -> FastAPI:
    """The app over ``CNIDOSE_DATABASE_URL`` (schema already migrated): the factory ``cnidose serve
    --workers N`` gives each uvicorn worker process."""
    from cnidose.records.db import make_engine

    return create_app(Store(make_engine()))


def _report_pdf(chart: Any, clinical: dict[str, Any], today: dt.date) -> bytes:
    """The printable report as a PDF: patient, alerts, the latest recommendation with its provenance and
    decision, levels, regimens."""
    from cnidose.web.pdf import text_pdf

    p = chart.patient
    lines: list[tuple[str, str]] = [
        ("h1", "Therapeutic drug monitoring report"),
        ("p", f"{p['family_name']}, {p['given_name']} - MRN {p['mrn']} - born {p['birth_date']} - {p['sex']}"),
        ("p", f"{p['agent']} for {p['indication']}" + (f"; transplanted {p['transplant_date']}"
                                                      if p.get("transplant_date") else "")
         + f" - printed {today.isoformat()} by cnidose {__version__}"),
        ("h2", "Alerts")]
    lines += [("p", f"[{a['severity']}] {a['message']} ({a['source']})") for a in clinical["alerts"]] or [
        ("p", "None.")]
    if clinical["due"]:
        lines.append(("h2", "Due"))
        lines += [("p", f"{d['date']}: {d['what']} ({d['source']})") for d in clinical["due"][:8]]
    if chart.assessments:
        a = chart.assessments[-1]
        r = a["result"]
        lines.append(("h2", f"Latest {a['kind']} ({a['status']}, {a['created_at']:%Y-%m-%d %H:%M} UTC)"))
        if r.get("recommendation"):
            lines += [("p", r["recommendation"]["summary"]), ("p", f"Target: {r.get('target')}"),
                      ("p", f"Model: {r.get('model')}; cnidose {a['package_version']}; "
                            f"choice rule: {r['recommendation']['inputs'].get('choice', 'smallest')}")]
        if a.get("decision"):
            lines.append(("p", f"Decision: {a['decision']} (signed {a['signed_at']:%Y-%m-%d %H:%M} UTC)"))
        lines += [("p", f"Warning: {w}") for w in r.get("warnings", [])]
    lines.append(("h2", "Drug levels"))
    lines += [("p", f"{o['observed_at']:%Y-%m-%d %H:%M} UTC  {o['value']:.3g} {o['unit']}"
                    + (" (below LLOQ)" if o["blq"] else ""))
              for o in chart.observations if o["category"] == "level" and o["status"] == "final"] or [
        ("p", "None recorded.")]
    lines.append(("h2", "Regimens"))
    lines += [("p", f"{r['product']} {r['dose_mg']:g} mg every {r['interval_h']:g} h from "
                    f"{r['start_at']:%Y-%m-%d}" + (f" to {r['stop_at']:%Y-%m-%d}" if r["stop_at"] else ""))
              for r in chart.regimens if r["status"] == "final"] or [("p", "None recorded.")]
    return text_pdf(lines, title=f"cnidose report {p['mrn']}")


#: how the app analyses a chart (recorded in every assessment's inputs)
ANALYSIS: dict[str, Any] = {"n_draws": 500, "seed": 0, "choice": "most-likely"}


def _reuse_key(patient: dict[str, Any], as_of: dt.date) -> dict[str, Any]:
    """When two analyses have equal keys their inputs are equal: the patient row and its revision (raised on every
    change of an entry), the date, the settings and the package version."""
    row = {k: v for k, v in patient.items() if k != "revision"}
    return {"patient_revision": int(patient["revision"]), "patient_sha256": hashlib.sha256(
        json.dumps(row, default=str, sort_keys=True).encode()).hexdigest(), "as_of": as_of.isoformat(),
        "settings": ANALYSIS, "version": __version__}


def _analysis_inputs(chart: Any, as_of: dt.date) -> dict[str, Any]:
    """What an analysis depends on, recorded with it: a hash of the chart's entries (patient, covariates, regimens,
    doses, observations, medications; statuses included), the counts, and the reuse key."""
    entries = [chart.patient, chart.covariates, chart.regimens, chart.doses, chart.observations, chart.medications]
    return {"as_of": as_of.isoformat(), "chart_sha256": hashlib.sha256(
        json.dumps(entries, default=str, sort_keys=True).encode()).hexdigest(),
        "doses": len(chart.doses), "observations": len(chart.observations), "settings": ANALYSIS,
        "reuse": _reuse_key(chart.patient, as_of)}


def _same_inputs(assessment: dict[str, Any], key: dict[str, Any]) -> bool:
    """Whether ``assessment`` was made from inputs with this reuse key (JSON values only; it holds the version)."""
    inputs = assessment["inputs"]
    return isinstance(inputs, dict) and inputs.get("reuse") == key


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


def _ics(a: dict[str, Any]) -> str:
    """An iCalendar (RFC 5545) event for one appointment."""
    def stamp(t: dt.datetime) -> str:
        return t.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    def text(s: str) -> str:
        return s.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\n", "\\n")

    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//cnidose//appointments//EN", "BEGIN:VEVENT",
             f"UID:cnidose-appointment-{a['id']}", f"DTSTAMP:{stamp(a['created_at'])}",
             f"DTSTART:{stamp(a['starts_at'])}", f"DTEND:{stamp(a['ends_at'])}",
             f"SUMMARY:{text(a['department'].title() + ' ' + a['kind'])}",
             f"STATUS:{'CONFIRMED' if a['status'] == 'confirmed' else 'TENTATIVE'}"]
    if a.get("reason"):
        lines.append(f"DESCRIPTION:{text(a['reason'])}")
    lines += ["END:VEVENT", "END:VCALENDAR"]
    return "\r\n".join(lines) + "\r\n"
