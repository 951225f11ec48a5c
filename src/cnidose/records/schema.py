"""The clinical record's tables (SQLAlchemy 2): patients, their covariates, regimens, dose administrations,
observations (drug levels, labs, vital signs), medications, assessments and recommendations, appointments,
users, and the append-only audit log.

Conventions:
- Times are timezone-aware UTC (``DateTime(timezone=True)``); dates of medications are calendar dates.
- Values are stored in one canonical unit per kind (doses in mg, levels in ng/mL = ug/L, labs in the unit
  of :mod:`cnidose.clinical.record`), with the unit named in the row; conversion happens at the boundary
  (:mod:`cnidose.records.units`).
- Nothing clinical is deleted: a wrong entry is marked ``entered-in-error`` with a reason (FHIR's status).
- A signed assessment cannot be changed or deleted, and the audit log can only grow: database triggers
  enforce both (migration 0001), so no code path -- ours or a hand-written SQL statement -- can.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ROLES", "Appointment", "AppointmentSlot", "Assessment", "AuditEntry", "Base", "Covariate", "Dose", "Genotype",
    "Medication",
    "Observation", "Patient", "Regimen", "Session", "User",
]

ROLES = ("clinician", "pharmacist", "admin", "patient")
ENTRY_STATUS = ("final", "entered-in-error")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware instant, stored in UTC and read back aware on every database (SQLite keeps no zone).
    A naive datetime is refused: a time without a zone is ambiguous."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{value.isoformat()} has no time zone")
        utc = value.astimezone(dt.UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UtcDateTime(), dict[str, Any]: JSON}


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (CheckConstraint(_in("sex", ("female", "male", "other", "unknown")), name="ck_patients_sex"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mrn: Mapped[str] = mapped_column(String(64), unique=True)  # the hospital's medical record number
    family_name: Mapped[str] = mapped_column(String(128))
    given_name: Mapped[str] = mapped_column(String(128))
    birth_date: Mapped[dt.date] = mapped_column(Date)
    sex: Mapped[str] = mapped_column(String(8))
    agent: Mapped[str] = mapped_column(String(32))  # tacrolimus, cyclosporine, voclosporin, pimecrolimus
    indication: Mapped[str] = mapped_column(String(64))
    therapy_start: Mapped[dt.date | None] = mapped_column(Date)
    transplant_date: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    # raised by database triggers on every insert, update or delete of the patient's covariates, regimens, doses,
    # observations, medications and genotypes (migrations 0002, 0003): equal revisions mean equal clinical entries
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the patient record, version 2 (migration 0003)
    region: Mapped[str] = mapped_column(String(2), default="EU", server_default="EU")  # label variants: EU | US
    severity: Mapped[str | None] = mapped_column(String(64))
    indication_code: Mapped[str | None] = mapped_column(String(16))
    indication_system: Mapped[str | None] = mapped_column(String(16))
    donor_type: Mapped[str | None] = mapped_column(String(16))
    donor_cyp3a5: Mapped[str | None] = mapped_column(String(32))
    product: Mapped[str | None] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(16))
    strength_percent: Mapped[float | None] = mapped_column(Float)
    conditions: Mapped[list[str] | None] = mapped_column(JSON)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="ck_users_role"),
                      CheckConstraint("role <> 'patient' OR patient_id IS NOT NULL", name="ck_users_patient_link"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime]


class _Entry:
    """Columns every clinical entry has: who entered it, when, whether it stands, and the plausibility warnings
    the person entering it confirmed."""

    status: Mapped[str] = mapped_column(String(20), default="final")
    status_reason: Mapped[str | None] = mapped_column(Text)
    entered_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    entered_at: Mapped[dt.datetime]
    flags: Mapped[list[str] | None] = mapped_column(JSON)


class Covariate(_Entry, Base):
    """A time-stamped covariate in the models' standard vocabulary (WT, HT, HCT, CYP3A5, ...)."""

    __tablename__ = "covariates"
    __table_args__ = (CheckConstraint(_in("status", ENTRY_STATUS), name="ck_covariates_status"),
                      Index("ix_covariates_patient", "patient_id", "measured_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(32))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16))
    measured_at: Mapped[dt.datetime]
    source: Mapped[str | None] = mapped_column(Text)


class Regimen(_Entry, Base):
    """A prescribed regimen: dose every interval from start (to stop)."""

    __tablename__ = "regimens"
    __table_args__ = (CheckConstraint(_in("status", ENTRY_STATUS), name="ck_regimens_status"),
                      CheckConstraint("dose_mg > 0 AND interval_h > 0", name="ck_regimens_positive"),
                      Index("ix_regimens_patient", "patient_id", "start_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    drug: Mapped[str] = mapped_column(String(32))
    product: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(16))
    dose_mg: Mapped[float] = mapped_column(Float)
    interval_h: Mapped[float] = mapped_column(Float)
    start_at: Mapped[dt.datetime]
    stop_at: Mapped[dt.datetime | None]


class Dose(_Entry, Base):
    """One administration (what was given, when)."""

    __tablename__ = "doses"
    __table_args__ = (CheckConstraint(_in("status", ENTRY_STATUS), name="ck_doses_status"),
                      CheckConstraint("amount_mg > 0", name="ck_doses_positive"),
                      Index("ix_doses_patient", "patient_id", "given_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    drug: Mapped[str] = mapped_column(String(32))
    product: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(16))
    amount_mg: Mapped[float] = mapped_column(Float)
    given_at: Mapped[dt.datetime]
    infusion_h: Mapped[float | None] = mapped_column(Float)  # duration of an intravenous infusion
    regimen_id: Mapped[int | None] = mapped_column(ForeignKey("regimens.id", ondelete="RESTRICT"))


class Observation(_Entry, Base):
    """A drug level, a lab result or a vital sign, with its LOINC code and UCUM unit."""

    __tablename__ = "observations"
    __table_args__ = (CheckConstraint(_in("status", ENTRY_STATUS), name="ck_observations_status"),
                      CheckConstraint(_in("category", ("level", "lab", "vital")), name="ck_observations_category"),
                      Index("ix_observations_patient", "patient_id", "observed_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    category: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(64))  # e.g. "tacrolimus trough", "creatinine", "systolic bp"
    code: Mapped[str | None] = mapped_column(String(16))  # LOINC, where verified
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16))
    observed_at: Mapped[dt.datetime]
    blq: Mapped[bool] = mapped_column(Boolean, default=False)  # below the limit of quantification
    lloq: Mapped[float | None] = mapped_column(Float)
    assay: Mapped[str | None] = mapped_column(String(32))  # e.g. LC-MS/MS, immunoassay
    sample: Mapped[str | None] = mapped_column(String(8))  # a level's timing: trough | c2 | other
    matrix: Mapped[str | None] = mapped_column(String(32))  # whole blood, plasma


class Medication(_Entry, Base):
    """Another drug the patient takes (for interactions)."""

    __tablename__ = "medications"
    __table_args__ = (CheckConstraint(_in("status", ENTRY_STATUS), name="ck_medications_status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(64))
    rxnorm: Mapped[str | None] = mapped_column(String(16))
    daily_mg: Mapped[float | None] = mapped_column(Float)
    start_on: Mapped[dt.date] = mapped_column(Date)
    stop_on: Mapped[dt.date | None] = mapped_column(Date)


class Genotype(_Entry, Base):
    """A pharmacogenetic result (CYP3A5, CYP3A4) with its source."""

    __tablename__ = "genotypes"
    __table_args__ = (CheckConstraint(_in("status", ENTRY_STATUS), name="ck_genotypes_status"),
                      Index("ix_genotypes_patient", "patient_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    gene: Mapped[str] = mapped_column(String(16))
    result: Mapped[str] = mapped_column(String(64))  # a diplotype (*1/*3) or a phenotype
    source: Mapped[str] = mapped_column(Text)
    tested_on: Mapped[dt.date | None] = mapped_column(Date)


class Assessment(Base):
    """An assessment or a dose recommendation: inputs, result, the model and package that made it; once
    signed (with the decision taken), immutable."""

    __tablename__ = "assessments"
    __table_args__ = (CheckConstraint(_in("status", ("draft", "signed")), name="ck_assessments_status"),
                      CheckConstraint(_in("kind", ("recommendation", "assessment")), name="ck_assessments_kind"),
                      CheckConstraint("status <> 'signed' OR (signed_by IS NOT NULL AND signed_at IS NOT NULL)",
                                      name="ck_assessments_signature"),
                      Index("ix_assessments_patient", "patient_id", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))
    inputs: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any]]
    model_ref: Mapped[str | None] = mapped_column(String(128))  # id version sha256:...
    package_version: Mapped[str] = mapped_column(String(32))
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    created_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(String(8), default="draft")
    decision: Mapped[str | None] = mapped_column(Text)
    signed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    signed_at: Mapped[dt.datetime | None]


class Appointment(Base):
    """A consultation request or a booked visit (protocol follow-ups carry the rule that asked for them)."""

    __tablename__ = "appointments"
    __table_args__ = (CheckConstraint(_in("status", ("requested", "confirmed", "cancelled", "done")),
                                      name="ck_appointments_status"),
                      CheckConstraint("ends_at > starts_at", name="ck_appointments_order"),
                      Index("ix_appointments_department", "department", "starts_at"),
                      Index("ix_appointments_reference", "reference", unique=True))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    department: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))  # consultation, follow-up
    starts_at: Mapped[dt.datetime]
    ends_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(String(12), default="requested")
    reason: Mapped[str | None] = mapped_column(Text)
    contact_name: Mapped[str | None] = mapped_column(String(128))
    contact_email: Mapped[str | None] = mapped_column(String(254))
    source: Mapped[str | None] = mapped_column(String(128))  # e.g. the protocol rule that scheduled it
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    created_at: Mapped[dt.datetime]
    reference: Mapped[str | None] = mapped_column(String(32))  # opaque (ids are sequential)


class AppointmentSlot(Base):
    """A 15-minute slot a confirmed visit covers: unique per department, so the database itself refuses a second
    confirmed visit in it, whoever writes (migration 0004)."""

    __tablename__ = "appointment_slots"
    __table_args__ = (UniqueConstraint("department", "slot_start", name="uq_appointment_slots"),
                      Index("ix_appointment_slots_appointment", "appointment_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    department: Mapped[str] = mapped_column(String(64))
    slot_start: Mapped[dt.datetime]
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id", ondelete="CASCADE"))


class Session(Base):
    """A sign-in: the cookie holds a random token, this row its SHA-256; revoked at logout, on a password change
    or by an administrator; idle and absolute timeouts are checked on every request."""

    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_user", "user_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    address: Mapped[str | None] = mapped_column(String(64))


class SignInDevice(Base):
    """A browser or client that signed in as a user: its failed sign-ins count against itself, not the account
    (the cookie holds a random token, this row its SHA-256)."""

    __tablename__ = "sign_in_devices"
    __table_args__ = (Index("ix_sign_in_devices_user", "user_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime]


class AuditEntry(Base):
    """Who did what to which object, when. Append-only (database triggers refuse UPDATE and DELETE)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_object", "object_type", "object_id"), Index("ix_audit_at", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime]
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    username: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(24))  # read, create, update, sign, export, import, denied, ...
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[int | None] = mapped_column(Integer)  # not a foreign key: the log outlives anything
    detail: Mapped[str | None] = mapped_column(Text)
