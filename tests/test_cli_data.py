"""The command line on the project's own example data: crashes and silent acceptances found on real data
(issue 15), each reproduced first."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnidose.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tacrolimus_patients.csv"


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_fit_out_with_between_occasion_variability(tmp_path: Path) -> None:
    """Was: ValueError: tuple.index(x): x not in tuple, for any model with BOV (Andrews 2019 on this file)."""
    out = tmp_path / "etas.csv"
    rc, _, err = _run("fit", "-m", "andrews2019_tac_adult_kidney", "-d", str(EXAMPLE), "--out", str(out))
    assert rc == 0, err
    header, *rows = [ln.split(",") for ln in out.read_text().splitlines()]
    assert "KAPPA_CL_OCC1" in header and "SD_KAPPA_CL_OCC1" in header
    k = header.index("KAPPA_CL_OCC1")
    assert all(row[header.index("STATUS")] == "converged" for row in rows)
    assert all(abs(float(row[k])) < 1 for row in rows) and float(rows[0][header.index("SD_KAPPA_CL_OCC1")]) > 0


def test_an_input_column_named_pred_is_never_overwritten(tmp_path: Path) -> None:
    """Størset's prednisolone dose is PRED: simulate wrote its population prediction over it."""
    lines = EXAMPLE.read_text().splitlines()
    src = [ln.split(",") for ln in lines]
    j = src[0].index("PRED")
    for cmd in (["simulate"], ["fit", "-p", str(tmp_path / "p.csv")]):
        rc, out, err = _run(*cmd, "-m", "storset2014_tac_adult_kidney", "-d", str(EXAMPLE))
        assert rc == 0, err
        text = out if cmd == ["simulate"] else (tmp_path / "p.csv").read_text()
        table = [ln.split(",") for ln in text.splitlines()]
        assert table[0][: len(src[0])] == src[0] and "CNIDOSE_PRED" in table[0] and "CNIDOSE_IPRED" in table[0]
        assert [row[j] for row in table[1:]] == [row[j] for row in src[1:]]  # prednisolone unchanged
        assert "written as CNIDOSE_PRED and CNIDOSE_IPRED" in err


@pytest.mark.parametrize("command", ["simulate", "fit", "evaluate"])
def test_a_dose_left_in_micrograms_is_refused_naming_row_and_column(tmp_path: Path, command: str) -> None:
    lines = EXAMPLE.read_text().splitlines()
    lines[1] = lines[1].replace("1,0,1,5,", "1,0,1,5000,", 1)  # 5 mg written as 5000 (ug)
    data = tmp_path / "ug.csv"
    data.write_text("\n".join(lines) + "\n")
    rc, _, err = _run(command, "-m", "storset2014_tac_adult_kidney", "-d", str(data))
    assert rc == 2
    assert "row 2, column AMT: dose 5000 mg is not a possible tacrolimus administration" in err
    assert "micrograms" in err


def test_fit_and_evaluate_fail_when_every_patient_is_refused(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace(",0.32,", ",3.2,").replace(",0.36,", ",3.6,")  # haematocrit in %
    data = tmp_path / "hct.csv"
    data.write_text(text)
    rc, _, err = _run("fit", "-m", "storset2014_tac_adult_kidney", "-d", str(data))
    assert rc == 2 and "no individual" in err and "column HCT" in err
    rc, _, err = _run("evaluate", "-m", "storset2014_tac_adult_kidney", "-d", str(data))
    assert rc == 2 and "0 forecasts" in err and "skipped:" in err


def test_evaluate_prints_the_domain_default_and_derivation_warnings() -> None:
    rc, _, err = _run("evaluate", "-m", "andrews2019_tac_adult_kidney", "-d", str(EXAMPLE))
    assert rc == 0, err
    assert "warning: CYP3A4_22 not in the data: model default 0 used" in err
    assert "[2 individuals]" in err  # once per individual, not once per forecast step


def test_dose_values_option() -> None:
    rc, _, err = _run("simulate", "-m", "storset2014_tac_adult_kidney", "-d", str(EXAMPLE), "--dose-values",
                      "dose-record")
    assert rc == 0, err
    rc, _, err = _run("simulate", "-m", "storset2014_tac_adult_kidney", "-d", str(EXAMPLE), "--dose-values", "x")
    assert rc == 2 and "--dose-values must be nonmem or dose-record" in err


def test_the_cli_starts_without_the_numerical_stack() -> None:
    """`import cnidose.cli` (every command's start, `--help`, argument errors) loads neither NumPy, SciPy nor the
    model library: they are imported by the commands that use them (issue 14: start-up was 1 s)."""
    import subprocess
    import sys

    code = ("import sys, cnidose.cli; print(sorted(m for m in ('numpy', 'scipy', 'cnidose.models.library', "
            "'cnidose.records.nonmem', 'cnidose.estimation') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_help_is_plain_and_imports_no_rich_rendering() -> None:
    """`cnidose --help` in about 0.2 s (issue 14: at most 0.3 s): plain help, without Typer's rich rendering (rich's
    markdown and syntax modules cost about 0.15 s to import)."""
    import subprocess
    import sys

    code = ("import sys\nfrom cnidose.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('typer.rich_utils', 'rich.markdown', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out and "Commands:" in out
    assert out.strip().splitlines()[-1] == "[]", out
