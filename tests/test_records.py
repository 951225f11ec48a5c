"""The clinical record on SQLite and on PostgreSQL: migrations, validation at the boundary, roles, the audit
trail, immutability of signed assessments, append-only audit log, booking.

PostgreSQL: ``CNIDOSE_TEST_POSTGRES_URL`` (default ``postgresql+psycopg:///postgres``, the local socket);
each test gets a fresh database. Where no server answers the PostgreSQL cases are skipped -- unless
``CNIDOSE_REQUIRE_POSTGRES=1`` (set by CI), where that is a failure.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from cnidose.records import schema as S
from cnidose.records.db import HEAD, make_engine, revision, upgrade
from cnidose.records.store import SYSTEM, AccessDenied, Actor, NotFound, Store
from cnidose.records.units import FieldError

PG_ADMIN = os.environ.get("CNIDOSE_TEST_POSTGRES_URL", "postgresql+psycopg:///postgres")
UTC = dt.UTC


def _pg_engine() -> Iterator[str]:
    try:
        admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:
        if os.environ.get("CNIDOSE_REQUIRE_POSTGRES") == "1":
            raise AssertionError(f"PostgreSQL required but not reachable at {PG_ADMIN}: {exc}") from exc
        pytest.skip(f"no PostgreSQL at {PG_ADMIN} ({type(exc).__name__})")
    name = f"cnidose_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cnidose.db'}"
    else:
        yield from _pg_engine()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield Store(engine)
    engine.dispose()


def _setup(store: Store) -> tuple[int, Actor, Actor, Actor]:
    pid = store.add_patient(SYSTEM, mrn="K-1001", family_name="Doe", given_name="Jane", birth_date="1970-05-01",
                            sex="female", agent="tacrolimus", indication="kidney transplant",
                            transplant_date="2026-10-01")
    clin = Actor("dr.a", "clinician", store.create_user(SYSTEM, "dr.a", "hash", "clinician"))
    other = store.add_patient(SYSTEM, mrn="K-1002", family_name="Roe", given_name="Rick", birth_date="1960-01-01",
                              sex="male", agent="tacrolimus", indication="kidney transplant")
    me = Actor("jane", "patient", store.create_user(SYSTEM, "jane", "hash", "patient", patient_id=pid), pid)
    return pid, clin, me, Actor("roe", "patient", store.create_user(SYSTEM, "roe", "hash", "patient", other), other)


def test_migrations_create_the_schema_the_models_describe(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(db_url)
    assert revision(engine) is None
    upgrade(engine)
    upgrade(engine)  # idempotent
    assert revision(engine) == HEAD
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), S.Base.metadata)
    assert diff == []
    engine.dispose()


def test_migration_0002_upgrades_a_database_with_patients_in_it(db_url: str) -> None:
    """A database made by 0001 and holding a patient and an entry: 0002 gives the patient revision 0, and from
    then on the triggers raise it."""
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    now = dt.datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO patients (mrn, family_name, given_name, birth_date, sex, agent, indication, "
                          "created_at, updated_at) VALUES ('OLD-1', 'Old', 'Record', '1960-01-01', 'male', "
                          "'tacrolimus', 'kidney transplant', :t, :t)"), {"t": now})
        pid = conn.execute(text("SELECT id FROM patients WHERE mrn = 'OLD-1'")).scalar_one()
    upgrade(engine)
    assert revision(engine) == HEAD
    store = Store(engine)
    assert store.latest_assessment(SYSTEM, pid)[0]["revision"] == 0
    store.add_level(SYSTEM, pid, value=7.0, unit="ng/mL", observed_at=now, confirm=True)
    assert store.latest_assessment(SYSTEM, pid)[0]["revision"] == 1
    engine.dispose()


def test_entries_are_validated_converted_and_audited(store: Store) -> None:
    pid, clin, _, _ = _setup(store)
    t0 = dt.datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    store.add_regimen(clin, pid, drug="tacrolimus", product="Prograf", dose=4, unit="mg", interval_h=12,
                      start_at=t0)
    store.add_dose(clin, pid, drug="tacrolimus", product="Prograf", amount=4000, unit="ug", given_at=t0)
    store.add_level(clin, pid, drug="tacrolimus", value=9.95, unit="nmol/L", observed_at="2026-11-02T07:50:00+01:00")
    store.add_lab(clin, pid, name="creatinine", value=1.5, unit="mg/dL", observed_at=t0)
    store.add_covariate(clin, pid, "hct", 31, "%", t0)
    store.add_blood_pressure(clin, pid, systolic=150, diastolic=95, observed_at=t0)
    chart = store.chart(clin, pid)
    assert chart.doses[0]["amount_mg"] == pytest.approx(4.0)
    level = next(o for o in chart.observations if o["category"] == "level")
    assert level["value"] == pytest.approx(9.95 * 0.80402) and level["unit"] == "ng/mL" and level["code"] == "11253-2"
    assert level["observed_at"] == dt.datetime(2026, 11, 2, 6, 50, tzinfo=UTC)  # stored in UTC, read back aware
    lab = next(o for o in chart.observations if o["name"] == "creatinine")
    assert lab["value"] == pytest.approx(132.6) and lab["unit"] == "umol/L"
    assert chart.covariates[0]["name"] == "HCT" and chart.covariates[0]["value"] == pytest.approx(0.31)
    # every write and the read left an audit row naming the user, the action and the object
    log = store.audit_log(Actor("root", "admin", store.create_user(SYSTEM, "root", "hash", "admin")),
                          patient_id=pid)
    acts = [(r["username"], r["action"], r["object_type"]) for r in reversed(log)]
    assert ("dr.a", "create", "dose") in acts and ("dr.a", "create", "regimen") in acts
    assert acts.count(("dr.a", "create", "observation")) == 4 and ("dr.a", "read", "patient") in acts
    assert all(r["at"].tzinfo is not None for r in log)


@pytest.mark.parametrize(("call", "field", "message"), [
    (lambda s, a, p: s.add_dose(a, p, drug="tacrolimus", product="Prograf", amount=500, unit="mg",
                                given_at="2026-11-01T08:00:00Z"), "amount", "500 ug would be an ordinary dose"),
    (lambda s, a, p: s.add_dose(a, p, drug="tacrolimus", product="Prograf", amount=2, unit="mg",
                                given_at="2026-11-01T08:00:00"), "given_at", "no time zone"),
    (lambda s, a, p: s.add_level(a, p, drug="tacrolimus", value=-1, unit="ng/mL",
                                 observed_at="2026-11-01T08:00:00Z"), "value", "cannot be negative"),
    (lambda s, a, p: s.add_level(a, p, drug="tacrolimus", value=8000, unit="ng/mL",
                                 observed_at="2026-11-01T08:00:00Z"), "value", "if the unit is ng/L"),
    (lambda s, a, p: s.add_level(a, p, drug="tacrolimus", value=8, unit="mmol/L",
                                 observed_at="2026-11-01T08:00:00Z"), "value_unit", "unit 'mmol/L'"),
    (lambda s, a, p: s.add_covariate(a, p, "HCT", 33, "L/L", "2026-11-01T08:00:00Z"), "value", "check the unit"),
    (lambda s, a, p: s.add_covariate(a, p, "CYP3A5", 2, "1", "2026-11-01T08:00:00Z"), "value", "not a code"),
    (lambda s, a, p: s.add_lab(a, p, name="creatinine", value=80, unit="mg/dL",
                               observed_at="2026-11-01T08:00:00Z"), "value", "not a possible creatinine"),
    (lambda s, a, p: s.add_blood_pressure(a, p, systolic=120, diastolic=130,
                                          observed_at="2026-11-01T08:00:00Z"), "diastolic", "below systolic"),
    (lambda s, a, p: s.add_medication(a, p, name="voriconazole", start_on="2026-11-05", stop_on="2026-11-01"),
     "stop_on", "stops before it starts"),
])
def test_bad_input_names_the_field_and_stores_nothing(store: Store, call: object, field: str, message: str) -> None:
    pid, clin, _, _ = _setup(store)
    before = store.chart(clin, pid)
    with pytest.raises(FieldError, match=message) as err:
        call(store, clin, pid)  # type: ignore[operator]
    assert err.value.field == field
    after = store.chart(clin, pid)
    assert (before.doses, before.observations, before.covariates, before.medications) == (
        after.doses, after.observations, after.covariates, after.medications)


def test_roles_and_patient_isolation(store: Store) -> None:
    pid, clin, me, roe = _setup(store)
    admin = Actor("root", "admin", store.create_user(SYSTEM, "root", "hash", "admin"))
    assert store.chart(me, pid).patient["mrn"] == "K-1001"
    assert [p["id"] for p in store.patients(me)] == [pid]
    with pytest.raises(AccessDenied):
        store.chart(roe, pid)
    with pytest.raises(AccessDenied):
        store.add_level(me, pid, drug="tacrolimus", value=8, unit="ng/mL", observed_at="2026-11-01T08:00:00Z",
                        confirm=True)
    with pytest.raises(AccessDenied):
        store.chart(admin, pid)  # administrators manage users, not clinical data
    with pytest.raises(AccessDenied):
        store.audit_log(clin)
    with pytest.raises(AccessDenied):
        store.create_user(clin, "x", "hash", "admin")
    denied = [r for r in store.audit_log(admin) if r["action"] == "denied"]
    assert {(r["username"], r["object_type"]) for r in denied} >= {("roe", "patient"), ("jane", "observation"),
                                                                  ("root", "patient"), ("dr.a", "audit-log")}
    with pytest.raises(NotFound):
        store.chart(clin, 99999)


def test_signed_assessments_are_immutable_and_the_audit_log_append_only(store: Store) -> None:
    pid, clin, me, _ = _setup(store)
    aid = store.save_assessment(clin, pid, kind="recommendation", inputs={"levels": [7.1, 9.0]},
                                result={"dose": 3.5}, model_ref="andrews2019 1.0.0 sha256:x", package_version="0.1.0")
    with pytest.raises(AccessDenied):
        store.sign_assessment(me, aid, "ok")
    store.sign_assessment(clin, aid, "reduce to 3.5 mg twice daily")
    with pytest.raises(FieldError, match="signed and cannot change"):
        store.sign_assessment(clin, aid, "changed my mind")
    # not even by hand: the database refuses
    with store.engine.connect() as conn:
        for sql in ("UPDATE assessments SET decision = 'x'", "DELETE FROM assessments",
                    "UPDATE audit_log SET username = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match=r"immutable|append-only"), conn.begin():
                conn.execute(text(sql))
    a = store.chart(clin, pid).assessments[0]
    assert a["status"] == "signed" and a["decision"] == "reduce to 3.5 mg twice daily"
    assert a["signed_by"] == clin.user_id


def test_entered_in_error_keeps_the_entry(store: Store) -> None:
    pid, clin, _, _ = _setup(store)
    lid = store.add_level(clin, pid, drug="tacrolimus", value=25, unit="ng/mL", observed_at="2026-11-01T09:00:00Z",
                          confirm=True)
    store.mark_entered_in_error(clin, "observation", lid, "drawn from the infusion line")
    obs = store.chart(clin, pid).observations
    assert len(obs) == 1 and obs[0]["status"] == "entered-in-error"
    assert obs[0]["status_reason"] == "drawn from the infusion line"
    with pytest.raises(FieldError, match="already marked"):
        store.mark_entered_in_error(clin, "observation", lid, "again")


def test_every_change_of_an_entry_raises_the_patients_revision(store: Store) -> None:
    """The revision (what a stored recommendation is reused by) rises with every insert, update or delete of a
    patient's entries, through the store or by hand; reads, other patients' entries and assessments leave it."""
    pid, clin, _, roe = _setup(store)
    other = roe.patient_id
    assert other is not None and other != pid

    def rev(p: int = pid) -> int:
        return int(store.latest_assessment(SYSTEM, p)[0]["revision"])

    seen = [rev()]

    def rose() -> bool:
        seen.append(rev())
        return seen[-1] > seen[-2]

    t0 = dt.datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    store.add_regimen(clin, pid, drug="tacrolimus", product="Prograf", dose=4, unit="mg", interval_h=12, start_at=t0)
    assert rose()
    store.add_dose(clin, pid, product="Prograf", amount=4, unit="mg", given_at=t0)
    assert rose()
    lid = store.add_level(clin, pid, value=8.0, unit="ng/mL", observed_at=t0 + dt.timedelta(hours=11))
    assert rose()
    store.add_lab(clin, pid, name="creatinine", value=120, unit="umol/L", observed_at=t0)
    assert rose()
    store.add_medication(clin, pid, name="fluconazole", start_on=t0.date(), daily_mg=200)
    assert rose()
    store.add_covariate(clin, pid, name="WT", value=70, unit="kg", measured_at=t0)
    assert rose()
    store.mark_entered_in_error(clin, "observation", lid, "haemolysed")
    assert rose()
    store.chart(clin, pid)
    store.save_assessment(clin, pid, kind="assessment", inputs={}, result={}, model_ref=None, package_version="x")
    store.add_level(clin, other, value=5.0, unit="ng/mL", observed_at=t0, confirm=True)
    assert not rose()  # a read, an assessment and another patient's entry change nothing here
    with store.engine.connect() as conn:
        for sql in ("UPDATE observations SET value = value * 2 WHERE patient_id = :p",
                    "DELETE FROM medications WHERE patient_id = :p"):
            with conn.begin():
                conn.execute(text(sql), {"p": pid})
            assert rose(), sql


def test_booking(store: Store) -> None:
    pid, clin, me, roe = _setup(store)
    public = Actor("public", "public")
    start = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + dt.timedelta(days=3)
    req = store.book(public, department="Dermatology", starts_at=start, reason="eczema, topical treatment failed",
                     contact_name="Ann Example", contact_email="ann@example.org")
    with pytest.raises(FieldError, match="not an e-mail") as err:
        store.book(public, department="dermatology", starts_at=start, contact_name="B", contact_email="nope")
    assert err.value.field == "contact_email"
    with pytest.raises(AccessDenied):
        store.book(roe, department="dermatology", starts_at=start, patient_id=pid)
    mine = store.book(me, department="dermatology", starts_at=start + dt.timedelta(hours=1), patient_id=pid)
    staff = store.book(clin, department="dermatology", starts_at=start, patient_id=pid, kind="follow-up",
                       source="psoriasis-cyclosporine: creatinine every 2 weeks")
    with pytest.raises(FieldError, match="slot overlaps confirmed appointment"):
        store.set_appointment_status(clin, req, "confirmed")
    with pytest.raises(AccessDenied):
        store.set_appointment_status(me, mine, "confirmed")
    store.set_appointment_status(clin, mine, "confirmed")
    cal = store.calendar(clin, "dermatology", start - dt.timedelta(hours=1), start + dt.timedelta(days=1))
    assert [(a["id"], a["status"]) for a in cal] == [(req, "requested"), (staff, "confirmed"), (mine, "confirmed")]
    with pytest.raises(FieldError, match="in the past"):
        store.book(clin, department="dermatology", starts_at=start - dt.timedelta(days=10))


def test_demo_chart_feeds_the_fit_the_recommender_and_the_assessment(store: Store, tmp_path: Path) -> None:
    """The stored chart, exported as NONMEM rows, is what the engines read: the demo transplant patient's
    troughs are fitted by a library model and a regimen is recommended; the document form is assessed."""
    from cnidose.clinical import assess, parse_record
    from cnidose.dosing import find_target, product, recommend
    from cnidose.models.library import resolve_model
    from cnidose.records.demo import seed_demo
    from cnidose.records.exchange import chart_to_document, chart_to_nonmem
    from cnidose.records.nonmem import read_nonmem_csv, write_csv

    today = dt.date(2026, 11, 25)
    ids = seed_demo(store, today)
    clin = Actor("dr.a", "clinician", store.create_user(SYSTEM, "dr.a", "hash", "clinician"))
    chart = store.chart(clin, ids["DEMO-TX-1"])
    exp = chart_to_nonmem(chart)
    assert exp.header[:10] == ["ID", "TIME", "EVID", "AMT", "RATE", "CMT", "DV", "MDV", "BLQ", "LLOQ"]
    assert sum(1 for r in exp.rows if r[2] == 0) == 5 and sum(1 for r in exp.rows if r[2] == 1) == 40
    assert exp.origin == dt.datetime(2026, 11, 5, 8, 0, tzinfo=UTC)
    path = tmp_path / "patient.csv"
    write_csv(path, exp.header, exp.rows)
    ind = read_nonmem_csv(path).individuals()[0]
    assert ind.time[-1] == pytest.approx(19 * 24 + 12)
    m = resolve_model("andrews2019_tac_adult_kidney")
    target = find_target("tacrolimus", "kidney", "adult", 0.7, concomitant="mmf")
    rec = recommend(m, ind, target, product("Prograf"), n_draws=300)
    assert rec.chosen is not None and rec.chosen.in_target and rec.chosen.dose < 5.0  # troughs rose above range
    doc = chart_to_document(store.chart(clin, ids["DEMO-DERM-1"]))
    result = assess(parse_record(doc, as_of=today), today)
    # creatinine 68-70 -> 88-90 umol/L on cyclosporine: the EU eGFR-fall rule fires for this EU patient (the US
    # creatinine rule is the US label's)
    assert "eu-egfr-25" in {a.rule for a in result.alerts} and "us-creatinine-25" not in {a.rule for a in result.alerts}


def test_nonmem_import_is_atomic_and_round_trips(store: Store, tmp_path: Path) -> None:
    from cnidose.records.exchange import chart_to_nonmem, import_nonmem_rows

    pid, clin, _, _ = _setup(store)
    origin = dt.datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    header = ["ID", "TIME", "EVID", "AMT", "DV", "MDV"]
    rows = [["1", "0", "1", "3", ".", "1"], ["1", "12", "1", "3", ".", "1"], ["1", "23.5", "0", "0", "8.2", "0"],
            ["1", "24", "1", "3", ".", "1"], ["1", "47.5", "0", "0", "9100", "0"]]
    with pytest.raises(FieldError, match=r"line 6: 9100 ng/mL is not a possible tacrolimus level") as err:
        import_nonmem_rows(store, clin, pid, header, rows, origin=origin, drug="tacrolimus", product="Prograf")
    assert err.value.field == "DV"
    assert store.chart(clin, pid).doses == []  # nothing stored
    rows[-1][4] = "9.1"
    assert import_nonmem_rows(store, clin, pid, header, rows, origin=origin, drug="tacrolimus",
                              product="Prograf") == (3, 2)
    exp = chart_to_nonmem(store.chart(clin, pid))
    got = [[float(r[1]), int(r[2]), float(r[3]), r[6]] for r in exp.rows]
    assert got == [[0.0, 1, 3.0, "."], [12.0, 1, 3.0, "."], [23.5, 0, 0.0, 8.2], [24.0, 1, 3.0, "."],
                   [47.5, 0, 0.0, 9.1]]




def test_fhir_round_trip_gives_an_equal_bundle(store: Store) -> None:
    """export -> import -> export: equal bundles, including an
    entered-in-error level, a BLQ level, an infusion, a regimen, another drug and a booked follow-up."""
    import json

    from cnidose.records.demo import seed_demo
    from cnidose.records.fhir import export_bundle, import_bundle

    ids = seed_demo(store, dt.date(2026, 11, 25))
    clin = Actor("dr.a", "clinician", store.create_user(SYSTEM, "dr.a", "hash", "clinician"))
    kid = ids["DEMO-TX-1"]
    lid = store.add_level(clin, kid, drug="tacrolimus", value=31, unit="ng/mL", observed_at="2026-11-20T10:00:00Z",
                          confirm=True)
    store.mark_entered_in_error(clin, "observation", lid, "drawn from the infusion line")
    store.add_level(clin, kid, drug="tacrolimus", value=0, unit="ng/mL", observed_at="2026-11-21T07:50:00Z",
                    blq=True, lloq=1.0, assay="immunoassay", confirm=True)
    store.add_dose(clin, kid, drug="tacrolimus", product="tacrolimus IV", amount=1, unit="mg",
                   given_at="2026-11-21T09:00:00Z", route="intravenous", infusion_h=4, confirm=True)
    visit = store.book(clin, department="nephrology", patient_id=kid,
                       starts_at=dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
                       + dt.timedelta(days=7), kind="follow-up", source="tacrolimus trough in 1 week")
    first = export_bundle(store.chart(clin, kid))
    # the copy's visit takes the same slot, which holds one confirmed visit: the original gives it up first
    store.set_appointment_status(clin, visit, "cancelled")
    kinds = [e["resource"]["resourceType"] for e in first["entry"]]
    assert {"Patient", "Observation", "MedicationAdministration", "MedicationRequest", "MedicationStatement",
            "Appointment"} == set(kinds)
    blq = [e["resource"] for e in first["entry"] if e["resource"].get("valueQuantity", {}).get("comparator")]
    assert len(blq) == 1 and blq[0]["valueQuantity"]["value"] == 1.0
    # imported as another patient (the MRN, and with it every resource id, renamed on the way in)
    first = json.loads(json.dumps(first).replace("DEMO-TX-1", "DEMO-TX-1-copy"))
    new_id = import_bundle(store, clin, first)
    assert new_id != kid
    second = export_bundle(store.chart(clin, new_id))
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)


@pytest.mark.parametrize(("mutate", "field", "message"), [
    (lambda b: b["entry"][0]["resource"].update(birthDate="2099-01-01"), "entry[0].resource.birth_date",
     "in the future"),
    (lambda b: b["entry"][1]["resource"]["valueQuantity"].update(value=33, unit="L/L"), "entry[1].resource.value",
     "check the unit"),
    (lambda b: b["entry"][1]["resource"].update(subject={"reference": "Patient/someone-else"}),
     "entry[1].resource.subject", "not the bundle's patient"),
    (lambda b: b["entry"][1]["resource"].update(effectiveDateTime="2026-11-01T08:00:00"),
     "entry[1].resource.effectiveDateTime", "not a valid FHIR"),
    (lambda b: b["entry"][1]["resource"].update(status=12), "entry[1].resource", "not a valid FHIR"),
])
def test_fhir_import_errors_name_the_entry_and_store_nothing(store: Store, mutate: object, field: str,
                                                             message: str) -> None:
    from cnidose.records.fhir import export_bundle, import_bundle

    pid, clin, _, _ = _setup(store)
    store.add_covariate(clin, pid, "HCT", 0.31, "L/L", "2026-11-01T08:00:00Z")
    bundle = export_bundle(store.chart(clin, pid))
    bundle["entry"][0]["resource"]["identifier"][0]["value"] = "NEW-1"
    mutate(bundle)  # type: ignore[operator]
    n = len(store.patients(clin))
    with pytest.raises(FieldError, match=message) as err:
        import_bundle(store, clin, bundle)
    assert err.value.field.startswith(field), err.value.field
    assert len(store.patients(clin)) == n
