"""The ``cnidose`` command line.

Errors from :mod:`cnidose.errors` become one line on standard error and an
exit code, in one place (:func:`_run`): 2 for bad input, 3 for a numerical
failure. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cnidose.errors import CnidoseError, InputError

if TYPE_CHECKING:
    from cnidose.models.model import Notice

# The numerical work is many tiny matrices at once: BLAS threads only add overhead there (measured with
# benchmarks/bench_forecast.py, 304 Størset forecasts: 30.9 s wall and 49.4 s of CPU with OpenBLAS's threads,
# 29.9 s and 28.8 s with one). Parallel work goes through --backend processes or dask instead, whose workers
# inherit this. Set before NumPy is first imported; a user's own setting wins.
for _threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

# Everything heavy (NumPy, SciPy, the model library, the data readers) is imported inside the commands, so that
# `cnidose --help` and a command's argument errors answer at once (`python -X importtime -m cnidose.cli`).

# plain (click) help and usage errors: Typer's rich rendering imports rich's markdown and syntax machinery, about
# 0.15 s of a 0.4 s `cnidose --help` (the progress bars still use rich, imported when a command runs)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="cnidose: calcineurin-inhibitor pharmacokinetics and dosing.")
models_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                         help="The model library: list, show and check models.")
app.add_typer(models_app, name="models")

T = TypeVar("T")


def _nan(x: float | None) -> float:
    """None (not computed) as NaN, which the tables and the CSV write as missing."""
    return float("nan") if x is None else x


def _run(fn: Callable[[], T]) -> T:
    from cnidose.pk.compiled import on_first_compilation

    told: list[str] = []

    def compiling(name: str) -> None:  # a first fit on a new machine pauses: say why, once
        if not told:
            told.append(name)
            typer.echo("cnidose: compiling the numerical kernels for this machine (once: up to a minute; then "
                       "cached in CNIDOSE_CACHE_DIR or ~/.cache/cnidose/kernels)", err=True)

    on_first_compilation(compiling)
    try:
        return fn()
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except CnidoseError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    finally:  # a command's choice of compiled code (_compiled_for) ends with it
        while _CHOSEN:
            os.environ.pop(_CHOSEN.pop(), None)


def _compiled_for(models: Sequence[Any], individuals: Sequence[Any], *, per_level: bool = False,
                  repeats: int = 1) -> None:
    """Load the compiled kernels in this run (and its local workers, which inherit the environment) only where
    they pay for their loading (:func:`cnidose.estimation.cohort.compiled_pays`: about a second of a short run,
    against about 25 ms saved per fit on the engine path); a user's ``CNIDOSE_COMPILED`` wins. :func:`_run` takes
    the setting back when the command ends."""
    if "CNIDOSE_COMPILED" in os.environ:
        return
    from cnidose.estimation.cohort import compiled_pays

    os.environ["CNIDOSE_COMPILED"] = "1" if compiled_pays(models, individuals, per_level=per_level,
                                                          repeats=repeats) else "0"
    _CHOSEN.append("CNIDOSE_COMPILED")


_CHOSEN: list[str] = []  # environment variables a command set for its run (_compiled_for)


@contextlib.contextmanager
def _progress(label: str, total: int, show: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on standard error (when it is a terminal): yields the callback (done, total)."""
    if not show or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def update(done: int, of: int) -> None:
            bar.update(task, completed=done, total=of)

        yield update


@app.callback()
def main() -> None:
    """cnidose: calcineurin-inhibitor pharmacokinetics and dosing."""


DoseValuesOpt = Annotated[str, typer.Option(
    "--dose-values", help="which record's F, R, D a lagged or additional dose takes: nonmem (the record ending "
    "the interval it enters in, PREDPP) | dose-record (its own record, as mrgsolve)")]


def _resolve(model: str, dose_values: str) -> Any:
    """The model, with the dose-value convention asked for (README, "Conventions worth knowing")."""
    from cnidose.models.library import resolve_model

    if dose_values not in ("nonmem", "dose-record"):
        raise InputError(f"--dose-values must be nonmem or dose-record, got {dose_values!r}")
    from dataclasses import replace

    m = resolve_model(model)
    return m if dose_values == m.dose_values else replace(m, dose_values=dose_values)  # type: ignore[arg-type]


@app.command()
def simulate(
    model: Annotated[str, typer.Option("--model", "-m", help="model file (.toml) or library id")],
    data: Annotated[Path, typer.Option("--data", "-d", help="NONMEM-format CSV")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output CSV (default: standard output)")] = None,
    method: Annotated[str, typer.Option(help="auto | closed | expm | ode")] = "auto",
    dose_values: DoseValuesOpt = "nonmem",
) -> None:
    """Predict every record of a NONMEM-format data set (PRED and IPRED)."""
    import numpy as np

    from cnidose.records.nonmem import read_nonmem_csv, simulate_dataset, write_csv

    if method not in ("auto", "closed", "expm", "ode"):
        typer.echo(f"error: --method must be auto, closed, expm or ode, got {method!r}", err=True)
        raise typer.Exit(2)

    def work() -> None:
        m = _resolve(model, dose_values)
        ds = read_nonmem_csv(data)
        _compiled_for([m], ds.individuals())
        table = simulate_dataset(m, ds, method=method)  # type: ignore[arg-type]
        _echo_notices(table.notices)
        inds = table.individuals
        evid = np.concatenate([i.evid for i in inds]) if inds else np.zeros(0, int)
        cmt_eff = np.concatenate([
            np.where(i.cmt > 0, i.cmt, np.where(i.evid == 0, m.structure.default_obs, m.structure.default_dose))
            for i in inds]) if inds else np.zeros(0, int)
        names = ds.names
        pred_name, ipred_name = _prediction_names(names)
        keep = list(range(len(names)))
        header = [ds.header[j] for j in keep]
        extra_cols = []
        if "EVID" not in names:
            header.append("EVID")
            extra_cols.append(evid)
        if "CMT" not in names:
            header.append("CMT")
            extra_cols.append(cmt_eff)
        header += [pred_name, ipred_name]
        rows = ([row[j] for j in keep] + [int(c[k]) for c in extra_cols]
                + [float(table.pred[k]), float(table.ipred[k])]
                for k, row in enumerate(ds.cells))
        text = write_csv(out, header, rows)
        methods = "/".join(sorted(set(table.methods)))
        if out is None:
            sys.stdout.write(text)
            typer.echo(f"model {m.ref}, method {methods}", err=True)
        else:
            typer.echo(f"wrote {len(ds.cells)} rows to {out} (model {m.ref}, method {methods})", err=True)

    _run(work)


BackendOpt = Annotated[str, typer.Option(help="serial | processes | dask")]
SchedulerOpt = Annotated[str | None, typer.Option(help="Dask scheduler address, tcp://HOST:PORT (none: a loopback "
                                                  "cluster of --workers processes)")]
WorkersOpt = Annotated[int | None, typer.Option(help="local processes or loopback Dask workers")]


StrategyOpt = Annotated[str, typer.Option("--strategy", "-s", help=(
    "how the levels are fitted: map (published priors), flat:L (Omega x L), log (fit on the log scale), "
    "forget:D (older levels at half weight after D days), occ-last (recommend: the last occasion's effect "
    "carried forward), post (evaluate: the posterior predictive median; a recommendation always uses it), parts "
    "joined by +; see cnidose.dosing.strategies"))]


@app.command()
def fit(
    model: Annotated[str, typer.Option("--model", "-m", help="model file (.toml) or library id")],
    data: Annotated[Path, typer.Option("--data", "-d", help="NONMEM-format CSV with DV (and BLQ, LLOQ)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="estimates CSV (default: standard output)")] = None,
    predictions: Annotated[Path | None, typer.Option("--predictions", "-p",
                                                     help="per-record CSV with IPRED and PRED")] = None,
    covariance: Annotated[str, typer.Option(help="expected (NONMEM) | exact")] = "expected",
    eta_names: Annotated[str, typer.Option("--eta-names", help="model | positional (ETA1..ETAn)")] = "model",
    progress: Annotated[bool, typer.Option(help="progress bar on standard error")] = True,
    backend: BackendOpt = "serial",
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    chunk_size: Annotated[int, typer.Option(help="individuals per chunk of work")] = 500,
    dose_values: DoseValuesOpt = "nonmem",
    strategy_spec: StrategyOpt = "map",
) -> None:
    """MAP Bayesian estimates of every individual's random effects (NONMEM's objective).

    One row per individual: ID, the random effects in the model's declared order, their posterior SDs,
    OFV (the objective at the estimate), STATUS and MESSAGE. An individual that cannot be fitted gets
    STATUS error and a message naming its record; the others are fitted regardless.
    """
    import numpy as np

    from cnidose.records.nonmem import check_doses, read_nonmem_csv, write_csv

    if covariance not in ("expected", "exact") or eta_names not in ("model", "positional"):
        typer.echo("error: --covariance is expected or exact; --eta-names is model or positional", err=True)
        raise typer.Exit(2)

    def work() -> None:
        from cnidose.dosing.strategies import strategy
        from cnidose.estimation import fit_map

        strat = strategy(strategy_spec)
        m = strat.apply(_resolve(model, dose_values))
        if strat.occasion == "last" or strat.forecast == "posterior":
            typer.echo("note: occ-last and post change forecasts and recommendations, not the estimates", err=True)
        ds = read_nonmem_csv(data)
        inds = ds.individuals()
        check_doses(m, inds)
        _compiled_for([m], inds)
        with _progress("fitting", len(inds), progress and len(inds) >= 200) as callback:
            if backend == "serial" and scheduler is None:
                results = fit_map(m, inds, covariance=covariance, progress=callback)  # type: ignore[arg-type]
            else:
                from cnidose.cohort import batch_fit

                results = batch_fit(m, inds, backend=backend, scheduler=scheduler,  # type: ignore[arg-type]
                                    workers=workers, chunk_size=chunk_size, covariance=covariance,
                                    progress=callback)
        names = list(m.eta_names) if eta_names == "model" else [f"ETA{k + 1}" for k in range(len(m.eta_names))]
        # between-occasion effects (KAPPA_CL_OCC1, ...): one column per occasion of the individual with the most
        n_occ = max((r.kappa.shape[0] for r in results if r.kappa is not None), default=0)
        kappa_names = [f"{n}_OCC{k + 1}" for k in range(n_occ) for n in (m.iov.names if m.iov is not None else ())]
        header = ["ID", *names, *kappa_names, *(f"SD_{n}" for n in names), *(f"SD_{n}" for n in kappa_names),
                  "OFV", "STATUS", "MESSAGE"]
        rows = []
        position = {n: k for k, n in enumerate([*m.eta_names, *kappa_names])}
        for r in results:
            sd = [float("nan")] * (len(names) + len(kappa_names))
            if r.covariance is not None:
                for k, nm in enumerate(r.names):
                    if nm in position:
                        sd[position[nm]] = float(np.sqrt(r.covariance[k, k]))
            kap = [float("nan")] * len(kappa_names)
            if r.kappa is not None:
                flat = np.asarray(r.kappa, dtype=float).ravel()
                kap[:flat.size] = [float(x) for x in flat]
            rows.append([_id(r.id), *(float(x) for x in r.eta), *kap, *sd, float(r.ofv), r.status, r.message])
        text = write_csv(out, header, rows)
        if out is None:
            sys.stdout.write(text)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        typer.echo(f"{len(results)} individuals: {summary} (model {m.ref}, covariance {covariance}, strategy "
                   f"{strat.name}: {strat.describe()})", err=True)
        _echo_notices([n for r in results for n in r.notices])
        for r in results:
            if r.status == "error":
                typer.echo(f"error: ID {_id(r.id)}: {r.message}", err=True)
        if predictions is not None:
            _write_predictions(m, ds, inds, results, predictions)
        if results and all(r.status == "error" for r in results):
            typer.echo(f"error: no individual of {data} could be fitted (messages above)", err=True)
            raise typer.Exit(2)

    _run(work)


@app.command()
def recommend(
    model: Annotated[str | None, typer.Option("--model", "-m",
                                              help="model file or library id; several, comma-separated, are averaged "
                                                   "(with --patient: instead of the default model)")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d",
                                              help="NONMEM-format CSV: doses, levels (DV), covariates")] = None,
    patient: Annotated[str | None, typer.Option("--id", help="the patient's ID in the data")] = None,
    record_file: Annotated[Path | None, typer.Option("--patient", help="a patient record (cnidose.patient/2 JSON): "
                                                     "the same use case as the web app, interactions included")
                           ] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="with --patient: the date, YYYY-MM-DD (default today)")
                     ] = None,
    target: Annotated[str | None, typer.Option(help="target range LOW-HIGH (e.g. 7-10)")] = None,
    organ: Annotated[str | None, typer.Option(help="look the target up: organ (kidney, liver, heart, lung)")] = None,
    months: Annotated[float | None, typer.Option(help="look the target up: months since transplantation")] = None,
    concomitant: Annotated[str, typer.Option(help="look the target up: azathioprine | mmf | corticosteroids")] = "any",
    targets_file: Annotated[Path | None, typer.Option("--targets", help="a centre's targets file")] = None,
    metric: Annotated[str, typer.Option(help="trough | c2 | auc | average")] = "trough",
    interval: Annotated[float | None, typer.Option(help="dosing interval, h (default: the formulation's)")] = None,
    formulation: Annotated[str | None, typer.Option(help="Prograf, Advagraf, Envarsus XR, Neoral ...")] = None,
    draws: Annotated[int, typer.Option(help="posterior draws")] = 1000,
    seed: Annotated[int, typer.Option(help="random seed (results are reproducible)")] = 0,
    intervals: Annotated[str | None, typer.Option(help="also compare these intervals, e.g. 12,24")] = None,
    loading: Annotated[bool, typer.Option(help="also propose a first (loading) dose")] = False,
    choice: Annotated[str, typer.Option(help="aim (of the doses whose median is in the target, the one closest "
                                             "to --aim, then the most likely in it) | most-likely (the one most "
                                             "likely in the target) | smallest (the smallest: the low edge)")
                      ] = "aim",
    aim: Annotated[float | None, typer.Option(help="the level to aim at, in the target (default: its middle)")
                   ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    strategy_spec: StrategyOpt = "map",
) -> None:
    """Recommend the next regimen for one patient: the dose in marketed strengths, predicted exposure,
    80 % interval and probability in range, with inputs, model, version and warnings."""
    from cnidose.models.library import resolve_model
    from cnidose.records.nonmem import read_nonmem_csv


    def work() -> None:
        from cnidose.dosing import Target, find_target, load_targets, product
        from cnidose.dosing import recommend as do_recommend
        from cnidose.dosing.strategies import strategy

        strat = strategy(strategy_spec)
        if record_file is not None:
            _recommend_record(record_file, as_of, model, draws, seed, as_json, strat.name)
            return
        if model is None or data is None or patient is None:
            raise InputError("give --patient RECORD.json, or --model, --data and --id")
        ms = [strat.apply(resolve_model(x.strip())) for x in model.split(",") if x.strip()]
        m = ms[0]
        drug = m.meta.get("drug", "")
        if any(x.meta.get("drug", "") != drug for x in ms):
            raise InputError("the models given are for different drugs")
        inds = read_nonmem_csv(data).individuals()
        match = [i for i in inds if f"{i.id:g}" == patient.strip()]
        if not match:
            raise InputError(f"ID {patient} is not in {data}")
        _compiled_for(ms, match)
        if target is not None:
            try:
                low_s, high_s = target.replace(" ", "").split("-", 1)
                tgt = Target(drug, float(low_s), float(high_s), metric=metric, source="given on the command line")
            except ValueError:
                raise InputError(f"--target must be LOW-HIGH, got {target!r}") from None
        elif organ is not None and months is not None:
            pool = load_targets(targets_file) if targets_file else None
            tgt = find_target(drug, organ, m.meta.get("age_group", "adult"), months, concomitant=concomitant,
                              metric=metric, targets=pool)
        else:
            raise InputError("give --target LOW-HIGH, or --organ and --months to look it up")
        prod = product(formulation or _default_product(m), drug)
        weights = None
        if len(ms) > 1:
            from cnidose.dosing.averaging import recommend_averaged

            if metric != tgt.metric:
                raise InputError(f"the target is a {tgt.metric} range; asked to optimise {metric}")
            rec, weights = recommend_averaged(ms, match[0], tgt, prod, n_draws=draws, seed=seed, interval=interval,
                                              choice=choice, aim=aim, occasion=strat.occasion)
        else:
            try:
                alt = [float(x) for x in intervals.split(",")] if intervals else None
            except ValueError:
                raise InputError(f"--intervals must be comma-separated hours, got {intervals!r}") from None
            rec = do_recommend(m, match[0], tgt, prod, interval=interval, metric=metric, n_draws=draws, seed=seed,
                               intervals=alt, loading=loading, choice=choice, aim=aim, occasion=strat.occasion)
        rec.inputs["strategy"] = strat.name
        if as_json:
            typer.echo(json.dumps(rec.to_dict(), indent=2, default=float))
            return
        typer.echo(rec.summary())
        if rec.loading is not None:
            ld = rec.loading
            typer.echo(f"loading: first dose {ld.dose:g} mg now, then the regimen; predicted level one interval later "
                       f"{ld.median:.3g} (80 % interval {ld.low:.3g}-{ld.high:.3g})")
        typer.echo(f"target: {tgt}")
        if weights is not None:
            for w in weights:
                typer.echo(f"model {w.model}: weight {w.weight:.2f}" + (f" ({w.message})" if w.message else ""))
            typer.echo(f"cnidose {rec.version}; {draws} pooled posterior draws, seed {seed}")
        else:
            typer.echo(f"model {rec.model}; cnidose {rec.version}; posterior {rec.inputs['posterior_method']} "
                       f"({draws} draws, seed {seed})")
        typer.echo(f"strategy {strat.name}: {strat.describe()}")
        typer.echo("  dose mg   median   80 % interval   P(in range)")
        for c in rec.candidates:
            mark = " <" if rec.chosen is not None and c.dose == rec.chosen.dose else ""
            if c.median < tgt.low / 3 or c.median > tgt.high * 3:
                continue
            typer.echo(f"  {c.dose:7g} {c.median:8.3g}   {c.low:6.3g}-{c.high:<6.3g}   {c.p_in_range:9.0%}{mark}")
        for text in rec.warnings:
            typer.echo(f"warning: {text}", err=True)

    _run(work)


def _recommend_record(path: Path, as_of: str | None, model: str | None, draws: int, seed: int, as_json: bool,
                      strategy: str = "map") -> None:
    """``recommend --patient``: the use case of :mod:`cnidose.records.analysis` on a patient record."""
    import datetime as dt

    from cnidose.clinical import load_record
    from cnidose.models.library import resolve_model
    from cnidose.records.analysis import analyse, choose_model

    day = _day(as_of)
    rec = load_record(path, as_of=day)
    chosen = model or choose_model(rec, day).id
    if chosen:  # one patient: the compiled kernels pay only for an ODE model
        with contextlib.suppress(CnidoseError):  # the use case reports an unknown model in its own words
            _compiled_for([resolve_model(chosen)], [])
    result = analyse(rec, day, model_id=model, n_draws=draws, seed=seed, strategy=strategy)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2, default=str))
        return
    typer.echo(f"patient {rec.id}, {rec.agent} for {rec.indication}, as of {day}")
    r = result.get("recommendation")
    if r is not None:
        typer.echo(r["summary"])
        typer.echo(f"target: {result['target']}")
        typer.echo(f"model {result['model']}; cnidose {result['version']}")
        why = (result.get("model_inputs") or {}).get("model", {}).get("why")
        if why:
            typer.echo(f"  why this model: {why}")
        typer.echo(f"strategy {result['strategy']['name']}: {result['strategy']['description']}")
        typer.echo("  dose mg   median   80 % interval   P(in range)")
        chosen = (r.get("chosen") or {}).get("dose")
        for c in r["candidates"]:
            mark = " <" if chosen == c["dose"] else ""
            typer.echo(f"  {c['dose']:7g} {c['median']:8.3g}   {c['low']:6.3g}-{c['high']:<6.3g}   "
                       f"{c['p_in_range']:9.0%}{mark}")
    for al in result["clinical"].get("alerts", []):
        typer.echo(f"{al['severity'].upper()}: {al['message']}\n    source: {al['source']}")
    for w in result["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    del dt


def _day(as_of: str | None) -> Any:
    import datetime as dt

    try:
        return dt.date.fromisoformat(as_of) if as_of else dt.date.today()
    except ValueError:
        raise InputError(f"--as-of must be YYYY-MM-DD, got {as_of!r}") from None


def _default_product(m: Any) -> str:
    forms = list(m.meta.get("formulations", ()))
    if not forms:
        raise InputError(f"model {m.id} names no formulation: give --formulation")
    return str(forms[0])


@app.command()
def evaluate(
    models: Annotated[str, typer.Option("--model", "-m", help="model(s), comma-separated")],
    data: Annotated[Path, typer.Option("--data", "-d", help="NONMEM-format CSV with levels (DV)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="every forecast, as CSV")] = None,
    max_step: Annotated[int | None, typer.Option(help="forecast at most this many steps ahead")] = None,
    plot: Annotated[Path | None, typer.Option(help="forecast against observed, as an SVG file")] = None,
    plot_time: Annotated[Path | None, typer.Option(help=(
        "median prediction error by days since transplantation, per model and strategy, as an SVG file"))]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar on standard error")] = True,
    backend: BackendOpt = "serial",
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    chunk_size: Annotated[int, typer.Option(help="individuals per chunk of work")] = 200,
    dose_values: DoseValuesOpt = "nonmem",
    strategies: Annotated[str, typer.Option("--strategy", "-s", help=(
        "forecasting strategies to compare, comma-separated: map (published priors; an unseen occasion at its "
        "prior), flat:L (Omega x L, Hughes & Keizer 2021), occ-last (the last occasion's effect carried "
        "forward), log (fit on the log scale), forget:D (older levels at half weight after D days), post (the "
        "posterior predictive median, as a recommendation forecasts), or parts joined by + (log+post)"))] = "map",
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples of the patients for 95 % intervals "
                                                "(0: none)")] = 0,
    combine: Annotated[str, typer.Option(help=(
        "also forecast with every model at once, comma-separated: average (weighted mean of the models' "
        "forecasts, weights from each model's marginal likelihood of the levels so far), select (the model "
        "of largest weight); needs two or more models"))] = "",
    by_time: Annotated[bool, typer.Option("--by-time", help=(
        "also summarise by days since transplantation (POD or TSFT column, else TIME/24): 0-7, 7-14, 14-30, "
        "30-90, 90-365, 365+, Bayesian and a priori apart"))] = False,
    reference_model: Annotated[str | None, typer.Option(help=(
        "the model the others are compared with, paired on the same forecasts (default: the first of --model; "
        "'average' or 'select' with --combine)"))] = None,
    reference_strategy: Annotated[str | None, typer.Option(help=(
        "the strategy the others are compared with (default: the first of --strategy)"))] = None,
    calibration: Annotated[bool, typer.Option("--calibration", help=(
        "also how each model saw every level in advance (its posterior predictive; about twice the time): the "
        "share within ±20 % the model itself expects, and the share of levels inside their 80 % interval"))]
    = False,
) -> None:
    """Iterative Bayesian forecasting over a data set (fit on levels 1..k, predict level k+1): bias,
    MAPE, RMSE and shares within 20 % and 30 %, per model, strategy and step, side by side on the same
    forecasts, with bootstrap intervals by patient."""
    from cnidose.records.nonmem import check_doses, read_nonmem_csv, write_csv


    def work() -> None:
        import numpy as np

        from cnidose.cohort import batch_evaluate
        from cnidose.dosing.evaluate import STRATEGY_HELP, check_combine, compare, strategy, summarise

        ms = [_resolve(x.strip(), dose_values) for x in models.split(",") if x.strip()]
        strats = list({s.name: s for s in (strategy(x) for x in strategies.split(",") if x.strip())}.values())
        if not strats:
            raise InputError(f"--strategy: name at least one ({STRATEGY_HELP})")
        if not 0 <= bootstrap <= 100_000:
            raise InputError(f"--bootstrap must be 0-100000, got {bootstrap}")
        ways = tuple(x.strip() for x in combine.split(",") if x.strip())
        check_combine(ways, len(ms))
        ids = [m.id for m in ms] + list(ways)
        if reference_model is not None and reference_model not in ids:
            raise InputError(f"--reference-model {reference_model!r} is none of the models compared ({', '.join(ids)})")
        try:
            ref_strategy = strats[0].name if reference_strategy is None else strategy(reference_strategy).name
        except InputError as exc:
            raise InputError(f"--reference-strategy: {exc}") from None
        if ref_strategy not in [x.name for x in strats]:
            raise InputError(f"--reference-strategy {reference_strategy!r} is none of the strategies compared "
                             f"({', '.join(x.name for x in strats)})")
        reference = (reference_model or ms[0].id, ref_strategy) \
            if reference_model is not None or reference_strategy is not None else None
        inds = read_nonmem_csv(data).individuals()
        for m in ms:
            check_doses(m, inds)
        _compiled_for(ms, inds, per_level=True, repeats=len(strats))
        problems: list[str] = []
        notices: list[Notice] = []
        n_chunks = -(-len(inds) // max(chunk_size, 1))
        with _progress("evaluating", n_chunks, progress and n_chunks > 1) as callback:
            fc = batch_evaluate(ms, inds, max_step=max_step, backend=backend,  # type: ignore[arg-type]
                                scheduler=scheduler, workers=workers, chunk_size=chunk_size, progress=callback,
                                problems=problems, notices=notices, strategies=strats, combine=ways,
                                calibration=calibration)
        summary = summarise(fc, bootstrap=bootstrap, by_period=by_time)
        try:
            paired = compare(fc, reference=reference, bootstrap=bootstrap)
        except InputError as exc:  # the chosen reference forecast nothing (every patient skipped): the rest stands
            typer.echo(f"warning: {exc}", err=True)
            paired = []
        _echo_notices(notices)
        for msg in problems:
            typer.echo(f"skipped: {msg}", err=True)
        if not fc:
            typer.echo(f"error: 0 forecasts: no individual of {data} could be forecast"
                       + (" (every one was skipped, above)" if problems else " (no levels to forecast)"), err=True)
            raise typer.Exit(2)
        if plot is not None:
            from cnidose.dosing.evaluate import plot_svg

            plot.write_text(plot_svg(fc), encoding="utf-8")
        if plot_time is not None:
            from cnidose.dosing.evaluate import plot_by_time_svg

            plot_time.write_text(plot_by_time_svg(fc), encoding="utf-8")
        if out is not None:
            write_csv(out, ["MODEL", "STRATEGY", "ID", "STEP", "ROW", "DAY", "DV", "PRED", "PE", "WEIGHTS",
                            *(("P_WITHIN_20", "IN_PI80") if calibration else ())],
                      ([f.model, f.strategy, _id(f.id), f.step, f.row, f.day, f.observed, f.predicted, f.error,
                        " ".join(f"{m}={w:.3f}" for m, w in f.weights),
                        *((_nan(f.expected_20), _nan(f.in_pi80)) if calibration else ())] for f in fc))
        if as_json:
            from dataclasses import asdict

            rows = [asdict(s) for s in summary]
            against = {(c.model, c.strategy): asdict(c) for c in paired}
            for row in rows:  # each model and strategy's summary over all steps: its change against the reference
                if row["step"] is None and row["period"] is None:
                    row["paired"] = against.get((row["model"], row["strategy"]))
            typer.echo(json.dumps(rows, indent=2))
            return
        def cell(s: Any, key: str, value: float) -> str:
            if s.ci is None:
                return f"{value:8.1f}"
            lo, hi = s.ci[key]
            return f"{value:6.1f} [{lo:5.1f}, {hi:5.1f}]"

        width = 8 if bootstrap == 0 else 22
        typer.echo(f"{'model':<36} {'strategy':<16} {'step':>12} {'n':>6} {'bias %':>{width}} {'MAPE %':>{width}} "
                   f"{'RMSE %':>8} {'±20 %':>{width}} {'±30 %':>7}"
                   + (f" {'expected ±20 %':>14} {'in 80 % PI':>10}" if calibration else ""))
        for s in summary:
            step = "all" if s.step is None else str(s.step)
            if s.period is not None:
                step = f"{s.period[5:]}d " + ("a priori" if s.step == 0 else "k>=1")
            typer.echo(f"{s.model:<36} {s.strategy:<16} {step:>12} {s.n:>6} {cell(s, 'median_pe', s.median_pe)} "
                       f"{cell(s, 'mape', s.mape)} {s.rmse:8.1f} {cell(s, 'within_20', s.within_20)} "
                       f"{s.within_30:7.1f}"
                       + (f" {_nan(s.expected_20):14.1f} {_nan(s.coverage_80):10.1f}" if calibration else ""))
        if calibration:
            typer.echo("[expected ±20 %: the share within ±20 % the model itself expects (its posterior predictive); "
                       "in 80 % PI: levels inside their 80 % predictive interval, 80 if the model's variability "
                       "describes these patients]", err=True)
        if bootstrap:
            typer.echo(f"[95 % intervals: {bootstrap} bootstrap resamples of the patients]", err=True)
        if paired:
            ref = paired[0].reference
            typer.echo(f"\nagainst {ref[0]} {ref[1]}, on the same Bayesian forecasts (paired changes in points: mean "
                       "|PE| and mean |ln(pred/obs)|, negative: closer; share within ±20 %, positive: more within)")
            typer.echo(f"{'model':<36} {'strategy':<16} {'n':>6} {'|PE|':>{width}} "
                       f"{'|ln(pred/obs)|':>{max(width, 14)}} {'±20 %':>{width}}" + ("  verdict" if bootstrap else ""))

            def change(c: Any, key: str) -> str:
                value = getattr(c, key)
                if c.ci is None:
                    return f"{value:+{14 if key == 'abs_log' else 8}.1f}"
                lo, hi = c.ci[key]
                return f"{value:+6.1f} [{lo:+5.1f}, {hi:+5.1f}]"

            for c in paired:
                typer.echo(f"{c.model:<36} {c.strategy:<16} {c.n:>6} {change(c, 'abs_error')} "
                           f"{change(c, 'abs_log')} {change(c, 'within_20')}" + (f"  {c.verdict}" if bootstrap else ""))
            if bootstrap:
                typer.echo("[verdict: better or worse where the interval of |ln(pred/obs)| or of the share within "
                           "±20 % excludes no change and the other does not point the other way; one comparison "
                           "in twenty passes by chance where nothing differs]", err=True)
            else:
                typer.echo("(--bootstrap N gives the intervals and a verdict)", err=True)
        for strat in strats if ways else []:
            bayes = [f for f in fc if f.step > 0 and f.model == ways[0] and f.strategy == strat.name]
            if bayes:
                mean = {m.id: float(np.mean([dict(f.weights)[m.id] for f in bayes])) for m in ms}
                typer.echo(f"model weights, {strat.name} (mean over the Bayesian forecasts): "
                           + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()), err=True)
        typer.echo(f"{len(fc)} forecasts", err=True)

    _run(work)


@app.command()
def adapt(
    model: Annotated[str, typer.Option("--model", "-m", help="the parent: model file (.toml) or library id")],
    data: Annotated[Path, typer.Option("--data", "-d", help="the centre's NONMEM-format CSV with levels (DV)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the adapted model file to write (.toml)")],
    new_id: Annotated[str | None, typer.Option("--id", help="the new model's id (default <parent id>_<data name>)")]
    = None,
    prior_sd: Annotated[float, typer.Option(help=(
        "SD of the prior on each log typical value about the published one (0.3: about 30 %; smaller keeps "
        "the published values, larger lets the centre's data decide)"))] = 0.3,
    omega: Annotated[bool, typer.Option("--omega/--no-omega", help="also adapt the between-subject variances")]
    = False,
    omega_df: Annotated[float, typer.Option(help="weight of the published Omega, in patients (inverse-Wishart "
                                                 "degrees of freedom)")] = 10.0,
    residual: Annotated[bool, typer.Option("--residual/--no-residual", help=(
        "also adapt the residual error (one factor on every residual SD parameter)"))] = False,
    residual_df: Annotated[float, typer.Option(help="weight of the published residual error, in levels")] = 20.0,
    max_iter: Annotated[int, typer.Option(help="EM iterations at most")] = 30,
    draws: Annotated[int, typer.Option(help="importance-sampling draws per patient and iteration")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the draws and of the folds")] = 0,
    cv: Annotated[int, typer.Option(help=(
        "cross-validate by patient in this many folds (0: none): adapt without each fold, forecast its levels "
        "with the parent and the adapted model"))] = 0,
    strategy_spec: Annotated[str, typer.Option("--strategy", "-s", help="forecasting strategy of the "
                                               "cross-validation (as evaluate's)")] = "map",
    max_step: Annotated[int | None, typer.Option(help="cross-validation: forecast at most this many steps "
                                                      "ahead (0: a priori only)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite --out if it exists")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    progress: Annotated[bool, typer.Option(help="iterations on standard error")] = True,
    dose_values: DoseValuesOpt = "nonmem",
) -> None:
    """Adapt a published model to a centre's patients: re-estimate its typical values (and, with --omega, its
    between-subject variances, with --residual its residual error) on the centre's data with the published
    estimates as the prior (iterative two-stage Bayesian EM with an importance-sampling E-step), and write a
    new model file that names its parent, its data and its fit. Covariate effects stay as published. With --cv K,
    each fold's forecasts are made by a model adapted without it (out of sample)."""
    import hashlib
    import re
    from datetime import date

    import numpy as np

    from cnidose.records.nonmem import check_doses, read_nonmem_csv

    def work() -> None:
        from cnidose import __version__
        from cnidose.dosing.adaptation import cross_validate
        from cnidose.dosing.strategies import strategy
        from cnidose.estimation.population import adapt as run_adapt
        from cnidose.models.fileformat import rewrite_model

        parent = _resolve(model, dose_values)
        if not parent.source or not Path(parent.source).is_file():
            raise InputError(f"model {parent.id} has no file to adapt")
        if out.exists() and not force:
            raise InputError(f"{out} exists (use --force to overwrite)")
        if out.resolve() == Path(parent.source).resolve():
            raise InputError("--out is the parent's own file")
        if not (0 < prior_sd <= 10) or not (0 <= omega_df <= 100_000) or not (0 <= residual_df <= 100_000):
            raise InputError("--prior-sd must be in (0, 10], --omega-df and --residual-df in [0, 100000]")
        if not data.is_file():
            raise InputError(f"--data {data}: no such file")
        if not out.parent.is_dir():
            raise InputError(f"--out {out}: the directory {out.parent} does not exist")
        if not (1 <= max_iter <= 500) or not (50 <= draws <= 100_000) or cv < 0 or cv == 1:
            raise InputError("--max-iter 1-500, --draws 50-100000, --cv 0 or at least 2")
        strat = strategy(strategy_spec)
        stem = re.sub(r"[^a-z0-9_]+", "_", data.stem.lower()).strip("_") or "centre"
        mid = new_id or f"{parent.id}_{stem}"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.\-]*", mid):
            raise InputError(f"--id {mid!r}: lower-case letters, digits, '_', '-', '.'")
        raw = data.read_bytes()
        inds = read_nonmem_csv(data).individuals()
        check_doses(parent, inds)
        options = {"prior_sd": prior_sd, "omega": omega, "omega_df": omega_df, "residual": residual,
                   "residual_df": residual_df, "max_iter": max_iter,
                   "n_draws": draws, "seed": seed}

        def step(it: int, objective: float, penalised: float) -> None:
            if progress:
                typer.echo(f"iteration {it}: -2 ln L {objective:.3f} (with the prior {penalised:.3f})", err=True)

        a = run_adapt(parent, inds, progress=step, **options)  # type: ignore[arg-type]
        validation: dict[str, Any] = {}
        if cv:
            cvr = cross_validate(parent, inds, folds=cv, seed=seed, strategy=strat, options=options,
                                 max_step=max_step,
                                 progress=(lambda j, k: typer.echo(f"fold {j}/{k} done", err=True))
                                 if progress else None)
            validation = {"folds": cv, "strategy": strat.name, "forecasts": len(cvr.forecasts) // 2,
                          "max_step": -1 if max_step is None else max_step,
                          "summary": [{"model": x.model, "forecasts": "a priori + Bayesian", "n": x.n,
                                       "median_pe": round(x.median_pe, 2), "mape": round(x.mape, 2),
                                       "within_20": round(x.within_20, 2), "within_30": round(x.within_30, 2)}
                                      for x in cvr.summaries if x.step is None and x.period is None],
                          "paired": [{"forecasts": p.kind, "n": p.n, "patients": p.patients,
                                      "change_abs_pe": round(p.change, 3), "ci95": [round(p.low, 3),
                                                                                   round(p.high, 3)],
                                      "change_abs_log": round(p.change_log, 3),
                                      "ci95_log": [round(p.low_log, 3), round(p.high_log, 3)],
                                      "median_pe_parent": round(p.bias_parent, 2),
                                      "median_pe_adapted": round(p.bias_adapted, 2)}
                                     for p in cvr.paired],
                          "note": "mean change in |PE| (percentage points) and in 100 |ln(pred/obs)|, adapted "
                                  "minus parent, on the same held-out levels; 95 % bootstrap interval by patient"}
        record: dict[str, Any] = {
            "parent": parent.ref, "parent_sha256": parent.content_hash, "data": data.name,
            "data_sha256": hashlib.sha256(raw).hexdigest(),
            "method": "iterative two-stage Bayesian EM (importance-sampling E-step, Fisher-scoring M-step); normal "
                      f"prior on log typical values, SD {prior_sd:g}" + (f"; inverse-Wishart prior on Omega, "
                                                                          f"{omega_df:g} df" if omega else "") + (
                          f"; residual SDs by one common factor (EM, inverse-gamma prior, {residual_df:g} levels)"
                          if residual else ""),
            "date": date.today().isoformat(), "software": f"cnidose {__version__}", "subjects": a.n_subjects,
            "observations": a.n_observations, "prior_sd": prior_sd, "omega_df": omega_df,
            "omega_adapted": omega, "residual_adapted": residual, "iterations": a.iterations, "converged": a.converged,
            "objective": round(a.objective, 4), "objective_parent": round(a.objective_published, 4),
            "estimates": [{"parameter": v.parameter, "effect": v.effect, "published": v.published,
                           "estimate": float(f"{v.estimate:.6g}"), "se_log": round(v.se_log, 5),
                           "ci95": [float(f"{v.estimate * np.exp(-1.96 * v.se_log):.6g}"),
                                    float(f"{v.estimate * np.exp(1.96 * v.se_log):.6g}")]} for v in a.values],
            "not_adapted": list(a.not_adapted), "excluded": list(a.excluded), "warnings": list(a.warnings),
        }
        if validation:
            record["validation"] = validation
        values = {v.parameter: float(f"{v.estimate:.6g}") for v in a.values}
        sources = {v.parameter: f"adapted to {data.name} (published {v.published:g}, "
                                f"{parent.parameters[v.parameter].source or 'parent'})" for v in a.values}
        variances = [float(f"{x:.6g}") for x in np.diag(a.omega)] if omega else None
        text = rewrite_model(Path(parent.source).read_text(encoding="utf-8"), id=mid,
                             version=f"{parent.version}+{stem}", title=f"{parent.title}, adapted to {data.name}",
                             values=values, variances=variances, adaptation=record, value_source=sources)
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise InputError(f"--out {out}: cannot write ({exc.strerror})") from None
        if as_json:
            typer.echo(json.dumps(record, indent=2))
            return
        typer.echo(f"{'parameter':<12} {'effect':<10} {'published':>11} {'adapted':>11} {'ratio':>6} "
                   f"{'95 % interval':>22}")
        for v, e in zip(a.values, record["estimates"], strict=True):
            typer.echo(f"{v.parameter:<12} {v.effect:<10} {v.published:>11.4g} {v.estimate:>11.4g} "
                       f"{v.ratio:>6.2f} {e['ci95'][0]:>10.4g} - {e['ci95'][1]:<10.4g}")
        if omega:
            for k, n in enumerate(a.effects):
                typer.echo(f"omega2 {n:<10} {a.omega_published[k, k]:>11.4g} {a.omega[k, k]:>11.4g}")
        typer.echo(f"-2 ln L: parent {a.objective_published:.2f}, adapted {a.objective:.2f}; {a.n_subjects} "
                   f"patients, {a.n_observations} levels; {a.iterations} iterations"
                   + ("" if a.converged else " (NOT converged)"))
        for p in validation.get("paired", []):
            typer.echo(f"cross-validation ({cv} folds, {p['forecasts']}, {p['n']} forecasts): |PE| change "
                       f"{p['change_abs_pe']:+.2f} points [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}], "
                       f"100 |ln(pred/obs)| {p['change_abs_log']:+.2f} [{p['ci95_log'][0]:+.2f}, "
                       f"{p['ci95_log'][1]:+.2f}]; median PE {p['median_pe_parent']:+.1f} % -> "
                       f"{p['median_pe_adapted']:+.1f} %")
        for row in validation.get("summary", []):
            typer.echo(f"  {row['model']:<44} bias {row['median_pe']:+6.1f} %  MAPE {row['mape']:5.1f} %  "
                       f"within 20 % {row['within_20']:5.1f} %")
        for w in (*a.warnings, *(f"not adapted: {x}" for x in a.not_adapted)):
            typer.echo(f"warning: {w}", err=True)
        for x in a.excluded:
            typer.echo(f"left out: {x}", err=True)
        typer.echo(f"wrote {out} (model {mid})", err=True)
        if out.stem != mid:
            typer.echo(f"note: to use it by its id, save it as {mid}.toml in the directory named by "
                       "CNIDOSE_MODELS (the centre's models)", err=True)

    _run(work)


@app.command()
def assess(
    record: Annotated[Path, typer.Argument(help="patient record, JSON (schema cnidose.patient/2; /1 is read)")],
    as_of: Annotated[str | None, typer.Option("--as-of", help="assessment date YYYY-MM-DD (default: today)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Selection, interactions, monitoring alerts, exposure adjustments and the follow-up schedule."""

    def work() -> None:
        from dataclasses import asdict

        from cnidose.clinical import assess as run_assess
        from cnidose.clinical import load_record

        day = _day(as_of)
        rec = load_record(record, as_of=day)
        a = run_assess(rec, day)
        if as_json:
            typer.echo(json.dumps(asdict(a), indent=2, default=str))
            return
        typer.echo(f"patient {a.patient}, {rec.agent} for {rec.indication}, as of {a.as_of}")
        typer.echo(f"selection: {a.selection}")
        for r in a.selection_reasons:
            typer.echo(f"  - {r}")
        for al in a.alerts:
            when = f" ({al.date})" if al.date else ""
            typer.echo(f"{al.severity.upper()}{when}: {al.message}\n    source: {al.source}")
        for e in a.exposure:
            end = e.end.isoformat() if e.end else "ongoing"
            typer.echo(f"exposure x{e.factor:g} from {e.start} to {end} ({e.drug})")
        for d in a.due:
            typer.echo(f"due {d.date}: {d.what} [{d.source}]")
        for n in a.notes:
            typer.echo(f"note: {n}", err=True)

    _run(work)


@app.command("simulate-trial")
def simulate_trial(
    protocol: Annotated[Path, typer.Argument(help="protocol file (TOML)")],
    n: Annotated[int | None, typer.Option(help="virtual patients (default: the protocol's)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: the protocol's)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="daily attainment and percentiles, CSV")] = None,
    backend: BackendOpt = "serial",
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    chunk_size: Annotated[int, typer.Option(help="virtual patients per chunk")] = 100_000,
    plot: Annotated[Path | None, typer.Option(help="trough percentiles and attainment by day, as an SVG file")
                    ] = None,
    progress: Annotated[bool, typer.Option(help="progress bar on standard error")] = True,
) -> None:
    """Simulate a dosing protocol over a virtual population: daily trough percentiles and target attainment.

    Patients whose recommendation fails keep their dose; each failure is listed on standard error.
    """
    from cnidose.records.nonmem import write_csv


    def work() -> None:
        from cnidose.cohort.trial import load_protocol, run_trial, trial_svg

        spec = load_protocol(protocol)
        total = n if n is not None else spec.get("n", 1000)
        n_chunks = -(-int(total) // max(chunk_size, 1)) if isinstance(total, int) and total > 0 else 0
        with _progress("simulating", n_chunks, progress and n_chunks > 1) as callback:
            r = run_trial(spec, n=n, seed=seed, backend=backend,  # type: ignore[arg-type]
                          scheduler=scheduler, workers=workers, chunk_size=chunk_size, progress=callback)
        for msg in r.notices:
            typer.echo(f"note: {msg}", err=True)
        for who, day, msg in r.failures[:20]:
            typer.echo(f"failed: virtual patient {who}, day {day}: {msg} (dose kept)", err=True)
        if len(r.failures) > 20:
            typer.echo(f"... {len(r.failures) - 20} more failures", err=True)
        if plot is not None:
            plot.write_text(trial_svg(r), encoding="utf-8")
        t = r.protocol["target"]
        header = ["DAY", "ATTAINMENT", "P05", "P50", "P95", "MEAN_DAILY_DOSE_MG"]
        rows = [[d + 1, float(r.attainment[d]), float(r.percentiles[0, d]), float(r.percentiles[1, d]),
                 float(r.percentiles[2, d]), float(r.mean_daily_dose[d])] for d in range(r.days)]
        text = write_csv(out, header, rows)
        if out is None:
            sys.stdout.write(text)
        typer.echo(f"{r.n} virtual patients, model {r.model}; target {t['low']:g}-{t['high']:g}: "
                   f"{r.attainment[-1]:.1%} in range on day {r.days}", err=True)

    _run(work)


@app.command("simulate-conversion")
def simulate_conversion(
    protocol: Annotated[Path, typer.Argument(help="conversion protocol file (TOML)")],
    n: Annotated[int | None, typer.Option(help="virtual patients (default: the protocol's)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: the protocol's)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="one row per conversion factor, CSV")] = None,
) -> None:
    """Convert stable virtual patients from one formulation to another by a published rule (e.g. Prograf twice
    daily to Envarsus XR once daily at 80 % of the daily dose): steady-state troughs and attainment before and
    after, with Wilson 95 % intervals (cnidose.cohort.conversion)."""
    from cnidose.records.nonmem import write_csv

    def work() -> None:
        from cnidose.cohort.conversion import load_conversion, run_conversion

        r = run_conversion(load_conversion(protocol), n=n, seed=seed)
        for msg in r.notices:
            typer.echo(f"note: {msg}", err=True)
        typer.echo(r.table())
        if out is not None:
            header = ["FACTOR", "IN_RANGE", "IN_LOW95", "IN_HIGH95", "BELOW", "ABOVE", "RATIO_P05", "RATIO_P50",
                      "RATIO_P95", "TROUGH_P50", "MEDIAN_DAILY_DOSE_MG", "SOURCE"]
            write_csv(out, header, [[a.factor, a.in_range, a.ci["in"][0], a.ci["in"][1], a.below, a.above,
                                     *a.ratio, a.trough[1], a.median_daily_dose, a.factor_source] for a in r.arms])

    _run(work)


def _id(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def _write_predictions(m: Any, ds: Any, inds: Sequence[Any], results: Sequence[Any], path: Path) -> None:
    """Every record with IPRED (at the estimate) and PRED (typical individual); '.' where not computable."""
    import numpy as np

    from cnidose.records.nonmem import write_csv

    ipred_all: list[float] = []
    pred_all: list[float] = []
    for ind, r in zip(inds, results, strict=True):
        n = len(ind)
        if r.status == "error":
            ipred_all += [float("nan")] * n
            pred_all += [float("nan")] * n
            continue
        etas = np.vstack([np.zeros(len(m.eta_names)), r.eta])
        kappas = None
        if m.iov is not None:
            k = r.kappa if r.kappa is not None else np.zeros((1, len(m.iov)))
            kappas = np.stack([np.zeros_like(k), k])
        sim = m.simulate(ind, etas, kappas=kappas)
        pred_all += [float(x) for x in sim.prediction[0]]
        ipred_all += [float(x) for x in sim.prediction[1]]
    pred_name, ipred_name = _prediction_names(ds.names)
    header = [*ds.header, ipred_name, pred_name]
    rows = ([*row, ipred_all[k], pred_all[k]] for k, row in enumerate(ds.cells))
    write_csv(path, header, rows)
    typer.echo(f"wrote {len(ds.cells)} rows to {path}", err=True)


def _prediction_names(names: Sequence[str]) -> tuple[str, str]:
    """Output names of the population and individual predictions: PRED and IPRED, unless the data already have
    a column of that name (Størset's prednisolone dose is PRED): input columns are never overwritten."""
    taken = {n.upper() for n in names}
    pred, ipred = "PRED", "IPRED"
    if pred in taken or ipred in taken:
        pred, ipred = "CNIDOSE_PRED", "CNIDOSE_IPRED"
        typer.echo(f"note: the data have a column named PRED or IPRED; the predictions are written as {pred} and "
                   f"{ipred}", err=True)
    return pred, ipred


def _echo_notices(notices: Sequence[Notice]) -> None:
    """One warning line per distinct notice; the first record it applies to, and how many individuals."""
    seen: dict[str, list[Notice]] = {}
    for n in notices:
        seen.setdefault(n.message, []).append(n)
    for message, group in seen.items():
        first = group[0]
        where = f" (first at row {first.row})" if first.row is not None else ""
        count = f" [{len(group)} individuals]" if len(group) > 1 else ""
        typer.echo(f"warning: {message}{where}{count}", err=True)


JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@models_app.command("list")
def models_list(
    drug: Annotated[str | None, typer.Option(help="tacrolimus | cyclosporine")] = None,
    formulation: Annotated[str | None, typer.Option(help="e.g. Prograf, Advagraf, Neoral")] = None,
    organ: Annotated[str | None, typer.Option(help="kidney | lung | hsct ...")] = None,
    age_group: Annotated[str | None, typer.Option("--age-group", help="adult | paediatric")] = None,
    population: Annotated[str | None, typer.Option(help="text the population description contains")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List library models, filtered by drug, formulation, organ, age group or population."""
    from cnidose.models.describe import summarize_model
    from cnidose.models.library import library_models


    def work() -> None:
        rows = [summarize_model(m) for m in library_models()]

        def keep(r: dict[str, Any]) -> bool:
            forms = [str(f).lower() for f in r["formulations"]]
            return ((drug is None or _drug_matches(drug, str(r["drug"])))
                    and (formulation is None or formulation.lower() in forms)
                    and (organ is None or organ.lower() == str(r["organ"]).lower())
                    and (age_group is None or age_group.lower() == str(r["age_group"]).lower())
                    and (population is None or population.lower() in str(r["population"]).lower()))

        rows = [r for r in rows if keep(r)]
        if as_json:
            typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        if not rows:
            typer.echo("no model matches", err=True)
            return
        header = ("id", "drug", "formulations", "organ", "age", "confirmed")
        table = [(str(r["id"]), str(r["drug"]), ", ".join(r["formulations"]), str(r["organ"]),
                  str(r["age_group"]), "yes" if r["confirmed"] else "no") for r in rows]
        widths = [max(len(h), *(len(t[k]) for t in table)) for k, h in enumerate(header)]
        typer.echo("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        for t in table:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())

    _run(work)


def _drug_matches(asked: str, drug: str) -> bool:
    aliases = {"ciclosporin": "cyclosporine", "cyclosporin": "cyclosporine", "csa": "cyclosporine",
               "tac": "tacrolimus", "fk506": "tacrolimus"}
    a = asked.lower()
    return aliases.get(a, a) == drug.lower()


@models_app.command("show")
def models_show(
    model: Annotated[str, typer.Argument(help="library id or model file")],
    as_json: JsonOpt = False,
) -> None:
    """Show a model: citation, population and domain, parameters, variability, covariates, equations, checks."""
    from cnidose.models.describe import describe_model
    from cnidose.models.library import resolve_model


    def work() -> None:
        d = describe_model(resolve_model(model))
        if as_json:
            typer.echo(json.dumps(d, indent=2, ensure_ascii=False))
            return
        for line in _show_lines(d):
            typer.echo(line)

    _run(work)


def _show_lines(d: dict[str, Any]) -> list[str]:
    c = d["citation"]
    out = [f"{d['title']}", f"  id {d['id']}  version {d['version']}  sha256 {str(d['content_hash'])[:12]}",
           f"  {c.get('authors', '')}. {c.get('title', '')}. {c.get('journal', '')}. doi:{c.get('doi', '')}".rstrip(),
           f"  drug {d['drug']}; formulations {', '.join(d['formulations'])}; "
           f"release {d['release']}; route {', '.join(d['route'])}",
           f"  population: {d['population']}", f"  matrix: {d['matrix']}; assay: {d['assay']}",
           f"  confirmed: {'yes' if d['confirmed'] else 'NO'} - {d['confirmation']}"]
    dom = d["domain"]
    if dom.get("description"):
        out.append(f"  domain: {dom['description']}")
    s = d["structure"]
    out.append(f"compartments: {', '.join(s['compartments'])}; doses into {s['default_dose']}, "
               f"observed in {s['default_obs']}"
               + (f"; intravenous doses (IV = 1) into {s['iv_dose']}" if s.get("iv_dose") else ""))
    if s.get("transit_input"):
        ti = s["transit_input"]
        out.append(f"  doses arrive in {ti['into']} through a Savic transit input: {ti['n']} transit compartments, "
                   f"mean transit time {ti['mtt']} (a gamma density of shape n + 1, rate (n + 1)/MTT)")
    for f in s.get("flows", []):
        out.append(f"  {f['from']} -> {f['to'] or '(out)'} at {f['rate']}")
    out.append("parameters:")
    for p in d["parameters"]:
        fixed = " (fixed)" if p["fixed"] else ""
        out.append(f"  {p['name']:<14} {p['value']:>12g} {p['unit']:<8} {p['description']}{fixed}  [{p['source']}]")
    for key, label in (("random_effects", "between-subject variability"), ("iov", "between-occasion variability")):
        re = d[key]
        if re and re["names"]:
            occ = f"; occasion column {re['occasion']}" if re["occasion"] else ""
            out.append(f"{label}: {re['published']}{occ}")
            for n, v in zip(re["names"], re["variance"], strict=True):
                out.append(f"  {n:<12} omega2 {v:.6g}")
            for a, b, r in re["correlations"]:
                out.append(f"  corr({a}, {b}) = {r:.3g}")
    out.append("covariates (data unit -> model unit; domain):")
    for cv in d["covariates"]:
        bits = [f"{cv['data_unit']} -> {cv['unit']}" if cv["data_unit"] != cv["unit"] else cv["unit"]]
        if cv["domain"]:
            bits.append(f"domain {cv['domain'][0]:g}-{cv['domain'][1]:g}")
        if cv["default"] is not None:
            bits.append(f"default {cv['default']:g} ({cv['default_note']})")
        if cv["derive"]:
            bits.append(f"derived by {cv['derive']} if absent")
        if cv["levels"]:
            bits.append("; ".join(f"{k} = {v}" for k, v in cv["levels"].items()))
        if cv.get("medications"):
            after = cv.get("medication_after_days") or 0
            bits.append("from a patient record: 1 while " + " or ".join(cv["medications"]) + " is on the medication "
                        "list" + (f" and {after:g} days after it stops" if after else ""))
        if cv["domain_only"]:
            bits.append("domain check only")
        out.append(f"  {cv['name']:<12} {cv['description']}: " + ", ".join(bits))
    out.append("equations:")
    for e in d["pk"]:
        out.append(f"  {e['name']} = {e['expr']}" + (f"  [{e['unit']}]" if e["unit"] else ""))
    for o in d["observations"]:
        err = o["error"] or {}
        terms = ", ".join(f"{k} {v}" for k, v in err.items() if k != "model" and v)
        out.append(f"observation {o['name']}: {o['compartment']} amount / {o['scale']} [{o['scale_unit']}] in "
                   f"{o['unit']}" + (f", then {o['transform']}" if o["transform"] else "")
                   + (f"; error {err.get('model')} ({terms})" if err else ""))
    notes = d["notes"]
    if notes:
        out.append("notes:")
        out += [f"  - {n}" for n in notes]
    ad = d.get("adaptation")
    if ad:
        out.append(f"adapted from {ad.get('parent', '?')} to {ad.get('data', '?')} (sha256 "
                   f"{str(ad.get('data_sha256', ''))[:12]}) on {ad.get('date', '?')} by {ad.get('software', '?')}: "
                   f"{ad.get('subjects', '?')} patients, {ad.get('observations', '?')} levels")
        out.append(f"  method: {ad.get('method', '')}")
        for e in ad.get("estimates", []):
            ci = e.get("ci95", ["?", "?"])
            out.append(f"  {e.get('parameter')}: published {e.get('published')}, adapted {e.get('estimate')} "
                       f"(95 % {ci[0]} - {ci[1]})")
        for p in (ad.get("validation") or {}).get("paired", []):
            out.append(f"  cross-validated, {p.get('forecasts')}: |PE| change {p.get('change_abs_pe')} points "
                       f"{p.get('ci95')}")
        for w in ad.get("warnings", []):
            out.append(f"  warning: {w}")
    checks = d["checks"]
    if checks:
        out.append(f"reference checks ({len(checks)}): run `cnidose models check {d['id']}`")
    return out


@models_app.command("check")
def models_check(
    models: Annotated[list[str] | None, typer.Argument(help="library ids or model files (default: the library)")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every model's reference checks -- the pharmacokinetic models' and the concentration-effect models'
    (cnidose.models.pd) -- each against the statement of its paper; exit 1 if any fails."""
    from cnidose.models.checks import run_checks
    from cnidose.models.library import library_models, resolve_model
    from cnidose.models.pd import effect_models

    def work() -> int:
        effects = [e for e in effect_models() if not models or e.id in models]
        named = {e.id for e in effects}
        wanted = [m for m in models or [] if m not in named]
        try:
            loaded = [resolve_model(m) for m in wanted] if models else list(library_models())
        except InputError as exc:  # say the concentration-effect ids too: the command takes them as well
            raise InputError(f"{exc}; concentration-effect models: {', '.join(e.id for e in effect_models())}"
                             ) from None
        results = [r for m in loaded for r in run_checks(m)]
        rows = [{"model": r.model, "check": r.name, "statement": r.statement, "source": r.source,
                 "expected": r.expected, "actual": r.actual, "rtol": r.rtol, "passed": r.passed, "error": r.error}
                for r in results]
        rows += [{"model": e.id, "check": f"E/Emax at {ch.concentration:g} {e.unit}", "statement": ch.statement,
                  "source": e.source, "expected": ch.expected, "actual": got, "atol": ch.tolerance, "passed": ok,
                  "error": None} for e in effects for ch, got, ok in e.check_results()]
        if as_json:
            typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        else:
            for r in rows:
                status = "PASS" if r["passed"] else "FAIL"
                tol = f"rtol {r['rtol']:g}" if "rtol" in r else f"atol {r['atol']:g}"
                detail = r["error"] or f"expected {r['expected']:g}, got {r['actual']:.6g} ({tol})"
                typer.echo(f"{status}  {r['model']}: {r['check']}: {detail}")
            n_fail = sum(not r["passed"] for r in rows)
            typer.echo(f"{len(rows) - n_fail} passed, {n_fail} failed, {len(loaded)} model(s), "
                       f"{len(effects)} concentration-effect model(s)", err=True)
        return sum(not r["passed"] for r in rows)

    if _run(work):
        raise typer.Exit(1)


DEMO_USERS = (("clinician", "clinician", None), ("pharmacist", "pharmacist", None), ("admin", "admin", None),
              ("karel", "patient", "DEMO-TX-1"), ("petra", "patient", "DEMO-DERM-1"))


@app.command()
def serve(
    demo: Annotated[bool, typer.Option(help="a separate demo database with demo patients and users")] = False,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: CNIDOSE_DATABASE_URL, else "
                                                      "SQLite in the user data directory)")] = None,
    workers: Annotated[int, typer.Option(help="worker processes (sessions are in the database and shared; "
                                              "sign-in throttling is per process)")] = 1,
    secure_cookies: Annotated[bool | None, typer.Option(
        "--secure-cookies/--no-secure-cookies", help="mark cookies Secure (default: on unless the host is "
                                                     "loopback)")] = None,
    trusted_proxies: Annotated[str | None, typer.Option(
        help="addresses or networks of reverse proxies whose X-Forwarded-For is read (default: "
             "CNIDOSE_TRUSTED_PROXIES, else none)")] = None,
) -> None:
    """Run the clinician web app (and the JSON API under /api/v1)."""

    def work() -> None:
        import os

        import uvicorn

        from cnidose.records.db import database_url, make_engine, upgrade
        from cnidose.records.store import SYSTEM, Store
        from cnidose.web.app import create_app
        from cnidose.web.security import hash_password

        url = database
        if url is None and demo:
            base = database_url()
            url = base.replace("cnidose.db", "cnidose-demo.db") if base.startswith("sqlite") else base
        engine = make_engine(url)
        upgrade(engine)
        store = Store(engine)
        if demo:
            if not store.patients(SYSTEM):
                from cnidose.records.demo import seed_demo

                ids = seed_demo(store)
                for name, role, mrn in DEMO_USERS:
                    store.create_user(SYSTEM, name, hash_password(f"{name}-demo"), role,
                                      patient_id=ids[mrn] if mrn else None)
            typer.echo("demo users (password = user name + '-demo'): "
                       + ", ".join(f"{n} ({r}) / {n}-demo" for n, r, _ in DEMO_USERS), err=True)
        typer.echo(f"cnidose on http://{host}:{port}/ (database {engine.url.render_as_string(hide_password=True)})",
                   err=True)
        loopback = host in ("127.0.0.1", "::1", "localhost")
        secure = (not loopback) if secure_cookies is None else secure_cookies
        os.environ["CNIDOSE_SECURE_COOKIES"] = "1" if secure else "0"
        if trusted_proxies is not None:
            os.environ["CNIDOSE_TRUSTED_PROXIES"] = trusted_proxies
        if not loopback and not secure:
            typer.echo("warning: serving beyond loopback without Secure cookies: put it behind HTTPS", err=True)
        # uvicorn must not rewrite the client address from X-Forwarded-For: the app reads it from trusted proxies
        # only (CNIDOSE_TRUSTED_PROXIES)
        opts: dict[str, Any] = {"host": host, "port": port, "log_level": "warning", "proxy_headers": False}
        if workers > 1:
            os.environ["CNIDOSE_DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
            engine.dispose()
            uvicorn.run("cnidose.web.app:app_from_env", factory=True, workers=workers, **opts)
            return
        app_ = create_app(store)
        _warm_kernels()
        uvicorn.run(app_, **opts)

    _run(work)


def _warm_kernels() -> None:
    """Compile the library models' kernels in the background (a clinician's request never waits for the
    compiler: until a kernel is ready, its fits use the engine and differences)."""
    from cnidose.models.kernel import warm
    from cnidose.models.library import library_models

    warm(library_models())


if __name__ == "__main__":  # pragma: no cover
    app()
