"""How a forecast or a recommendation is made from a fit: the forecasting strategies of issue 15.

Each is named by a spec such as ``"flat:2+occ-last"`` (:func:`strategy`) and is the same in ``cnidose fit``,
``recommend`` and ``evaluate``, the API and the web app:

- ``map``: plain MAP with the published priors; a level in an occasion the fit has not seen is forecast with
  that occasion's effect at its prior mean (zero) -- the occasion-aware default (Abrantes et al. 2019, CPT
  Pharmacometrics Syst Pharmacol 8:676: estimate with the occasion effects, forecast without them).
- ``flat:L``: flattened priors, the between-subject covariance Omega multiplied by L > 1 (Hughes & Keizer 2021,
  Clin Pharmacol Ther 110:1353): the levels weigh more against the population; the occasion prior is kept.
- ``occ-last``: the next occasion takes the effect estimated for the last occasion with a level (carry-forward):
  for occasion variability that persists from one occasion to the next.
- ``log``: transform both sides -- a proportional or combined error fitted on the log scale with the SD at the
  measured level (:class:`cnidose.models.model.Fitting`). With a proportional error of SD p, the ``ln V(f)``
  term of the natural-scale objective penalises larger predictions and biases the MAP forecasts low by
  about p² (Andrews 2019, p = 0.245: about 6 %); on the log scale the variance does not depend on the
  prediction and that bias is gone.
- ``forget:D``: exponential forgetting -- a level's weight halves for every D days of its age (counted from the
  newest level): half the newest's weight after D days, a quarter after 2D; the weights are scaled to a mean of
  1, so the levels together weigh as much against the prior as without forgetting (weights that only fall also
  hand weight to the population prior, which a drifting patient is leaving: that version lost to plain MAP on
  the simulated drift cohort). A time-weighting scheme for parameters that drift (clearance over the first
  weeks after transplantation); PKPDmap's ``weight_by_time`` is a linear-gradient precedent.

- ``drift:W``: between-occasion effects that drift -- each is the model's occasion-to-occasion variability plus a
  random walk (a Wiener process from the patient's first occasion) with SD W (log units) after one week, so the
  effects of occasions close in time are alike and the next occasion takes the conditional mean of the recent
  ones (kriging) instead of zero. A time-aware update for a parameter that changes with time since
  transplantation (tacrolimus clearance falls over the first weeks as corticosteroids are tapered and haematocrit
  recovers) without a model of its course: the random-walk ("local level") prior of Bayesian tracking and Kalman
  filtering, applied to the model's own occasion effects (their published SDs are kept). For models with
  between-occasion effects on clearance or bioavailability; without occasion effects it changes nothing.

- ``post``: the forecast is the median of the posterior predictive distribution (posterior draws of the random
  effects by SIR, a new occasion's effect drawn from its prior) instead of the prediction at the MAP estimate.
  The MAP estimate is the posterior mode; with effects the levels inform little (Andrews 2019: distribution
  volume and clearance, SDs 0.5-0.8, from troughs) the prediction at the mode is not the median prediction, and
  shrinkage towards the typical values carries the a-priori bias into every forecast. A recommendation always
  uses the posterior draws: ``post`` makes the evaluation measure what the recommendation predicts.

In a recommendation (:func:`cnidose.dosing.regimen.recommend`) the future occasions' effects are drawn from their
prior (the posterior predictive of a new occasion), or with ``occ-last`` taken from the posterior of the last
occasion with a level. Combining models (averaging, selection) is :mod:`cnidose.dosing.averaging`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from cnidose.errors import InputError
from cnidose.models.model import Fitting, Model

__all__ = ["STRATEGY_HELP", "Strategy", "strategy"]


@dataclass(frozen=True, slots=True)
class Strategy:
    """How a forecast is made from a fit (module docstring)."""

    name: str = "map"
    prior_scale: float = 1.0  # Omega (between-subject) multiplied by this
    occasion: str = "prior"  # "prior": an unseen occasion's effect at zero; "last": the last seen occasion's
    log_scale: bool = False  # fit on the log scale (transform both sides)
    half_life: float | None = None  # hours; older levels weigh less (exponential forgetting)
    drift: float | None = None  # random-walk SD per week of the between-occasion effects (Fitting.drift)
    forecast: str = "map"  # "map": the prediction at the MAP estimate; "posterior": the posterior predictive median

    def apply(self, model: Model) -> Model:
        """The model as this strategy fits it (the same model for plain ``map``)."""
        out = model
        if self.prior_scale != 1.0:
            out = replace(out, iiv=replace(out.iiv, omega=out.iiv.omega * self.prior_scale))
        fitting = Fitting(self.log_scale, self.half_life, self.drift)
        if fitting != out.fitting:
            out = replace(out, fitting=fitting)
        return out

    def describe(self) -> str:
        """One line a clinician can read: what this strategy changes, and its source."""
        parts = []
        if self.prior_scale != 1.0:
            parts.append(f"between-patient variability widened x{self.prior_scale:g} (Hughes & Keizer 2021)")
        if self.log_scale:
            parts.append("levels fitted on the log scale (transform both sides)")
        if self.half_life is not None:
            parts.append(f"older levels weigh less: half-weight after {self.half_life / 24:g} days")
        if self.drift is not None:
            parts.append(f"between-occasion effects drift as a random walk (SD {self.drift:g} per week)")
        if self.occasion == "last":
            parts.append("the last occasion's effect carried to the next")
        if self.forecast == "posterior":
            parts.append("forecast: the median of the posterior predictive (as the recommendation's)")
        return "; ".join(parts) or "published priors; a new occasion at its prior (Abrantes 2019)"


STRATEGY_HELP = ("map, flat:L (1 < L <= 100), occ-last, log, forget:D (half-life D days), drift:W (random-walk SD W "
                 "per week), post, joined by +")


def strategy(spec: str) -> Strategy:
    """The strategy named by ``spec``: ``map``, ``flat:L`` (L > 1), ``occ-last``, ``log``, ``forget:D`` (older
    levels at half weight after D days), ``drift:W`` (occasion effects drift, SD W per week), ``post``, or parts
    joined by ``+``. Its name is the canonical spelling (parts in the order flat, log, forget, drift, occ-last, post),
    so that equal strategies have equal names.

    >>> strategy("occ-last + flat:2").name
    'flat:2+occ-last'
    >>> strategy("drift:0.2+post").drift
    0.2
    >>> strategy("log+forget:14").half_life
    336.0
    """
    scale, occasion, log, half_life, drift, forecast = 1.0, "prior", False, None, None, "map"
    parts = [x.strip() for x in spec.split("+") if x.strip()]
    if not parts:
        raise InputError(f"a forecasting strategy is {STRATEGY_HELP}; got an empty one")
    for part in parts:
        if part == "map":
            continue
        if part == "occ-last":
            occasion = "last"
        elif part == "log":
            log = True
        elif part == "post":
            forecast = "posterior"
        elif part.startswith("flat:"):
            scale = _number(part, "flat:L needs a number L > 1", lambda v: 1.0 < v <= 100.0,
                            "flat:L needs 1 < L <= 100 (Omega multiplied by L)")
        elif part.startswith("forget:"):
            half_life = 24.0 * _number(part, "forget:D needs a half-life D in days", lambda v: 0.5 <= v <= 3650.0,
                                       "forget:D needs 0.5 <= D <= 3650 days")
        elif part.startswith("drift:"):
            drift = _number(part, "drift:W needs a random-walk SD W per week", lambda v: 0.0 < v <= 2.0,
                            "drift:W needs 0 < W <= 2 (log units per week)")
        else:
            raise InputError(f"unknown forecasting strategy {part!r} (known: {STRATEGY_HELP})")
    parts = ([f"flat:{scale:g}"] if scale != 1.0 else []) + (["log"] if log else [])
    parts += ([f"forget:{half_life / 24.0:g}"] if half_life is not None else []) + (
        [f"drift:{drift:g}"] if drift is not None else []) + (["occ-last"] if occasion == "last" else []) + (
        ["post"] if forecast == "posterior" else [])
    return Strategy("+".join(parts) or "map", scale, occasion, log, half_life, drift, forecast)


def _number(part: str, what: str, ok: Callable[[float], bool], bounds: str) -> float:
    """The number after the colon of a strategy part (``flat:2``), checked; InputError saying what it needs."""
    try:
        value = float(part.split(":", 1)[1])
    except ValueError:
        raise InputError(f"{what}, got {part!r}") from None
    if not ok(value):
        raise InputError(f"{bounds}, got {part!r}")
    return value
