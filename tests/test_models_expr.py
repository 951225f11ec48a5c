"""The model-file expression language and loader."""

from __future__ import annotations

import numpy as np
import pytest

from cnidose.errors import DataError, ExpressionError, ModelFileError
from cnidose.models import load_model, parse_model
from cnidose.models.expr import compile_expression
from cnidose.pk import split_individuals

from .conftest import REPO


@pytest.mark.parametrize("src", ["__import__('os')", "x.y", "a[0]", "lambda: 1", "open('f')", "'text'",
                                 "[1, 2]", "a // b", "True", "f(x)", "exp(x, y)"])
def test_forbidden_constructs(src: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expression(src)


def test_arithmetic_and_conditionals_vectorised() -> None:
    e = compile_expression("2 ** 3 + -A / 4 if B >= 1 and not C == 0 else max(A, 10)")
    out = e({"A": np.array([4.0, 40.0]), "B": np.array([1.0, 0.0]), "C": np.array([1.0, 1.0])})
    np.testing.assert_allclose(out, [7.0, 40.0])
    assert compile_expression("1 < X <= 3")({"X": np.array([1.0, 2.0, 3.0])}).tolist() == [False, True, True]


def test_model_hash_changes_with_content() -> None:
    path = REPO / "validation" / "nonmem-dosing" / "model.toml"
    raw = path.read_bytes()
    m1 = load_model(path)
    m2 = parse_model(raw.replace(b"value = 1.1", b"value = 1.2"))
    assert m1.content_hash != m2.content_hash and len(m1.content_hash) == 64
    assert m2.parameters["THETA_CL"].value == 1.2


def test_undeclared_name_is_rejected() -> None:
    raw = (REPO / "validation" / "nonmem-dosing" / "model.toml").read_bytes()
    with pytest.raises(ModelFileError, match=r"pk.CL.*WT"):
        parse_model(raw.replace(b'"THETA_CL * exp(ETA_CL)"', b'"THETA_CL * WT"'))


def test_covariate_range_and_missing_value() -> None:
    m = load_model(REPO / "validation" / "nonmem-dosing" / "model-tv.toml")
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 1], "AMT": [100, 0], "WT": [70, 900]}, rows=[2, 3])
    with pytest.raises(DataError, match=r"row 3, column WT.*not a plausible total body weight in kg"):
        m.simulate(ind)
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 1], "AMT": [100, 0], "WT": [70, 350]}, rows=[2, 3])
    notices = m.simulate(ind).notices
    assert [(n.kind, n.covariate, n.row) for n in notices] == [("domain", "WT", 3)]
    assert "outside the domain of model nmtests-2001 (1-300 kg)" in notices[0].message
    ind, = split_individuals({"ID": [1, 1], "TIME": [0, 1], "AMT": [100, 0], "WT": [70, np.nan]}, rows=[2, 3])
    with pytest.raises(DataError, match=r"row 3, column WT.*missing"):
        m.simulate(ind)


def test_ode_model_file_matches_linear_model() -> None:
    """The same 1-compartment model written as ODE equations gives the closed-form answer."""
    text = (REPO / "validation" / "nonmem-dosing" / "model.toml").read_text()
    start = text.index("flows = [")
    end = text.index("]\n", text.index("per = \"V\"")) + 2
    ode = text[:start] + ('kind = "ode"\n[structure.ode]\ndDEPOT = "-KA * DEPOT"\n'
                          'dCENTRAL = "KA * DEPOT - CL / V * CENTRAL"\n') + text[end:]
    m_lin = load_model(REPO / "validation" / "nonmem-dosing" / "model.toml")
    m_ode = parse_model(ode.encode())
    ind, = split_individuals({"ID": [1] * 4, "TIME": [0, 1, 6, 30], "AMT": [100, 0, 0, 0], "II": [12, 0, 0, 0],
                              "ADDL": [2, 0, 0, 0], "CMT": [1, 2, 2, 2]})
    a = m_lin.simulate(ind).prediction
    b = m_ode.simulate(ind).prediction
    assert m_ode.simulate(ind).method == "ode"
    np.testing.assert_allclose(b, a, rtol=1e-8)
