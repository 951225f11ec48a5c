"""Plain (JSON-ready) descriptions of models, for the CLI and, later, the web app."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnidose.models.model import Model
from cnidose.pk.structure import LinearStructure

__all__ = ["describe_model", "summarize_model"]


def summarize_model(model: Model) -> dict[str, Any]:
    """One line's worth: identity, drug, formulation, population, confirmation."""
    m = model.meta
    return {
        "id": model.id,
        "version": model.version,
        "title": model.title,
        "drug": m.get("drug", ""),
        "formulations": list(m.get("formulations", ())),
        "release": m.get("release", ""),
        "route": list(m.get("route", ())),
        "organ": m.get("organ", ""),
        "age_group": m.get("age_group", ""),
        "population": m.get("population", ""),
        "confirmed": bool(m.get("confirmed", False)),
        "doi": str(model.citation.get("doi", "")),
        "content_hash": model.content_hash,
    }


def describe_model(model: Model) -> dict[str, Any]:
    """Everything a reviewer needs: citation, domain, structure, parameters, variability, covariates, checks."""
    s = model.structure
    structure: dict[str, Any] = {
        "compartments": list(s.compartments),
        "default_dose": s.compartments[s.default_dose - 1],
        "default_obs": s.compartments[s.default_obs - 1],
        "iv_dose": None if model.iv_dose is None else s.compartments[model.iv_dose - 1],
        "transit_input": None if s.gamma is None else {"into": s.compartments[s.gamma.cmt - 1], "n": s.gamma.n,
                                                       "mtt": s.gamma.mtt},
    }
    if isinstance(s, LinearStructure):
        structure["kind"] = "linear"
        structure["flows"] = [{"from": s.compartments[f.source - 1],
                               "to": None if f.target is None else s.compartments[f.target - 1],
                               "rate": f.rate if f.per is None else f"{f.rate}/{f.per}"} for f in s.flows]
    else:
        structure["kind"] = "ode"

    def effects(re: Any) -> dict[str, Any] | None:
        if re is None:
            return None
        sd = np.sqrt(np.diag(re.omega))
        corr = [[a, b, float(re.omega[i, j] / (sd[i] * sd[j]))]
                for i, a in enumerate(re.names) for j, b in enumerate(re.names)
                if j > i and re.omega[i, j] != 0]
        return {"names": list(re.names), "variance": [float(v) for v in np.diag(re.omega)],
                "published": re.published, "correlations": corr, "occasion": re.occasion}

    out = summarize_model(model)
    out.update({
        "citation": dict(model.citation),
        "matrix": model.meta.get("matrix", ""),
        "assay": model.meta.get("assay", ""),
        "confirmation": model.meta.get("confirmation", ""),
        "notes": list(model.meta.get("notes", ())),
        "domain": dict(model.meta.get("domain", {})),
        "units": dict(model.units),
        "structure": structure,
        "parameters": [{"name": p.name, "value": p.value, "unit": p.unit, "description": p.description,
                        "source": p.source, "fixed": p.fixed} for p in model.parameters.values()],
        "random_effects": effects(model.iiv),
        "iov": effects(model.iov),
        "covariates": [{"name": c.name, "unit": c.unit, "data_unit": c.data_unit, "description": c.description,
                        "domain": list(c.domain) if c.domain else None, "default": c.default,
                        "default_note": c.default_note, "derive": c.derive, "derive_note": c.derive_note,
                        "levels": {str(k): v for k, v in c.levels.items()}, "domain_only": c.domain_only,
                        "medications": list(c.medications), "medication_after_days": c.after_days}
                       for c in model.covariates.values()],
        "pk": [{"name": n, "expr": e.source, "unit": model.pk_units.get(n)} for n, e in model.pk],
        "observations": [{"name": o.name, "compartment": s.compartments[o.compartment - 1],
                          "scale": o.scale.source, "scale_unit": o.scale_unit, "unit": o.unit,
                          "transform": o.transform.source if o.transform else None,
                          "error": None if o.error is None else {
                              "model": o.error.kind,
                              "proportional": o.error.proportional.source if o.error.proportional else None,
                              "additive": o.error.additive.source if o.error.additive else None,
                              "sd": o.error.exponential.source if o.error.exponential else None}}
                         for o in model.observations],
        "checks": [{"name": c.name, "kind": c.kind, "statement": c.statement, "source": c.source,
                    "expected": c.expected, "rtol": c.rtol} for c in model.checks],
        "source": model.source,
        "adaptation": dict(model.meta["adaptation"]) if "adaptation" in model.meta else None,
    })
    return out
