"""The clinical record's repository. Every read and write of patient data goes through a :class:`Store`
method, which

1. checks the actor's role against :data:`PERMISSIONS` (a patient reaches only their own record; an
   administrator manages users and reads the audit log, not clinical data) -- a refusal raises
   :class:`AccessDenied` and leaves a ``denied`` audit row;
2. validates the input at the boundary (units, plausibility, time zones): errors name the field, and
   nothing is stored;
3. writes the change and its audit row in one transaction: there is never one without the other.

Nothing clinical is deleted: :meth:`Store.mark_entered_in_error` keeps the entry with its reason. A signed
assessment is immutable, and the audit log append-only, in the database itself (triggers).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Table, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cnidose.clinical.codes import loinc
from cnidose.errors import CnidoseError, InputError
from cnidose.records import schema as S
from cnidose.records.units import DRUGS, FieldError, covariate_value, dose_mg, level_ng_ml

__all__ = ["PERMISSIONS", "PUBLIC", "SYSTEM", "YEARS", "AccessDenied", "Actor", "Chart", "NotFound", "SlotTaken",
           "Store"]

#: action -> roles allowed. "patient" is allowed only on the patient's own record (checked per call).
PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset({"clinician", "pharmacist", "patient", "system"}),
    "write": frozenset({"clinician", "pharmacist", "system"}),
    "sign": frozenset({"clinician", "pharmacist"}),
    "book": frozenset({"clinician", "pharmacist", "patient", "system", "public"}),
    "schedule": frozenset({"clinician", "pharmacist", "system"}),  # confirm, cancel, see the calendar
    "users": frozenset({"admin", "system"}),
    "audit": frozenset({"admin"}),
}
AUDIT: Table = S.AuditEntry.__table__  # type: ignore[assignment]
PATIENTS: Table = S.Patient.__table__  # type: ignore[assignment]
ENTRY_TABLES: dict[str, type[Any]] = {"covariate": S.Covariate, "regimen": S.Regimen, "dose": S.Dose,
                                      "observation": S.Observation, "medication": S.Medication,
                                      "genotype": S.Genotype}


class AccessDenied(CnidoseError):
    """The actor's role does not allow this action on this object."""


class NotFound(InputError):
    """No such object (or not one the actor may know about)."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a signed-in user (role, and for a patient their own record), the system, or the public."""

    username: str
    role: str
    user_id: int | None = None
    patient_id: int | None = None


SYSTEM = Actor("system", "system")
PUBLIC = Actor("public", "public")
#: device cookies kept per user (the newest)
DEVICES_PER_USER = 50


@dataclass(frozen=True, slots=True)
class Chart:
    """Everything stored about one patient, oldest first, entries in error included (with their status)."""

    patient: dict[str, Any]
    covariates: list[dict[str, Any]] = field(default_factory=list)
    regimens: list[dict[str, Any]] = field(default_factory=list)
    doses: list[dict[str, Any]] = field(default_factory=list)
    observations: list[dict[str, Any]] = field(default_factory=list)
    medications: list[dict[str, Any]] = field(default_factory=list)
    assessments: list[dict[str, Any]] = field(default_factory=list)
    appointments: list[dict[str, Any]] = field(default_factory=list)
    genotypes: list[dict[str, Any]] = field(default_factory=list)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


#: instants cnidose stores: outside, a typing error (and arithmetic near year 1 or 9999 would overflow)
YEARS = (1900, 2100)


def _aware(value: Any, field: str) -> dt.datetime:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise FieldError(f"not an ISO date-time: {value!r}", field=field) from None
    if not isinstance(value, dt.datetime):
        raise FieldError(f"expected a date-time, got {value!r}", field=field)
    if value.tzinfo is None or value.utcoffset() is None:
        raise FieldError(f"{value.isoformat()} has no time zone (give e.g. +01:00 or Z)", field=field)
    if not YEARS[0] <= value.year <= YEARS[1]:
        raise FieldError(f"{value.isoformat()} is outside {YEARS[0]}-{YEARS[1]}", field=field)
    return value.astimezone(dt.UTC)


def _date(value: Any, field: str) -> dt.date:
    if isinstance(value, dt.datetime):
        d = value.date()
    elif isinstance(value, dt.date):
        d = value
    else:
        try:
            d = dt.date.fromisoformat(str(value))
        except ValueError:
            raise FieldError(f"not an ISO date: {value!r}", field=field) from None
    if not YEARS[0] <= d.year <= YEARS[1]:
        raise FieldError(f"{d.isoformat()} is outside {YEARS[0]}-{YEARS[1]}", field=field)
    return d


def _text(value: Any, field: str, *, max_len: int, allow_empty: bool = False) -> str:
    s = "" if value is None else str(value).strip()
    if not s and not allow_empty:
        raise FieldError("required", field=field)
    if len(s) > max_len:
        raise FieldError(f"at most {max_len} characters", field=field)
    return s


def _row(obj: Any) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


def _chart_queries() -> dict[str, Any]:
    pid: Any = bindparam("pid")

    def part(model: Any, order: str, limit: int | None = None) -> Any:
        t = model.__table__
        q = select(t).where(t.c.patient_id == pid)
        if model is S.Assessment:  # with the signer's name
            signer = S.User.__table__.alias("signer")
            q = select(t, signer.c.username.label("signed_by_name")).outerjoin(
                signer, signer.c.id == t.c.signed_by).where(t.c.patient_id == pid)
        if limit is None:
            return q.order_by(t.c[order], t.c.id)
        return q.order_by(t.c[order].desc(), t.c.id.desc()).limit(limit)

    return {"patient": select(PATIENTS).where(PATIENTS.c.id == pid),
            "covariates": part(S.Covariate, "measured_at"), "regimens": part(S.Regimen, "start_at"),
            "doses": part(S.Dose, "given_at"), "observations": part(S.Observation, "observed_at"),
            "medications": part(S.Medication, "start_on"), "assessments": part(S.Assessment, "created_at"),
            "genotypes": part(S.Genotype, "id"),
            "latest": part(S.Assessment, "created_at", 1), "appointments": part(S.Appointment, "starts_at")}


_ACTOR = select(S.User.id, S.User.username, S.User.role, S.User.patient_id, S.User.active).where(
    S.User.id == bindparam("uid"))
_SESSION = select(S.Session.user_id, S.Session.csrf, S.Session.created_at, S.Session.last_seen_at,
                  S.Session.revoked_at, S.User.username, S.User.role, S.User.patient_id, S.User.active).join(
    S.User, S.User.id == S.Session.user_id).where(S.Session.id == bindparam("sid"))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


#: booking: visits start on a quarter hour and last whole quarters; the public may ask for at most an hour
SLOT = dt.timedelta(minutes=15)
MINUTES = {"public": (15, 60), "staff": (15, 240)}


def _slots(start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    out, t = [], start
    while t < end:
        out.append(t)
        t += SLOT
    return out
#: the statements that read a chart, one per part, oldest first ("latest": the newest assessment only). The patient
#: row comes first: its revision is then never newer than the entries read after it (a result stored with that
#: revision is at worst computed again, never reused for entries it did not see).
_CHART = _chart_queries()


class Store:
    """The repository over one database (see :mod:`cnidose.records.db` for engines and migrations)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # SQLite has one writer at a time, and a thread that finds the database locked sleeps in steps (up to
        # 100 ms) before it tries again; threads of one process take turns here instead (almost every
        # transaction writes: reads leave an audit row). Other processes still meet SQLite's own lock.
        self._turn: threading.RLock | contextlib.nullcontext[None] = (
            threading.RLock() if engine.dialect.name == "sqlite" else contextlib.nullcontext())

    # -- plumbing -------------------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._turn, Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @staticmethod
    def _audit(session: Session, actor: Actor, action: str, object_type: str, object_id: Any = None,
               patient_id: int | None = None, detail: Any = None) -> None:
        # a table insert, executed now in the caller's transaction (no ORM object: audit rows are only written)
        session.execute(insert(AUDIT).values(
            at=_now(), user_id=actor.user_id, username=actor.username, role=actor.role, action=action,
            object_type=object_type, object_id=None if object_id is None else str(object_id), patient_id=patient_id,
            detail=None if detail is None else detail if isinstance(detail, str) else json.dumps(detail, default=str)))

    def _check(self, actor: Actor, action: str, object_type: str, patient_id: int | None = None,
               object_id: Any = None) -> None:
        allowed = actor.role in PERMISSIONS[action]
        own = patient_id is not None and patient_id == actor.patient_id
        if actor.role == "patient":  # only their own record; a booking request may name no record
            allowed = allowed and (own or (action == "book" and patient_id is None))
        elif actor.role == "public":  # the public reaches no record at all
            allowed = allowed and patient_id is None
        if not allowed:
            with self._tx() as s:
                self._audit(s, actor, "denied", object_type, object_id, patient_id, {"wanted": action})
            raise AccessDenied(f"{actor.username} ({actor.role}) may not {action} {object_type}"
                               + (f" of patient {patient_id}" if patient_id is not None else ""))

    @staticmethod
    def _get(s: Session, model: type[Any], object_id: int, kind: str) -> Any:
        obj = s.get(model, object_id)
        if obj is None:
            raise NotFound(f"no {kind} {object_id}")
        return obj

    def authorize(self, actor: Actor, action: str, object_type: str, patient_id: int | None = None) -> None:
        """Raise AccessDenied (and audit it) unless the actor may ``action`` (a key of PERMISSIONS)."""
        self._check(actor, action, object_type, patient_id)

    def _patient(self, s: Session, patient_id: int) -> S.Patient:
        p = s.get(S.Patient, patient_id)
        if p is None:
            raise NotFound(f"no patient {patient_id}")
        return p

    # -- users ----------------------------------------------------------------------------------------------
    def create_user(self, actor: Actor, username: str, password_hash: str, role: str,
                    patient_id: int | None = None) -> int:
        """A user (the password already hashed by the caller, e.g. argon2). Admin or system only."""
        self._check(actor, "users", "user")
        name = _text(username, "username", max_len=64)
        if role not in S.ROLES:
            raise FieldError(f"unknown role {role!r} (known: {', '.join(S.ROLES)})", field="role")
        if role == "patient" and patient_id is None:
            raise FieldError("a patient account needs the patient it belongs to", field="patient_id")
        try:
            with self._tx() as s:
                if patient_id is not None:
                    self._patient(s, patient_id)
                if s.scalar(select(S.User.id).where(S.User.username == name)) is not None:
                    raise FieldError(f"{name!r} is taken", field="username")
                u = S.User(username=name, password_hash=password_hash, role=role, patient_id=patient_id,
                           active=True, created_at=_now())
                s.add(u)
                s.flush()
                self._audit(s, actor, "create", "user", u.id, patient_id, {"username": name, "role": role})
                return int(u.id)
        except IntegrityError:
            raise FieldError(f"{name!r} is taken", field="username") from None

    def user(self, username: str) -> dict[str, Any] | None:
        """The user record for signing in (no patient data; the caller audits the attempt)."""
        with self._tx() as s:
            u = s.scalar(select(S.User).where(S.User.username == username))
            return None if u is None else _row(u)

    def actor(self, user_id: int) -> Actor:
        """The signed-in user as an actor, read on every request (a deactivated user is refused at once)."""
        with self.engine.connect() as conn:
            u = conn.execute(_ACTOR, {"uid": user_id}).first()
        if u is None or not u.active:
            raise NotFound(f"no active user {user_id}")
        return Actor(u.username, u.role, u.id, u.patient_id)

    def record_event(self, actor: Actor, action: str, object_type: str, object_id: Any = None,
                     patient_id: int | None = None, detail: Any = None) -> None:
        """An audit row for an event that is not a data change (sign-in, sign-out, a failed attempt, an export)."""
        with self._tx() as s:
            self._audit(s, actor, action, object_type, object_id, patient_id, detail)

    # -- sessions -------------------------------------------------------------------------------------------
    def open_session(self, user_id: int, address: str | None) -> tuple[str, str]:
        """A new sign-in: (token for the cookie, CSRF token). The database keeps only the token's SHA-256."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        now = _now()
        with self._tx() as s:
            s.execute(insert(S.Session.__table__).values(  # type: ignore[arg-type]
                id=_digest(token), user_id=user_id, csrf=csrf, created_at=now, last_seen_at=now,
                address=(address or "")[:64] or None))
        return token, csrf

    def session_actor(self, token: str | None, *, idle: dt.timedelta, absolute: dt.timedelta
                      ) -> tuple[Actor, str] | None:
        """The signed-in actor and CSRF token of a live session (not revoked, not idle for ``idle``, younger than
        ``absolute``, its user active); None otherwise. Use is recorded at most once a minute."""
        if not token or len(token) > 128:
            return None
        sid = _digest(token)
        now = _now()
        with self.engine.connect() as conn:
            row = conn.execute(_SESSION, {"sid": sid}).first()
        if row is None or row.revoked_at is not None or not row.active:
            return None
        created, seen = _utc(row.created_at), _utc(row.last_seen_at)
        if now - created > absolute or now - seen > idle:
            return None
        if now - seen > dt.timedelta(seconds=60):
            with self._tx() as s:
                s.execute(update(S.Session).where(S.Session.id == sid).values(last_seen_at=now))
        return Actor(row.username, row.role, row.user_id, row.patient_id), str(row.csrf)

    def revoke_session(self, token: str) -> None:
        with self._tx() as s:
            s.execute(update(S.Session).where(S.Session.id == _digest(token),
                                                        S.Session.revoked_at.is_(None)).values(revoked_at=_now()))

    def revoke_sessions(self, actor: Actor, user_id: int, *, keep: str | None = None) -> int:
        """End every session of a user (an administrator, or the user themself); returns how many."""
        if actor.user_id != user_id:
            self._check(actor, "users", "session", None, user_id)
        with self._tx() as s:
            q = update(S.Session).where(S.Session.user_id == user_id, S.Session.revoked_at.is_(None))
            if keep is not None:
                q = q.where(S.Session.id != _digest(keep))
            result: Any = s.execute(q.values(revoked_at=_now()))
            n = int(result.rowcount or 0)
            self._audit(s, actor, "revoke", "session", user_id, None, {"sessions": n})
            return n

    def remember_device(self, user_id: int, *, max_age: dt.timedelta) -> str:
        """A device cookie's token for a user who has just signed in (the database keeps its SHA-256); the user's
        devices older than ``max_age`` are forgotten, and all but the newest ``DEVICES_PER_USER`` (a script that
        signs in without keeping cookies would otherwise add a row at every sign-in)."""
        token = secrets.token_urlsafe(32)
        d = S.SignInDevice
        with self._tx() as s:
            s.execute(delete(d).where(d.user_id == user_id, d.created_at < _now() - max_age))
            s.execute(insert(d.__table__).values(  # type: ignore[arg-type]
                id=_digest(token), user_id=user_id, created_at=_now()))
            newest = select(d.id).where(d.user_id == user_id).order_by(d.created_at.desc()).limit(DEVICES_PER_USER)
            s.execute(delete(d).where(d.user_id == user_id, d.id.not_in(newest.scalar_subquery())))
        return token

    def device_user(self, token: str | None, *, max_age: dt.timedelta) -> int | None:
        """The user a device cookie was issued to, if it is known and younger than ``max_age``."""
        if not token or len(token) > 128:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(S.SignInDevice.user_id, S.SignInDevice.created_at)
                               .where(S.SignInDevice.id == _digest(token))).first()
        if row is None or _now() - _utc(row.created_at) > max_age:
            return None
        return int(row.user_id)

    def set_password(self, actor: Actor, user_id: int, password_hash: str, *, keep: str | None = None) -> None:
        """A new password (hashed by the caller) for the user themself or, by an administrator, for anyone; every
        other session of the user ends."""
        if actor.user_id != user_id:
            self._check(actor, "users", "user", None, user_id)
        with self._tx() as s:
            u = self._get(s, S.User, user_id, "user")
            u.password_hash = password_hash
            self._audit(s, actor, "update", "user", user_id, None, {"password": "changed"})
        self.revoke_sessions(actor, user_id, keep=keep)

    def upgrade_password_hash(self, user_id: int, password_hash: str) -> None:
        """The same password hashed with today's parameters (at a successful sign-in): no session ends."""
        with self._tx() as s:
            u = self._get(s, S.User, user_id, "user")
            u.password_hash = password_hash
            self._audit(s, SYSTEM, "update", "user", user_id, None, {"password_hash": "upgraded to today's parameters"})

    def set_user_active(self, actor: Actor, user_id: int, active: bool) -> None:
        """Deactivate (or reactivate) a user: an administrator's action; a deactivated user's sessions end."""
        self._check(actor, "users", "user", None, user_id)
        with self._tx() as s:
            u = self._get(s, S.User, user_id, "user")
            u.active = active
            self._audit(s, actor, "update", "user", user_id, None, {"active": active})
        if not active:
            self.revoke_sessions(actor, user_id)

    # -- patients -------------------------------------------------------------------------------------------
    def add_patient(self, actor: Actor, *, mrn: str, family_name: str, given_name: str, birth_date: Any,
                    sex: str, agent: str, indication: str, therapy_start: Any = None,
                    transplant_date: Any = None) -> int:
        self._check(actor, "write", "patient")
        p = make_patient(mrn=mrn, family_name=family_name, given_name=given_name, birth_date=birth_date, sex=sex,
                         agent=agent, indication=indication, therapy_start=therapy_start,
                         transplant_date=transplant_date)
        with self._tx() as s:
            self._new_patient(s, p)
            self._audit(s, actor, "create", "patient", p.id, p.id)
            return int(p.id)

    @staticmethod
    def _new_patient(s: Session, p: S.Patient) -> None:
        if s.scalar(select(S.Patient.id).where(S.Patient.mrn == p.mrn)) is not None:
            raise FieldError(f"a patient with MRN {p.mrn!r} exists", field="mrn")
        p.created_at = p.updated_at = _now()
        s.add(p)
        s.flush()

    def import_patient(self, actor: Actor, patient: S.Patient, entries: list[tuple[str, Any]],
                       appointments: list[S.Appointment], source: str) -> int:
        """A whole patient (built by ``make_*``; entries keep their status) in one transaction: all or
        nothing. ``source`` names where it came from, for the audit row. Confirmed visits claim their slots like
        any other: one that clashes refuses the whole import."""
        self._check(actor, "write", "import")
        try:
            return self._import_patient(actor, patient, entries, appointments, source)
        except IntegrityError as exc:
            if "slot" not in str(exc.orig).lower():
                raise FieldError(f"the import conflicts with stored data: {exc.orig}", field="patient") from None
            raise SlotTaken("a confirmed visit of the import clashes with a confirmed visit already booked",
                            field="appointments") from None

    def _import_patient(self, actor: Actor, patient: S.Patient, entries: list[tuple[str, Any]],
                        appointments: list[S.Appointment], source: str) -> int:
        with self._tx() as s:
            self._new_patient(s, patient)
            self._write_entries(s, actor, patient.id, entries, source)
            now = _now()
            for a in appointments:
                a.patient_id, a.created_by, a.created_at = patient.id, actor.user_id, now
                a.reference = a.reference or secrets.token_urlsafe(12)
                s.add(a)
            s.flush()
            for a in appointments:
                if a.status == "confirmed":
                    clash = s.scalar(select(S.Appointment.id).where(
                        S.Appointment.id != a.id, S.Appointment.department == a.department,
                        S.Appointment.status == "confirmed", S.Appointment.starts_at < a.ends_at,
                        S.Appointment.ends_at > a.starts_at))
                    if clash is not None:
                        raise SlotTaken(f"a confirmed {a.department} visit at {a.starts_at.isoformat()} overlaps "
                                        f"confirmed appointment {clash}", field="appointments")
                    _claim(s, a)
            self._audit(s, actor, "import", "patient", patient.id, patient.id,
                        {"source": source, "entries": len(entries), "appointments": len(appointments)})
            return int(patient.id)

    def patients(self, actor: Actor) -> list[dict[str, Any]]:
        """Patients the actor may see (a patient: only their own), with their newest level and open alerts
        left to the caller."""
        query = select(S.Patient).order_by(S.Patient.family_name, S.Patient.id)
        if actor.role == "patient":
            self._check(actor, "read", "patient", actor.patient_id)
            query = query.where(S.Patient.id == actor.patient_id)
        else:
            self._check(actor, "read", "patient")
        with self._tx() as s:
            rows = [_row(p) for p in s.scalars(query)]
            self._audit(s, actor, "read", "patient-list", None, None, {"count": len(rows)})
            return rows

    def chart(self, actor: Actor, patient_id: int, *, assessments: str = "all") -> Chart:
        """Everything about one patient; audited as a read. ``assessments="latest"`` reads only the newest
        assessment (what a new recommendation is compared with) instead of all of them."""
        if assessments not in ("all", "latest"):
            raise ValueError(f"assessments must be 'all' or 'latest', not {assessments!r}")
        self._check(actor, "read", "patient", patient_id, patient_id)
        with self._tx() as s:
            # table rows through the session's connection, not ORM objects: the same dicts as _row() gives, from
            # statements built once (see _CHART), several times faster
            conn = s.connection()
            got = {part: [dict(r) for r in conn.execute(q, {"pid": patient_id}).mappings()]
                   for part, q in _CHART.items() if part != ("assessments" if assessments == "latest" else "latest")}
            if not got["patient"]:
                raise NotFound(f"no patient {patient_id}")
            if actor.role == "patient":  # a patient sees a recommendation once a clinician has signed it
                for part in ("assessments", "latest"):
                    got[part] = [a for a in got.get(part, []) if a["status"] == "signed"]
            chart = Chart(got["patient"][0], got["covariates"], got["regimens"], got["doses"], got["observations"],
                          got["medications"], got["assessments"] if assessments == "all" else got["latest"][::-1],
                          got["appointments"], got["genotypes"])
            self._audit(s, actor, "read", "patient", patient_id, patient_id)
            return chart

    def latest_assessment(self, actor: Actor, patient_id: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The patient row (with its ``revision``) and the newest assessment or None, audited as a read: what a
        request for a recommendation compares with before it reads the whole chart."""
        self._check(actor, "read", "patient", patient_id, patient_id)
        with self._tx() as s:
            conn = s.connection()
            p = conn.execute(_CHART["patient"], {"pid": patient_id}).mappings().first()
            if p is None:
                raise NotFound(f"no patient {patient_id}")
            latest = conn.execute(_CHART["latest"], {"pid": patient_id}).mappings().first()
            self._audit(s, actor, "read", "assessment", None if latest is None else latest["id"], patient_id,
                        {"newest": True})
            return dict(p), None if latest is None else dict(latest)

    # -- clinical entries -----------------------------------------------------------------------------------
    def _add(self, actor: Actor, patient_id: int, obj: Any, kind: str, detail: Any = None) -> int:
        self._check(actor, "write", kind, patient_id)
        with self._tx() as s:
            self._patient(s, patient_id)
            obj.patient_id = patient_id
            obj.entered_by = actor.user_id
            obj.entered_at = _now()
            obj.status = "final"
            s.add(obj)
            s.flush()
            self._audit(s, actor, "create", kind, obj.id, patient_id, detail)
            return int(obj.id)

    def add_covariate(self, actor: Actor, patient_id: int, name: str, value: Any, unit: str,
                      measured_at: Any) -> int:
        return self._add(actor, patient_id, make_covariate(name=name, value=value, unit=unit,
                                                           measured_at=measured_at), "covariate")

    def add_regimen(self, actor: Actor, patient_id: int, *, drug: str, product: str, dose: Any, unit: str,
                    interval_h: Any, start_at: Any, stop_at: Any = None, route: str = "oral",
                    confirm: bool = False) -> int:
        """A regimen from ``start_at``: a regimen change. The open regimen of the same drug that started before it
        is closed at ``start_at`` (audited), so the record always knows the current dose. A product cnidose does
        not list is a plausibility flag (confirm); a misspelt one is refused."""
        from cnidose.records.plausibility import NeedsConfirmation, check_product

        obj = make_regimen(drug=drug, product=product, dose=dose, unit=unit, interval_h=interval_h,
                           start_at=start_at, stop_at=stop_at, route=route)
        flags = check_product(obj.drug, obj.product)
        if flags and not confirm:
            raise NeedsConfirmation(flags, field="product")
        obj.flags = flags or None
        self._check(actor, "write", "regimen", patient_id)
        with self._tx() as s:
            self._patient(s, patient_id)
            open_ = s.scalars(select(S.Regimen).where(
                S.Regimen.patient_id == patient_id, S.Regimen.drug == obj.drug, S.Regimen.status == "final",
                S.Regimen.stop_at.is_(None), S.Regimen.start_at < obj.start_at)).all()
            for r in open_:
                r.stop_at = obj.start_at
                self._audit(s, actor, "update", "regimen", r.id, patient_id,
                            {"stop_at": obj.start_at.isoformat(), "why": "replaced by a new regimen"})
            obj.patient_id, obj.entered_by, obj.entered_at, obj.status = patient_id, actor.user_id, _now(), "final"
            s.add(obj)
            s.flush()
            self._audit(s, actor, "create", "regimen", obj.id, patient_id,
                        {"flags": flags, "confirmed": True} if flags else None)
            return int(obj.id)

    def stop_medication(self, actor: Actor, medication_id: int, stop_on: Any) -> None:
        """The day another drug was stopped (audited; the interaction's offset then runs from it)."""
        stop = _date(stop_on, "stop_on")
        with self._tx() as s:
            pid = int(self._get(s, S.Medication, medication_id, "medication").patient_id)
        self._check(actor, "write", "medication", pid, medication_id)
        with self._tx() as s:
            m = self._get(s, S.Medication, medication_id, "medication")
            if m.status != "final":
                raise FieldError("this medication is marked entered-in-error", field="status")
            if stop < m.start_on:
                raise FieldError("stops before it starts", field="stop_on")
            m.stop_on = stop
            self._audit(s, actor, "update", "medication", medication_id, pid, {"stop_on": stop.isoformat()})

    def add_genotype(self, actor: Actor, patient_id: int, *, gene: str, result: str, source: str,
                     tested_on: Any = None) -> int:
        """A pharmacogenetic result with its source (checked as the patient record checks it)."""
        return self._add(actor, patient_id, make_genotype(gene=gene, result=result, source=source,
                                                          tested_on=tested_on), "genotype")

    def update_patient(self, actor: Actor, patient_id: int, **fields: Any) -> None:
        """Change the patient's record-level fields (region, indication and its code, severity, product, route,
        strength, donor, transplant date, therapy start, conditions); audited with the old and new values."""
        from cnidose.clinical.record import RecordError, resolve_indication, routes

        allowed = {"region", "indication", "severity", "product", "route", "strength_percent", "donor_type",
                   "donor_cyp3a5", "transplant_date", "therapy_start", "conditions"}
        unknown = set(fields) - allowed
        if unknown:
            raise FieldError(f"cannot change {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
        self._check(actor, "write", "patient", patient_id)
        with self._tx() as s:
            p = self._patient(s, patient_id)
            changes: dict[str, Any] = {}
            for k, v in fields.items():
                if k == "region" and v not in ("EU", "US"):
                    raise FieldError("expected EU or US", field="region")
                if k == "indication":
                    try:
                        key, code, severity = resolve_indication(v)
                    except RecordError as exc:
                        raise FieldError(str(exc).split("] ", 1)[-1], field="indication") from None
                    changes |= {"indication": key, "indication_code": code.code, "indication_system": code.system}
                    if severity and "severity" not in fields:
                        changes["severity"] = severity
                    continue
                if k == "route" and v is not None and v not in routes(p.agent):
                    raise FieldError(f"{p.agent} is given {', '.join(routes(p.agent))}", field="route")
                if k == "donor_type" and v not in (None, "deceased", "living"):
                    raise FieldError("expected deceased or living", field="donor_type")
                if k in ("transplant_date", "therapy_start") and v not in (None, ""):
                    v = _date(v, k)
                    if v > _now().date():
                        raise FieldError(f"{v.isoformat()} is in the future", field=k)
                if k == "strength_percent" and v not in (None, ""):
                    v = _number_pos(v, k)
                if k == "conditions" and v is not None:
                    v = [_text(c, "conditions", max_len=200).lower() for c in v]
                if k in ("severity", "product", "donor_cyp3a5") and v not in (None, ""):
                    v = _text(v, k, max_len=64)
                changes[k] = v if v != "" else None
            old = {k: getattr(p, k) for k in changes}
            for k, v in changes.items():
                setattr(p, k, v)
            p.updated_at = _now()
            self._audit(s, actor, "update", "patient", patient_id, patient_id,
                        {"from": old, "to": changes})

    def _agent(self, actor: Actor, patient_id: int, kind: str) -> str:
        """The patient's calcineurin inhibitor, for an entry about to be written (no separate read audit: the
        write is audited)."""
        self._check(actor, "write", kind, patient_id)
        with self._tx() as s:
            return self._patient(s, patient_id).agent

    def add_dose(self, actor: Actor, patient_id: int, *, product: str, amount: Any, unit: str, given_at: Any,
                 drug: str | None = None, route: str = "oral", infusion_h: Any = None,
                 regimen_id: int | None = None, confirm: bool = False) -> int:
        """A dose of ``drug`` (default: the patient's agent). A dose far from the regimen, of another product or
        a duplicate is stored only with ``confirm`` and keeps its flags (:mod:`cnidose.records.plausibility`)."""
        from cnidose.records.plausibility import check_dose

        drug = drug or self._agent(actor, patient_id, "dose")
        obj = make_dose(drug=drug, product=product, amount=amount, unit=unit, given_at=given_at, route=route,
                        infusion_h=infusion_h, regimen_id=regimen_id)
        return self._add_checked(actor, patient_id, obj, "dose", lambda c: check_dose(
            c, obj.drug, obj.product, obj.amount_mg, obj.given_at), confirm, "amount")

    def add_level(self, actor: Actor, patient_id: int, *, value: Any, unit: str, observed_at: Any,
                  drug: str | None = None, blq: bool = False, lloq: Any = None, assay: str | None = None,
                  sample: str = "trough", matrix: str = "whole blood", confirm: bool = False) -> int:
        """A whole-blood level of ``drug`` (default: the patient's agent). A level before the first dose or the
        transplant, a duplicate, or one implausible for the regimen is stored only with ``confirm``."""
        from cnidose.records.plausibility import check_level

        drug = drug or self._agent(actor, patient_id, "observation")
        obj = make_level(drug=drug, value=value, unit=unit, observed_at=observed_at, blq=blq, lloq=lloq, assay=assay,
                         sample=sample, matrix=matrix)
        return self._add_checked(actor, patient_id, obj, "observation", lambda c: check_level(
            c, drug.lower(), obj.value, obj.observed_at), confirm, "value")

    def _add_checked(self, actor: Actor, patient_id: int, obj: Any, kind: str, check: Callable[[Chart], list[str]],
                     confirm: bool, field: str) -> int:
        """Write ``obj`` after its plausibility check against the chart, in one transaction: flagged entries need
        ``confirm`` and keep their flags."""
        from cnidose.records.plausibility import NeedsConfirmation

        self._check(actor, "write", kind, patient_id)
        with self._tx() as s:
            flags = check(self._snapshot(s, patient_id))
            if flags and not confirm:
                raise NeedsConfirmation(flags, field=field)
            obj.patient_id, obj.entered_by, obj.entered_at, obj.status = patient_id, actor.user_id, _now(), "final"
            obj.flags = flags or None
            s.add(obj)
            s.flush()
            self._audit(s, actor, "create", kind, obj.id, patient_id, {"flags": flags, "confirmed": True}
                        if flags else None)
            return int(obj.id)

    @staticmethod
    def _snapshot(s: Session, patient_id: int) -> Chart:
        """The patient's entries, read in the caller's transaction without an audit row (a check before a write)."""
        conn = s.connection()
        got = {part: [dict(r) for r in conn.execute(_CHART[part], {"pid": patient_id}).mappings()]
               for part in ("patient", "regimens", "doses", "observations")}
        if not got["patient"]:
            raise NotFound(f"no patient {patient_id}")
        return Chart(got["patient"][0], [], got["regimens"], got["doses"], got["observations"])

    def add_doses_and_levels(self, actor: Actor, patient_id: int, doses: list[dict[str, Any]],
                             levels: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Many doses and levels (keyword arguments of :meth:`add_dose` / :meth:`add_level`) in one
        transaction: all are validated first, and either all are stored or none."""
        self._check(actor, "write", "import", patient_id)
        ids = self.add_entries(actor, patient_id, [("dose", make_dose(**d)) for d in doses]
                               + [("observation", make_level(**lv)) for lv in levels], via="batch")
        return ids[:len(doses)], ids[len(doses):]

    def add_entries(self, actor: Actor, patient_id: int, entries: list[tuple[str, Any]], *, via: str) -> list[int]:
        """Entries built by the ``make_*`` functions, in one transaction (all or none), each audited."""
        self._check(actor, "write", "import", patient_id)
        with self._tx() as s:
            self._patient(s, patient_id)
            return self._write_entries(s, actor, patient_id, entries, via)

    def _write_entries(self, s: Session, actor: Actor, patient_id: int, entries: list[tuple[str, Any]],
                       via: str) -> list[int]:
        now = _now()
        for kind, obj in entries:
            if kind not in ENTRY_TABLES:
                raise FieldError(f"unknown entry kind {kind!r}", field="kind")
            obj.patient_id, obj.entered_by, obj.entered_at = patient_id, actor.user_id, now
            obj.status = obj.status or "final"  # an import may bring entered-in-error entries
            s.add(obj)
        s.flush()
        for kind, obj in entries:
            self._audit(s, actor, "create", kind, obj.id, patient_id, {"via": via})
        return [int(obj.id) for _, obj in entries]

    def add_lab(self, actor: Actor, patient_id: int, *, name: str, value: Any, unit: str, observed_at: Any) -> int:
        return self._add(actor, patient_id, make_lab(name=name, value=value, unit=unit, observed_at=observed_at),
                         "observation")

    def add_blood_pressure(self, actor: Actor, patient_id: int, *, systolic: Any, diastolic: Any,
                           observed_at: Any) -> tuple[int, int]:
        a, b = make_blood_pressure(systolic=systolic, diastolic=diastolic, observed_at=observed_at)
        return self._add(actor, patient_id, a, "observation"), self._add(actor, patient_id, b, "observation")

    def add_medication(self, actor: Actor, patient_id: int, *, name: str, start_on: Any, stop_on: Any = None,
                       daily_mg: Any = None, rxnorm: str | None = None) -> int:
        return self._add(actor, patient_id, make_medication(name=name, start_on=start_on, stop_on=stop_on,
                                                            daily_mg=daily_mg, rxnorm=rxnorm), "medication")

    def mark_entered_in_error(self, actor: Actor, kind: str, entry_id: int, reason: str,
                              patient_id: int | None = None) -> None:
        """Withdraw a wrong entry without deleting it: it stays, with status and reason, and is audited. With
        ``patient_id`` the entry must be that patient's (NotFound otherwise)."""
        model = ENTRY_TABLES.get(kind)
        if model is None:
            raise FieldError(f"unknown entry kind {kind!r} (known: {', '.join(ENTRY_TABLES)})", field="kind")
        why = _text(reason, "reason", max_len=2000)
        with self._tx() as s:
            pid = int(self._get(s, model, entry_id, kind).patient_id)
        if patient_id is not None and pid != patient_id:
            raise NotFound(f"no {kind} {entry_id} for patient {patient_id}")
        self._check(actor, "write", kind, pid, entry_id)
        with self._tx() as s:
            obj = self._get(s, model, entry_id, kind)
            if obj.status == "entered-in-error":
                raise FieldError(f"{kind} {entry_id} is already marked entered-in-error", field="status")
            obj.status, obj.status_reason = "entered-in-error", why
            self._audit(s, actor, "update", kind, entry_id, pid, {"status": "entered-in-error", "reason": why})

    # -- assessments and recommendations --------------------------------------------------------------------
    def save_assessment(self, actor: Actor, patient_id: int, *, kind: str, inputs: dict[str, Any],
                        result: dict[str, Any], model_ref: str | None, package_version: str) -> int:
        if kind not in ("recommendation", "assessment"):
            raise FieldError(f"unknown kind {kind!r}", field="kind")
        self._check(actor, "write", "assessment", patient_id)
        payload_in = json.loads(json.dumps(inputs, default=str))  # JSON-safe, as stored
        payload_out = json.loads(json.dumps(result, default=str))
        with self._tx() as s:
            self._patient(s, patient_id)
            a = S.Assessment(patient_id=patient_id, kind=kind, inputs=payload_in, result=payload_out,
                             model_ref=model_ref, package_version=package_version, created_by=actor.user_id,
                             created_at=_now(), status="draft")
            s.add(a)
            s.flush()
            self._audit(s, actor, "create", "assessment", a.id, patient_id, {"kind": kind, "model": model_ref})
            return int(a.id)

    def assessment(self, actor: Actor, assessment_id: int) -> dict[str, Any]:
        """One stored assessment with its inputs and result; audited as a read."""
        with self._tx() as s:
            pid = int(self._get(s, S.Assessment, assessment_id, "assessment").patient_id)
        self._check(actor, "read", "assessment", pid, assessment_id)
        with self._tx() as s:
            row = _row(self._get(s, S.Assessment, assessment_id, "assessment"))
            if actor.role == "patient" and row["status"] != "signed":
                raise NotFound(f"no assessment {assessment_id}")  # drafts are the clinicians' own
            signer = s.get(S.User, row["signed_by"]) if row["signed_by"] is not None else None
            row["signed_by_name"] = signer.username if signer is not None else None
            self._audit(s, actor, "read", "assessment", assessment_id, pid)
            return row

    def sign_assessment(self, actor: Actor, assessment_id: int, decision: str) -> None:
        """Record the decision taken and sign: from then on the assessment cannot change."""
        text = _text(decision, "decision", max_len=10_000)
        with self._tx() as s:
            pid = int(self._get(s, S.Assessment, assessment_id, "assessment").patient_id)
        self._check(actor, "sign", "assessment", pid, assessment_id)
        with self._tx() as s:
            a = self._get(s, S.Assessment, assessment_id, "assessment")
            if a.status == "signed":
                raise FieldError(f"assessment {assessment_id} is signed and cannot change", field="status")
            a.status, a.decision, a.signed_by, a.signed_at = "signed", text, actor.user_id, _now()
            self._audit(s, actor, "sign", "assessment", assessment_id, pid, {"decision": text})

    # -- appointments ---------------------------------------------------------------------------------------
    def book(self, actor: Actor, *, department: str, starts_at: Any, minutes: int = 30, kind: str = "consultation",
             patient_id: int | None = None, reason: str | None = None, contact_name: str | None = None,
             contact_email: str | None = None, source: str | None = None) -> int:
        """A booking request (patients, the public) or a booked visit (staff: confirmed at once). Visits start on
        a quarter hour and last whole quarters (the public: at most an hour). A confirmed visit claims its
        15-minute slots in the database (unique per department), so no second confirmed visit can share one,
        whoever writes; a clash tells the public only that the time is not available."""
        self._check(actor, "book", "appointment", patient_id)
        start = _aware(starts_at, "starts_at")
        staff = actor.role in PERMISSIONS["schedule"]
        lo, hi = MINUTES["staff" if staff else "public"]
        if not isinstance(minutes, int) or not lo <= minutes <= hi or minutes % 15:
            raise FieldError(f"a visit lasts {lo}-{hi} minutes, in quarters of an hour", field="minutes")
        if start.minute % 15 or start.second or start.microsecond:
            raise FieldError("visits start on the hour or a quarter past, half past or a quarter to", field="starts_at")
        if start < _now() - dt.timedelta(minutes=1):
            raise FieldError(f"{start.isoformat()} is in the past", field="starts_at")
        end = start + dt.timedelta(minutes=minutes)
        if actor.role in ("public", "patient"):
            contact_name = _text(contact_name, "contact_name", max_len=128) if actor.role == "public" else contact_name
            if actor.role == "public" or contact_email:
                contact_email = _email(contact_email)
        reason = None if reason in (None, "") else _text(reason, "reason", max_len=2000)
        dept = _text(department, "department", max_len=64).lower()
        try:
            with self._tx() as s:
                if patient_id is not None:
                    self._patient(s, patient_id)
                clash = s.scalar(select(S.Appointment.id).where(
                    S.Appointment.department == dept, S.Appointment.status == "confirmed",
                    S.Appointment.starts_at < end, S.Appointment.ends_at > start))
                if clash is not None:
                    raise _clash(staff, dept, start, clash)
                a = S.Appointment(patient_id=patient_id, department=dept, kind=_text(kind, "kind", max_len=32),
                                  starts_at=start, ends_at=end, status="confirmed" if staff else "requested",
                                  reason=reason, contact_name=contact_name, contact_email=contact_email,
                                  source=None if source is None else _text(source, "source", max_len=128),
                                  created_by=actor.user_id, created_at=_now(), reference=secrets.token_urlsafe(12))
                s.add(a)
                s.flush()
                if a.status == "confirmed":
                    _claim(s, a)
                self._audit(s, actor, "create", "appointment", a.id, patient_id, {"department": dept,
                                                                                  "starts_at": start.isoformat()})
                return int(a.id)
        except IntegrityError:  # another writer took a slot between the check and the commit
            raise _clash(staff, dept, start, None) from None

    def booking_reference(self, appointment_id: int) -> str:
        """The opaque reference of a booking just made (what its requester is told)."""
        with self._tx() as s:
            return str(self._get(s, S.Appointment, appointment_id, "appointment").reference)

    def appointment_by_reference(self, reference: str) -> dict[str, Any]:
        """A booking request by its opaque reference (what the public is told), without the patient's data."""
        with self._tx() as s:
            a = s.scalar(select(S.Appointment).where(S.Appointment.reference == reference))
            if a is None:
                raise NotFound("no such booking")
            return {"reference": a.reference, "status": a.status, "starts_at": a.starts_at, "ends_at": a.ends_at,
                    "department": a.department}

    def set_appointment_status(self, actor: Actor, appointment_id: int, status: str) -> None:
        if status not in ("confirmed", "cancelled", "done"):
            raise FieldError(f"unknown status {status!r} (confirmed, cancelled, done)", field="status")
        with self._tx() as s:
            pid = self._get(s, S.Appointment, appointment_id, "appointment").patient_id
        self._check(actor, "schedule", "appointment", None, appointment_id)
        try:
            with self._tx() as s:
                a = self._get(s, S.Appointment, appointment_id, "appointment")
                if status == "confirmed" and a.status != "confirmed":
                    clash = s.scalar(select(S.Appointment.id).where(
                        S.Appointment.id != a.id, S.Appointment.department == a.department,
                        S.Appointment.status == "confirmed", S.Appointment.starts_at < a.ends_at,
                        S.Appointment.ends_at > a.starts_at))
                    if clash is not None:
                        raise SlotTaken(f"the slot overlaps confirmed appointment {clash}", field="status")
                    _claim(s, a)
                elif status == "cancelled":
                    s.execute(delete(S.AppointmentSlot).where(
                        S.AppointmentSlot.appointment_id == a.id))
                old, a.status = a.status, status
                self._audit(s, actor, "update", "appointment", appointment_id, pid, {"status": [old, status]})
        except IntegrityError:
            raise SlotTaken("the slot was just taken by another confirmed appointment", field="status") from None

    def appointment_patient(self, actor: Actor, appointment_id: int) -> int:
        """The patient an appointment belongs to, when the actor may read that patient's record."""
        with self._tx() as s:
            pid = self._get(s, S.Appointment, appointment_id, "appointment").patient_id
        if pid is None:  # an unattached consultation request: staff only
            self._check(actor, "schedule", "appointment", None, appointment_id)
            raise NotFound(f"appointment {appointment_id} belongs to no patient record")
        self._check(actor, "read", "appointment", int(pid), appointment_id)
        return int(pid)

    def calendar(self, actor: Actor, department: str, start: Any, end: Any) -> list[dict[str, Any]]:
        """Appointments of a department between two instants (staff)."""
        self._check(actor, "schedule", "calendar")
        a, b = _aware(start, "start"), _aware(end, "end")
        if not a < b <= a + dt.timedelta(days=366):
            raise FieldError("the end must come after the start, at most 366 days later", field="end")
        with self._tx() as s:
            rows = [_row(x) for x in s.scalars(select(S.Appointment).where(
                S.Appointment.department == department.lower(), S.Appointment.starts_at < b,
                S.Appointment.ends_at > a).order_by(S.Appointment.starts_at))]
            ids = {r["patient_id"] for r in rows if r["patient_id"] is not None}
            patients = {p.id: p for p in s.scalars(select(S.Patient).where(S.Patient.id.in_(ids)))} if ids else {}
            for r in rows:  # the patient's name and MRN beside the visit (staff only read calendars)
                p = patients.get(r["patient_id"])
                r["patient_name"] = None if p is None else f"{p.family_name}, {p.given_name}"
                r["patient_mrn"] = None if p is None else p.mrn
            self._audit(s, actor, "read", "calendar", department.lower(), None, {"count": len(rows)})
            return rows

    def departments(self, actor: Actor) -> list[str]:
        """The departments that have appointments (staff), in alphabetical order."""
        self._check(actor, "schedule", "calendar")
        with self._tx() as s:
            return sorted(str(d) for d in s.scalars(select(S.Appointment.department).distinct()))

    # -- audit ----------------------------------------------------------------------------------------------
    def audit_log(self, actor: Actor, *, patient_id: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest audit rows (administrators)."""
        self._check(actor, "audit", "audit-log")
        with self._tx() as s:
            q = select(S.AuditEntry).order_by(S.AuditEntry.id.desc()).limit(limit)
            if patient_id is not None:
                q = q.where(S.AuditEntry.patient_id == patient_id)
            rows = [_row(x) for x in s.scalars(q)]
            self._audit(s, actor, "read", "audit-log", None, patient_id)
            return rows


def _number_pos(value: Any, field: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FieldError(f"expected a number, got {value!r}", field=field) from None
    if not v > 0 or v == float("inf"):
        raise FieldError(f"must be positive, got {value!r}", field=field)
    return v


def _route(route: str) -> str:
    r = str(route).strip().lower()
    if r not in ("oral", "intravenous", "sublingual"):
        raise FieldError(f"unknown route {route!r} (oral, intravenous, sublingual)", field="route")
    return r


def make_dose(*, drug: str, product: str, amount: Any, unit: str, given_at: Any, route: str = "oral",
          infusion_h: Any = None, regimen_id: int | None = None) -> S.Dose:
    mg = dose_mg(drug, amount, unit)
    r = _route(route)
    dur = None if infusion_h in (None, "") else _number_pos(infusion_h, "infusion_h")
    if dur is not None and r != "intravenous":
        raise FieldError("an infusion duration applies to intravenous doses only", field="infusion_h")
    return S.Dose(drug=drug.lower(), product=_text(product, "product", max_len=64), route=r, amount_mg=mg,
                  given_at=_past(given_at, "given_at"), infusion_h=dur, regimen_id=regimen_id)


def make_level(*, drug: str, value: Any, unit: str, observed_at: Any, blq: bool = False, lloq: Any = None,
               assay: str | None = None, sample: str | None = "trough", matrix: str | None = "whole blood"
               ) -> S.Observation:
    v = level_ng_ml(drug, value, unit)
    limit = None if lloq in (None, "") else level_ng_ml(drug, lloq, unit, field="lloq")
    if blq and limit is None:
        raise FieldError("a level below the limit of quantification needs the limit", field="lloq")
    if sample not in (None, "trough", "c2", "other"):
        raise FieldError(f"expected trough, c2 or other, got {sample!r}", field="sample")
    at = _past(observed_at, "observed_at")
    return S.Observation(category="level", name=f"{drug.lower()} level", code=loinc(drug.lower()), value=v,
                         unit="ng/mL", observed_at=at, blq=bool(blq), lloq=limit,
                         assay=None if assay in (None, "") else _text(assay, "assay", max_len=32), sample=sample,
                         matrix=None if matrix is None else _text(matrix, "matrix", max_len=32))


def _past(value: Any, field: str) -> dt.datetime:
    """An instant that is not in the future (an entry records what happened)."""
    from cnidose.records.plausibility import check_not_future

    at = _aware(value, field)
    if not 1900 <= at.year <= 2100:
        raise FieldError(f"{at.isoformat()} is outside 1900-2100", field=field)
    check_not_future(at, field)
    return at


def make_genotype(*, gene: str, result: str, source: str, tested_on: Any = None) -> S.Genotype:
    from cnidose.clinical.record import GENES, RecordError, cyp3a5_expresser

    g = _text(gene, "gene", max_len=16).upper()
    if g not in GENES:
        raise FieldError(f"unknown gene {gene!r} (known: {', '.join(GENES)})", field="gene")
    r = _text(result, "result", max_len=64)
    if g == "CYP3A5":
        try:
            cyp3a5_expresser(r, "genotype")
        except RecordError as exc:
            raise FieldError(str(exc).split("] ", 1)[-1], field="result") from None
    day = None if tested_on in (None, "") else _date(tested_on, "tested_on")
    if day is not None and day > _now().date():
        raise FieldError(f"{day.isoformat()} is in the future", field="tested_on")
    return S.Genotype(gene=g, result=r, source=_text(source, "source", max_len=500), tested_on=day)


def make_covariate(*, name: str, value: Any, unit: str, measured_at: Any) -> S.Covariate:
    key, v, u = covariate_value(name, value, unit)
    return S.Covariate(name=key, value=v, unit=u, measured_at=_past(measured_at, "measured_at"))


def make_regimen(*, drug: str, product: str, dose: Any, unit: str, interval_h: Any, start_at: Any,
                 stop_at: Any = None, route: str = "oral") -> S.Regimen:
    mg = dose_mg(drug, dose, unit, field="dose")
    tau = _number_pos(interval_h, "interval_h")
    start = _aware(start_at, "start_at")
    stop = None if stop_at in (None, "") else _aware(stop_at, "stop_at")
    if stop is not None and stop <= start:
        raise FieldError("stops before it starts", field="stop_at")
    return S.Regimen(drug=drug.lower(), product=_text(product, "product", max_len=64), route=_route(route),
                     dose_mg=mg, interval_h=tau, start_at=start, stop_at=stop)


def make_lab(*, name: str, value: Any, unit: str, observed_at: Any) -> S.Observation:
    from cnidose.clinical.record import RecordError, convert_lab

    try:
        lab, v, canon = convert_lab(name, value, unit, "lab")
    except RecordError as exc:
        raise FieldError(str(exc).split("] ", 1)[-1], field=exc.field.removeprefix("lab.")) from None
    return S.Observation(category="lab", name=lab, code=loinc(lab), value=v, unit=canon,
                         observed_at=_past(observed_at, "observed_at"), blq=False)


_VITALS = ("systolic blood pressure", "diastolic blood pressure")


def make_vital(*, name: str, value: Any, observed_at: Any) -> S.Observation:
    """One blood-pressure component (mm[Hg]); the possible range is the clinical record's (BP_RANGE)."""
    from cnidose.clinical.record import BP_RANGE

    if name not in _VITALS:
        raise FieldError(f"unknown vital sign {name!r} (known: {', '.join(_VITALS)})", field="name")
    field = name.split()[0]
    lo, hi = BP_RANGE[field]
    v = _number_pos(value, field)
    if not lo <= v <= hi:
        raise FieldError(f"{v:g} mmHg is not a possible {name} ({lo:g}-{hi:g})", field=field)
    return S.Observation(category="vital", name=name, code=loinc(name), value=v, unit="mm[Hg]",
                         observed_at=_past(observed_at, "observed_at"), blq=False)


def make_blood_pressure(*, systolic: Any, diastolic: Any, observed_at: Any) -> tuple[S.Observation, S.Observation]:
    a = make_vital(name="systolic blood pressure", value=systolic, observed_at=observed_at)
    b = make_vital(name="diastolic blood pressure", value=diastolic, observed_at=observed_at)
    if b.value >= a.value:
        raise FieldError(f"{b.value:g} mmHg is not a possible diastolic pressure (below systolic {a.value:g})",
                         field="diastolic")
    return a, b


def make_medication(*, name: str, start_on: Any, stop_on: Any = None, daily_mg: Any = None,
                    rxnorm: str | None = None) -> S.Medication:
    start = _date(start_on, "start_on")
    stop = None if stop_on in (None, "") else _date(stop_on, "stop_on")
    if stop is not None and stop < start:
        raise FieldError("stops before it starts", field="stop_on")
    daily = None if daily_mg in (None, "") else _number_pos(daily_mg, "daily_mg")
    return S.Medication(name=_text(name, "name", max_len=64).lower(), rxnorm=rxnorm, daily_mg=daily, start_on=start,
                        stop_on=stop)


def make_patient(*, mrn: str, family_name: str, given_name: str, birth_date: Any, sex: str, agent: str,
                 indication: str, therapy_start: Any = None, transplant_date: Any = None) -> S.Patient:
    if sex not in ("female", "male", "other", "unknown"):
        raise FieldError(f"expected female, male, other or unknown, got {sex!r}", field="sex")
    born = _date(birth_date, "birth_date")
    if born > _now().date():
        raise FieldError(f"{born.isoformat()} is in the future", field="birth_date")
    agent_l = _text(agent, "agent", max_len=32).lower()
    if agent_l not in (*DRUGS, "pimecrolimus"):
        raise FieldError(f"unknown agent {agent!r}", field="agent")
    return S.Patient(mrn=_text(mrn, "mrn", max_len=64), family_name=_text(family_name, "family_name", max_len=128),
                     given_name=_text(given_name, "given_name", max_len=128), birth_date=born, sex=sex,
                     agent=agent_l, indication=_text(indication, "indication", max_len=64).lower(),
                     therapy_start=None if therapy_start is None else _date(therapy_start, "therapy_start"),
                     transplant_date=None if transplant_date is None else _date(transplant_date, "transplant_date"))


def _claim(s: Session, a: S.Appointment) -> None:
    """Claim the confirmed visit's slots: the unique index refuses a second visit in any of them."""
    if a.starts_at.minute % 15 or a.starts_at.second or (a.ends_at - a.starts_at) % SLOT:
        raise FieldError("confirmed visits start on a quarter hour and last whole quarters", field="starts_at")
    for t in _slots(a.starts_at, a.ends_at):
        s.add(S.AppointmentSlot(department=a.department, slot_start=t, appointment_id=a.id))
    s.flush()


class SlotTaken(FieldError):
    """A confirmed visit is already in the way (the API answers 409)."""


def _clash(staff: bool, dept: str, start: dt.datetime, other: int | None) -> SlotTaken:
    """Staff learn which visit is in the way; the public only that the time is not available."""
    if staff and other is not None:
        return SlotTaken(f"the {dept} slot at {start.isoformat()} overlaps confirmed appointment {other}",
                         field="starts_at")
    return SlotTaken("that time is not available: please choose another", field="starts_at")


def _email(value: Any) -> str:
    """A syntactically valid e-mail address (email-validator; no DNS look-up), normalised."""
    from email_validator import EmailNotValidError, validate_email

    text = _text(value, "contact_email", max_len=254)
    try:
        return str(validate_email(text, check_deliverability=False).normalized)
    except EmailNotValidError as exc:
        raise FieldError(f"{text!r} is not an e-mail address: {exc}", field="contact_email") from None
