"""The ``cnidose`` command line.

Errors from :mod:`cnidose.errors` become one line on standard error and an
exit code, in one place (:func:`_run`): 2 for bad input, 3 for a numerical
failure. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import typer

from cnidose.errors import CnidoseError, InputError
from cnidose.models.library import resolve_model
from cnidose.records.nonmem import read_nonmem_csv, simulate_dataset, write_csv

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="cnidose: calcineurin-inhibitor pharmacokinetics and dosing.")

T = TypeVar("T")


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except CnidoseError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None


@app.callback()
def main() -> None:
    """cnidose: calcineurin-inhibitor pharmacokinetics and dosing."""


@app.command()
def simulate(
    model: Annotated[str, typer.Option("--model", "-m", help="model file (.toml) or library id")],
    data: Annotated[Path, typer.Option("--data", "-d", help="NONMEM-format CSV")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output CSV (default: standard output)")] = None,
    method: Annotated[str, typer.Option(help="auto | closed | expm | ode")] = "auto",
) -> None:
    """Predict every record of a NONMEM-format data set (PRED and IPRED)."""
    if method not in ("auto", "closed", "expm", "ode"):
        typer.echo(f"error: --method must be auto, closed, expm or ode, got {method!r}", err=True)
        raise typer.Exit(2)

    def work() -> None:
        m = resolve_model(model)
        ds = read_nonmem_csv(data)
        table = simulate_dataset(m, ds, method=method)  # type: ignore[arg-type]
        inds = table.individuals
        evid = np.concatenate([i.evid for i in inds]) if inds else np.zeros(0, int)
        cmt_eff = np.concatenate([
            np.where(i.cmt > 0, i.cmt, np.where(i.evid == 0, m.structure.default_obs, m.structure.default_dose))
            for i in inds]) if inds else np.zeros(0, int)
        names = ds.names
        keep = [j for j, n in enumerate(names) if n not in ("PRED", "IPRED")]
        header = [ds.header[j] for j in keep]
        extra_cols = []
        if "EVID" not in names:
            header.append("EVID")
            extra_cols.append(evid)
        if "CMT" not in names:
            header.append("CMT")
            extra_cols.append(cmt_eff)
        header += ["PRED", "IPRED"]
        rows = ([row[j] for j in keep] + [int(c[k]) for c in extra_cols]
                + [float(table.pred[k]), float(table.ipred[k])]
                for k, row in enumerate(ds.cells))
        text = write_csv(out, header, rows)
        if out is None:
            sys.stdout.write(text)
        else:
            typer.echo(f"wrote {len(ds.cells)} rows to {out} (model {m.id} {m.version}, "
                       f"sha256 {m.content_hash[:12]}, method {'/'.join(sorted(set(table.methods)))})", err=True)

    _run(work)


if __name__ == "__main__":  # pragma: no cover
    app()
