"""Demo data (fictional people): a kidney-transplant recipient on tacrolimus with several troughs and a
creatinine rise, and a psoriasis patient on oral cyclosporine. Times are relative to ``today`` so that the
demo always looks current.
"""

from __future__ import annotations

import datetime as dt

from cnidose.records.store import SYSTEM, Store

__all__ = ["seed_demo"]


def seed_demo(store: Store, today: dt.date | None = None) -> dict[str, int]:
    """Create the demo patients; returns their ids by MRN."""
    today = today or dt.datetime.now(dt.UTC).date()
    tx = today - dt.timedelta(days=20)  # transplanted 20 days ago

    def at(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
        return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)

    kid = store.add_patient(SYSTEM, mrn="DEMO-TX-1", family_name="Demo", given_name="Karel", birth_date="1968-03-14",
                            sex="male", agent="tacrolimus", indication="kidney transplant", therapy_start=tx,
                            transplant_date=tx)
    for name, value, unit in (("WT", 82.0, "kg"), ("HT", 178.0, "cm"), ("CYP3A5", 0, "1"), ("ALB", 38.0, "g/L"),
                              ("HCT", 0.30, "L/L"), ("SCR", 160.0, "umol/L")):
        store.add_covariate(SYSTEM, kid, name, value, unit, at(tx, 6))
    store.add_regimen(SYSTEM, kid, drug="tacrolimus", product="Prograf", dose=5, unit="mg", interval_h=12,
                      start_at=at(tx, 8))
    troughs = {3: 5.1, 6: 7.4, 9: 9.8, 13: 12.6, 17: 13.9}  # ng/mL, drawn before the morning dose
    doses, levels = [], []
    for day in range(20):
        d = tx + dt.timedelta(days=day)
        for hour in (8, 20):
            doses.append({"drug": "tacrolimus", "product": "Prograf", "amount": 5, "unit": "mg",
                          "given_at": at(d, hour)})
        if day in troughs:
            levels.append({"drug": "tacrolimus", "value": troughs[day], "unit": "ng/mL", "observed_at": at(d, 7, 50),
                           "assay": "LC-MS/MS"})
    store.add_doses_and_levels(SYSTEM, kid, doses, levels)
    for day, scr in ((1, 180.0), (5, 132.0), (9, 118.0), (13, 126.0), (17, 151.0)):
        store.add_lab(SYSTEM, kid, name="creatinine", value=scr, unit="umol/L",
                      observed_at=at(tx + dt.timedelta(days=day), 7))
    for day, (sbp, dbp) in ((2, (138, 84)), (10, (146, 92)), (17, (152, 95))):
        store.add_blood_pressure(SYSTEM, kid, systolic=sbp, diastolic=dbp,
                                 observed_at=at(tx + dt.timedelta(days=day), 9))
    store.add_medication(SYSTEM, kid, name="mycophenolate mofetil", start_on=tx, daily_mg=2000)
    store.add_medication(SYSTEM, kid, name="prednisolone", start_on=tx, daily_mg=20)

    start = today - dt.timedelta(days=70)
    pso = store.add_patient(SYSTEM, mrn="DEMO-DERM-1", family_name="Demo", given_name="Petra",
                            birth_date="1981-09-02", sex="female", agent="cyclosporine", indication="psoriasis",
                            therapy_start=start)
    store.add_covariate(SYSTEM, pso, "WT", 64.0, "kg", at(start, 9))
    store.add_regimen(SYSTEM, pso, drug="cyclosporine", product="Neoral", dose=75, unit="mg", interval_h=12,
                      start_at=at(start, 8))
    for day, scr in ((-7, 68.0), (-3, 70.0), (14, 74.0), (28, 81.0), (42, 88.0), (56, 90.0)):
        store.add_lab(SYSTEM, pso, name="creatinine", value=scr, unit="umol/L",
                      observed_at=at(start + dt.timedelta(days=day), 8))
    for day, (sbp, dbp) in ((-7, (124, 78)), (28, (136, 86)), (56, (142, 91))):
        store.add_blood_pressure(SYSTEM, pso, systolic=sbp, diastolic=dbp,
                                 observed_at=at(start + dt.timedelta(days=day), 9))
    return {"DEMO-TX-1": kid, "DEMO-DERM-1": pso}
