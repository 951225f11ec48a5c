"""A patient as an HL7 FHIR bundle (type ``collection``), and back.

Resources: Patient (identifier = MRN; the calcineurin inhibitor, indication, therapy start and transplant
date as cnidose extensions), Observation (drug levels and labs with LOINC codes where verified, vital
signs, covariates under cnidose's covariate code system; UCUM quantities; a level below the limit of
quantification as ``valueQuantity.comparator = "<"`` with the limit), MedicationAdministration (each dose;
an infusion as an effective period), MedicationRequest (each regimen: dose every interval, bounds),
MedicationStatement (other drugs, for interactions) and Appointment. Entries marked entered-in-error keep
that status. Assessments are not exported (their record of inputs and model is cnidose-specific).

Bundles are validated with ``fhir.resources`` (the R4B models, a compatible revision of R4; the package
is in the ``fhir`` extra) and then field by field: an error names the entry and the element. Resource ids
are derived from the content's order, so that export -> import -> export gives an equal bundle.
"""

from __future__ import annotations

import datetime as dt
import importlib
import re
from typing import Any

from pydantic import ValidationError

from cnidose.records import schema as S
from cnidose.records.store import (
    Actor,
    Chart,
    Store,
    make_covariate,
    make_dose,
    make_genotype,
    make_lab,
    make_level,
    make_medication,
    make_patient,
    make_regimen,
    make_vital,
)
from cnidose.records.units import FieldError

__all__ = ["EXT", "export_bundle", "import_bundle"]

EXT = "https://cnidose.org/fhir/StructureDefinition/"
COVARIATE_SYSTEM = "https://cnidose.org/fhir/CodeSystem/covariate"
GENE_SYSTEM = "https://cnidose.org/fhir/CodeSystem/gene"
_CODE_SYSTEMS = {"ICD-10-CM": "http://hl7.org/fhir/sid/icd-10-cm", "SNOMED CT": "http://snomed.info/sct"}
_CODE_BACK = {v: k for k, v in _CODE_SYSTEMS.items()}
DRUG_SYSTEM = "https://cnidose.org/fhir/CodeSystem/drug"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_APPT_STATUS = {"requested": "proposed", "confirmed": "booked", "cancelled": "cancelled", "done": "fulfilled"}
_APPT_BACK = {v: k for k, v in _APPT_STATUS.items()}


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _qty(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}  # stored units are UCUM codes


def _observation_status(status: str) -> str:
    return "entered-in-error" if status == "entered-in-error" else "final"


def _resource_id(mrn: str) -> str:
    rid = re.sub(r"[^A-Za-z0-9\-.]", "-", mrn)[:60]
    return rid or "patient"


def export_bundle(chart: Chart) -> dict[str, Any]:
    """The chart as a FHIR bundle (plain JSON-able dict), validated with fhir.resources."""
    p = chart.patient
    pid = _resource_id(p["mrn"])
    subject = {"reference": f"Patient/{pid}"}
    ext = [{"url": EXT + "agent", "valueCode": p["agent"]}, {"url": EXT + "indication", "valueString": p["indication"]}]
    if p["therapy_start"]:
        ext.append({"url": EXT + "therapy-start", "valueDate": p["therapy_start"].isoformat()})
    if p["transplant_date"]:
        ext.append({"url": EXT + "transplant-date", "valueDate": p["transplant_date"].isoformat()})
    ext.append({"url": EXT + "region", "valueCode": p.get("region") or "EU"})
    if p.get("indication_code"):
        ext.append({"url": EXT + "indication-code", "valueCoding": {
            "system": _CODE_SYSTEMS.get(p.get("indication_system") or "", "urn:cnidose:code-system"),
            "code": p["indication_code"], "display": p["indication"]}})
    for key in ("severity", "donor-type", "donor-cyp3a5", "product", "route"):
        v = p.get(key.replace("-", "_"))
        if v:
            ext.append({"url": EXT + key, "valueString": str(v)})
    if p.get("strength_percent") is not None:
        ext.append({"url": EXT + "strength-percent", "valueDecimal": p["strength_percent"]})
    for c in p.get("conditions") or []:
        ext.append({"url": EXT + "condition", "valueString": c})
    resources: list[dict[str, Any]] = [{
        "resourceType": "Patient", "id": pid, "identifier": [{"system": "urn:cnidose:mrn", "value": p["mrn"]}],
        "name": [{"family": p["family_name"], "given": [p["given_name"]]}], "gender": p["sex"],
        "birthDate": p["birth_date"].isoformat(), "extension": ext}]
    n = 0

    def obs(category: str, coding: list[dict[str, Any]], text: str, when: dt.datetime, status: str,
            reason: str | None, value: dict[str, Any], **more: Any) -> None:
        nonlocal n
        n += 1
        r: dict[str, Any] = {"resourceType": "Observation", "id": f"{pid}-obs-{n}",
                             "status": _observation_status(status),
                             "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
                             "code": {"coding": coding, "text": text}, "subject": subject,
                             "effectiveDateTime": _iso(when), "valueQuantity": value, **more}
        if reason:
            r["note"] = [{"text": reason}]
        resources.append(r)

    for c in chart.covariates:
        extra = [{"url": EXT + "source", "valueString": c["source"]}] if c.get("source") else []
        obs("exam", [{"system": COVARIATE_SYSTEM, "code": c["name"]}], c["name"], c["measured_at"], c["status"],
            c["status_reason"], _qty(c["value"], c["unit"]), **_ext(extra + _flags(c)))
    for o in chart.observations:
        coding = [{"system": LOINC, "code": o["code"]}] if o["code"] else []
        category = {"level": "laboratory", "lab": "laboratory", "vital": "vital-signs"}[o["category"]]
        value = _qty(o["lloq"] if o["blq"] else o["value"], o["unit"])
        if o["blq"]:
            value["comparator"] = "<"
        more: dict[str, Any] = {"method": {"text": o["assay"]}} if o["assay"] else {}
        extra = [{"url": EXT + k, "valueString": o[k]} for k in ("sample", "matrix") if o.get(k)]
        obs(category, coding, o["name"], o["observed_at"], o["status"], o["status_reason"], value, **more,
            **_ext(extra + _flags(o)))
    for g in chart.genotypes:
        n += 1
        res: dict[str, Any] = {"resourceType": "Observation", "id": f"{pid}-obs-{n}",
                               "status": _observation_status(g["status"]),
                               "category": [{"coding": [{"system": CATEGORY, "code": "laboratory"}]}],
                               "code": {"coding": [{"system": GENE_SYSTEM, "code": g["gene"]}],
                                        "text": f"{g['gene']} genotype"},
                               "subject": subject, "valueString": g["result"],
                               **_ext([{"url": EXT + "source", "valueString": g["source"]}, *_flags(g)])}
        if g.get("tested_on"):
            res["effectiveDateTime"] = g["tested_on"].isoformat()
        if g["status_reason"]:
            res["note"] = [{"text": g["status_reason"]}]
        resources.append(res)
    for k, r in enumerate(chart.regimens, start=1):
        bounds: dict[str, Any] = {"start": _iso(r["start_at"])}
        if r["stop_at"]:
            bounds["end"] = _iso(r["stop_at"])
        res = {"resourceType": "MedicationRequest", "id": f"{pid}-rx-{k}",
               "status": "entered-in-error" if r["status"] == "entered-in-error" else (
                   "stopped" if r["stop_at"] else "active"),
               "intent": "order", "subject": subject,
               "medicationCodeableConcept": {"coding": [{"system": DRUG_SYSTEM, "code": r["drug"]}],
                                             "text": r["product"]},
               "dosageInstruction": [{"route": {"text": r["route"]},
                                      "timing": {"repeat": {"boundsPeriod": bounds, "frequency": 1,
                                                            "period": r["interval_h"], "periodUnit": "h"}},
                                      "doseAndRate": [{"doseQuantity": _qty(r["dose_mg"], "mg")}]}],
               **_ext(_flags(r))}
        if r["status_reason"]:
            res["note"] = [{"text": r["status_reason"]}]
        resources.append(res)
    for k, d in enumerate(chart.doses, start=1):
        eff: dict[str, Any]
        if d["infusion_h"]:
            eff = {"effectivePeriod": {"start": _iso(d["given_at"]),
                                       "end": _iso(d["given_at"] + dt.timedelta(hours=d["infusion_h"]))}}
        else:
            eff = {"effectiveDateTime": _iso(d["given_at"])}
        res = {"resourceType": "MedicationAdministration", "id": f"{pid}-dose-{k}",
               "status": "entered-in-error" if d["status"] == "entered-in-error" else "completed",
               "medicationCodeableConcept": {"coding": [{"system": DRUG_SYSTEM, "code": d["drug"]}],
                                             "text": d["product"]},
               "subject": subject, **eff,
               "dosage": {"route": {"text": d["route"]}, "dose": _qty(d["amount_mg"], "mg")}, **_ext(_flags(d))}
        if d["status_reason"]:
            res["note"] = [{"text": d["status_reason"]}]
        resources.append(res)
    for k, m in enumerate(chart.medications, start=1):
        period: dict[str, Any] = {"start": m["start_on"].isoformat()}
        if m["stop_on"]:
            period["end"] = m["stop_on"].isoformat()
        res = {"resourceType": "MedicationStatement", "id": f"{pid}-med-{k}",
               "status": "entered-in-error" if m["status"] == "entered-in-error" else (
                   "completed" if m["stop_on"] else "active"),
               "medicationCodeableConcept": {"text": m["name"], **({"coding": [
                   {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": m["rxnorm"]}]}
                   if m["rxnorm"] else {})},
               "subject": subject, "effectivePeriod": period}
        if m["daily_mg"] is not None:
            res["dosage"] = [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                              "doseAndRate": [{"doseQuantity": _qty(m["daily_mg"], "mg")}]}]
        if m["status_reason"]:
            res["note"] = [{"text": m["status_reason"]}]
        resources.append(res)
    for k, a in enumerate(chart.appointments, start=1):
        res = {"resourceType": "Appointment", "id": f"{pid}-appt-{k}", "status": _APPT_STATUS[a["status"]],
               "serviceType": [{"text": a["department"]}], "appointmentType": {"text": a["kind"]},
               "start": _iso(a["starts_at"]), "end": _iso(a["ends_at"]),
               "participant": [{"actor": subject, "status": "accepted"}]}
        if a["reason"]:
            res["description"] = a["reason"]
        if a["source"]:
            res["comment"] = a["source"]
        resources.append(res)
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:cnidose:{r['resourceType']}/{r['id']}", "resource": r} for r in resources]}
    _validate(bundle)
    return bundle


def _ext(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"extension": items} if items else {}


def _flags(e: dict[str, Any]) -> list[dict[str, Any]]:
    """The plausibility warnings confirmed at entry, one extension each."""
    return [{"url": EXT + "flag", "valueString": f} for f in (e.get("flags") or [])]


def _read_ext(r: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A resource's cnidose extensions (name -> value) and its flags."""
    out: dict[str, Any] = {}
    flags = []
    for e in r.get("extension") or []:
        name = str(e.get("url", "")).removeprefix(EXT)
        value = next((v for k, v in e.items() if k.startswith("value")), None)
        if name == "flag":
            flags.append(str(value))
        else:
            out[name] = value
    return out, flags


def _validate(bundle: Any) -> None:
    try:
        mod = importlib.import_module("fhir.resources.R4B.bundle")
    except ImportError:
        raise FieldError("FHIR needs the optional extra: pip install 'cnidose[fhir]'", field="bundle") from None
    try:
        mod.Bundle.model_validate(bundle)
    except ValidationError as exc:  # name the first failing location
        first = exc.errors()[0]
        where = ""
        for part in first.get("loc", ()):
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        raise FieldError(f"not a valid FHIR R4 bundle: {first.get('msg')}", field=where or "bundle") from None


def _get(d: Any, *path: Any, where: str, required: bool = True) -> Any:
    cur = d
    for key in path:
        if isinstance(key, int):
            cur = cur[key] if isinstance(cur, list) and len(cur) > key else None
        else:
            cur = cur.get(key) if isinstance(cur, dict) else None
        if cur is None:
            if required:
                raise FieldError("missing", field=f"{where}.{'.'.join(str(k) for k in path)}")
            return None
    return cur


def _instant(v: Any, where: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        raise FieldError(f"not a date-time: {v!r}", field=where) from None
    if t.tzinfo is None:
        raise FieldError(f"{v!r} has no time zone", field=where)
    return t


def import_bundle(store: Store, actor: Actor, bundle: Any) -> int:
    """Store the patient of a bundle (as written by :func:`export_bundle`, or by another system using the same
    resources) in one transaction; returns the new patient's id. Errors name ``entry[k].element``."""
    store.authorize(actor, "write", "import")  # before reading anything of the bundle
    _validate(bundle)
    if bundle.get("type") not in ("collection", "transaction", "batch", "document"):
        raise FieldError(f"unexpected bundle type {bundle.get('type')!r}", field="type")
    entries = bundle.get("entry") or []
    patients = [(k, e["resource"]) for k, e in enumerate(entries) if e.get("resource", {}).get("resourceType")
                == "Patient"]
    if len(patients) != 1:
        raise FieldError(f"expected exactly one Patient, found {len(patients)}", field="entry")
    k, pr = patients[0]
    where = f"entry[{k}].resource"
    ext = {e.get("url", "").removeprefix(EXT): e for e in pr.get("extension", [])}
    mrn = next((i.get("value") for i in pr.get("identifier", []) if i.get("system") == "urn:cnidose:mrn"),
               None) or _get(pr, "identifier", 0, "value", where=where)
    try:
        patient = make_patient(
            mrn=mrn, family_name=_get(pr, "name", 0, "family", where=where),
            given_name=" ".join(_get(pr, "name", 0, "given", where=where)), birth_date=_get(pr, "birthDate",
                                                                                            where=where),
            sex=pr.get("gender", "unknown"), agent=_get(ext, "agent", "valueCode", where=where + ".extension"),
            indication=_get(ext, "indication", "valueString", where=where + ".extension"),
            therapy_start=_get(ext, "therapy-start", "valueDate", where=where, required=False),
            transplant_date=_get(ext, "transplant-date", "valueDate", where=where, required=False))
    except FieldError as exc:
        raise FieldError(str(exc).split("] ", 1)[-1], field=f"{where}.{exc.field}") from None
    values, _ = _read_ext(pr)
    patient.region = values.get("region") or "EU"
    code = values.get("indication-code")
    if isinstance(code, dict):
        patient.indication_code = code.get("code")
        patient.indication_system = _CODE_BACK.get(code.get("system", ""), code.get("system"))
    for key in ("severity", "donor-type", "donor-cyp3a5", "product", "route"):
        if values.get(key):
            setattr(patient, key.replace("-", "_"), str(values[key]))
    if values.get("strength-percent") is not None:
        patient.strength_percent = float(values["strength-percent"])
    conditions = [str(e.get("valueString")) for e in pr.get("extension") or [] if e.get("url") == EXT + "condition"]
    patient.conditions = conditions or None
    ref = f"Patient/{pr.get('id')}"
    items: list[tuple[str, Any]] = []
    appts: list[S.Appointment] = []
    for k, e in enumerate(entries):
        r = e.get("resource", {})
        rt = r.get("resourceType")
        where = f"entry[{k}].resource"
        if rt == "Patient":
            continue
        subj = (r.get("subject") or {}).get("reference") if rt != "Appointment" else _get(
            r, "participant", 0, "actor", "reference", where=where)
        if subj != ref:
            raise FieldError(f"refers to {subj!r}, not the bundle's patient {ref!r}", field=f"{where}.subject")
        try:
            made = _entry(rt, r, where)
        except FieldError as exc:
            raise FieldError(str(exc).split("] ", 1)[-1],
                             field=exc.field if exc.field.startswith("entry[") else f"{where}.{exc.field}") from None
        if rt == "Appointment":
            appts.append(made)
        else:
            items += made
    return store.import_patient(actor, patient, items, appts, "FHIR bundle")


def _status(obj: Any, r: dict[str, Any]) -> Any:
    if r.get("status") == "entered-in-error":
        obj.status = "entered-in-error"
        obj.status_reason = _get(r, "note", 0, "text", where="", required=False)
    else:
        obj.status = "final"
    _, flags = _read_ext(r)
    obj.flags = flags or None
    return obj


def _entry(rt: str, r: dict[str, Any], where: str) -> Any:
    if rt == "Observation" and _get(r, "code", "coding", 0, "system", where=where, required=False) == GENE_SYSTEM:
        values, _ = _read_ext(r)
        when = r.get("effectiveDateTime")
        return [("genotype", _status(make_genotype(gene=_get(r, "code", "coding", 0, "code", where=where),
                                                   result=_get(r, "valueString", where=where),
                                                   source=values.get("source") or "FHIR import",
                                                   tested_on=str(when)[:10] if when else None), r))]
    if rt == "Observation":
        text = _get(r, "code", "text", where=where)
        system = _get(r, "code", "coding", 0, "system", where=where, required=False)
        q = _get(r, "valueQuantity", where=where)
        values, _ = _read_ext(r)
        at = _instant(_get(r, "effectiveDateTime", where=where), f"{where}.effectiveDateTime")
        value, unit = _get(q, "value", where=where + ".valueQuantity"), _get(q, "unit", where=where + ".valueQuantity")
        if system == COVARIATE_SYSTEM:
            cov = make_covariate(name=text, value=value, unit=unit, measured_at=at)
            cov.source = values.get("source")
            return [("covariate", _status(cov, r))]
        if text.endswith(" level"):
            blq = q.get("comparator") == "<"
            assay = _get(r, "method", "text", where=where, required=False)
            return [("observation", _status(make_level(drug=text.removesuffix(" level"), value=value, unit=unit,
                                                       observed_at=at, blq=blq, lloq=value if blq else None,
                                                       assay=assay, sample=values.get("sample"),
                                                       matrix=values.get("matrix")), r))]
        if text in ("systolic blood pressure", "diastolic blood pressure"):
            return [("observation", _status(make_vital(name=text, value=value, observed_at=at), r))]
        return [("observation", _status(make_lab(name=text, value=value, unit=unit, observed_at=at), r))]
    if rt == "MedicationAdministration":
        drug = _get(r, "medicationCodeableConcept", "coding", 0, "code", where=where)
        dose = _get(r, "dosage", "dose", where=where)
        if "effectivePeriod" in r:
            start = _instant(_get(r, "effectivePeriod", "start", where=where), f"{where}.effectivePeriod.start")
            end = _instant(_get(r, "effectivePeriod", "end", where=where), f"{where}.effectivePeriod.end")
            infusion = (end - start).total_seconds() / 3600.0
        else:
            start, infusion = _instant(_get(r, "effectiveDateTime", where=where), f"{where}.effectiveDateTime"), None
        return [("dose", _status(make_dose(drug=drug, product=_get(r, "medicationCodeableConcept", "text", where=where),
                                           amount=_get(dose, "value", where=where + ".dosage.dose"),
                                           unit=_get(dose, "unit", where=where + ".dosage.dose"), given_at=start,
                                           route=_get(r, "dosage", "route", "text", where=where, required=False)
                                           or "oral", infusion_h=infusion), r))]
    if rt == "MedicationRequest":
        di = _get(r, "dosageInstruction", 0, where=where)
        rep = _get(di, "timing", "repeat", where=where + ".dosageInstruction[0]")
        if rep.get("periodUnit", "h") != "h" or rep.get("frequency", 1) != 1:
            raise FieldError("cnidose reads regimens as one dose every period in hours", field="dosageInstruction")
        q = _get(di, "doseAndRate", 0, "doseQuantity", where=where + ".dosageInstruction[0]")
        bounds = rep.get("boundsPeriod") or {}
        return [("regimen", _status(make_regimen(
            drug=_get(r, "medicationCodeableConcept", "coding", 0, "code", where=where),
            product=_get(r, "medicationCodeableConcept", "text", where=where), dose=_get(q, "value", where=where),
            unit=_get(q, "unit", where=where), interval_h=_get(rep, "period", where=where),
            start_at=_instant(_get(bounds, "start", where=where + ".boundsPeriod"), f"{where}.boundsPeriod.start"),
            stop_at=_instant(bounds["end"], f"{where}.boundsPeriod.end") if bounds.get("end") else None,
            route=(di.get("route") or {}).get("text", "oral")), r))]
    if rt == "MedicationStatement":
        period = _get(r, "effectivePeriod", where=where)
        daily = _get(r, "dosage", 0, "doseAndRate", 0, "doseQuantity", "value", where=where, required=False)
        rx = _get(r, "medicationCodeableConcept", "coding", 0, "code", where=where, required=False)
        return [("medication", _status(make_medication(
            name=_get(r, "medicationCodeableConcept", "text", where=where), start_on=_get(period, "start", where=where),
            stop_on=period.get("end"), daily_mg=daily, rxnorm=rx), r))]
    if rt == "Appointment":
        status = _APPT_BACK.get(r.get("status", ""))
        if status is None:
            raise FieldError(f"status {r.get('status')!r} (proposed, booked, cancelled, fulfilled)", field="status")
        start = _instant(_get(r, "start", where=where), f"{where}.start")
        end = _instant(_get(r, "end", where=where), f"{where}.end")
        if end <= start:
            raise FieldError("ends before it starts", field="end")
        return S.Appointment(department=_get(r, "serviceType", 0, "text", where=where),
                             kind=_get(r, "appointmentType", "text", where=where), starts_at=start, ends_at=end,
                             status=status, reason=r.get("description"), source=r.get("comment"))
    raise FieldError(f"cnidose does not read {rt} resources", field="resourceType")
