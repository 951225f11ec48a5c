"""A small, safe expression language for model files.

Syntax is a subset of Python expressions, parsed with :mod:`ast` and compiled
to NumPy closures -- never ``eval``-ed:

* numbers, names (parameters, random effects, covariates, earlier
  assignments);
* ``+ - * / **``, unary minus;
* comparisons ``== != < <= > >=``, ``and``, ``or``, ``not``;
* conditionals ``a if condition else b`` (element-wise);
* functions ``exp log log10 sqrt abs min max``.

Anything else (attributes, subscripts, lambdas, other calls) is rejected with
an :class:`~cnidose.errors.ExpressionError` naming the construct.

Examples
--------
>>> e = compile_expression("TVCL * (WT / 70) ** 0.75 * exp(ETA1)")
>>> sorted(e.names)
['ETA1', 'TVCL', 'WT']
>>> float(e({"TVCL": 1.1, "WT": 70.0, "ETA1": 0.0}))
1.1
>>> float(compile_expression("DUR2 if MODE == 2 else 0")({"DUR2": 9.0, "MODE": 2.0}))
9.0
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import ExpressionError

__all__ = ["Expression", "compile_expression", "scalar_source"]

Value = NDArray[np.float64] | float
Env = Mapping[str, Value]
Fn = Callable[[Env], Value]

_BINOPS: dict[type[ast.operator], Callable[[Value, Value], Value]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: np.power,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Value, Value], Value]] = {
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
}
_FUNCS: dict[str, tuple[int, Callable[..., Value]]] = {
    "exp": (1, np.exp),
    "log": (1, np.log),
    "log10": (1, np.log10),
    "sqrt": (1, np.sqrt),
    "abs": (1, np.abs),
    "min": (2, np.minimum),
    "max": (2, np.maximum),
}


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression: call it with an environment of arrays."""

    source: str
    names: frozenset[str]
    _fn: Fn

    def __call__(self, env: Env) -> Value:
        return self._fn(env)


def compile_expression(source: str, *, field: str | None = None) -> Expression:
    """Parse and compile ``source``; raise ExpressionError if it is not allowed."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("expected a non-empty expression string", field=field)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"cannot parse {source!r}: {exc.msg}", field=field) from None
    names: set[str] = set()
    fn = _compile(tree.body, names, source, field)
    return Expression(source, frozenset(names), fn)


def _compile(node: ast.AST, names: set[str], src: str, field: str | None) -> Fn:
    def bad(what: str) -> ExpressionError:
        return ExpressionError(f"{what} is not allowed in {src!r}", field=field)

    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise bad(f"constant {node.value!r}")
        v = float(node.value)
        return lambda env: v
    if isinstance(node, ast.Name):
        name = node.id
        names.add(name)

        def lookup(env: Env) -> Value:
            try:
                return env[name]
            except KeyError:
                raise ExpressionError(f"unknown name {name!r} in {src!r}", field=field) from None

        return lookup
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise bad(f"operator {type(node.op).__name__}")
        a, b = _compile(node.left, names, src, field), _compile(node.right, names, src, field)
        return lambda env: op(a(env), b(env))
    if isinstance(node, ast.UnaryOp):
        x = _compile(node.operand, names, src, field)
        if isinstance(node.op, ast.USub):
            return lambda env: -x(env)
        if isinstance(node.op, ast.UAdd):
            return x
        if isinstance(node.op, ast.Not):
            return lambda env: np.logical_not(x(env))
        raise bad(f"operator {type(node.op).__name__}")
    if isinstance(node, ast.Compare):
        parts = [_compile(node.left, names, src, field)] + [_compile(c, names, src, field) for c in node.comparators]
        ops = []
        for o in node.ops:
            f = _CMPOPS.get(type(o))
            if f is None:
                raise bad(f"comparison {type(o).__name__}")
            ops.append(f)

        def compare(env: Env) -> Value:
            vals = [p(env) for p in parts]
            out = ops[0](vals[0], vals[1])
            for k in range(1, len(ops)):
                out = np.logical_and(out, ops[k](vals[k], vals[k + 1]))
            return out

        return compare
    if isinstance(node, ast.BoolOp):
        items = [_compile(v, names, src, field) for v in node.values]
        comb = np.logical_and if isinstance(node.op, ast.And) else np.logical_or

        def boolop(env: Env) -> Value:
            out = items[0](env)
            for it in items[1:]:
                out = comb(out, it(env))
            return out

        return boolop
    if isinstance(node, ast.IfExp):
        c = _compile(node.test, names, src, field)
        a, b = _compile(node.body, names, src, field), _compile(node.orelse, names, src, field)
        return lambda env: np.where(c(env), a(env), b(env))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords:
            raise bad("this call (functions: " + ", ".join(_FUNCS) + ")")
        arity, f = _FUNCS[node.func.id]
        if len(node.args) != arity:
            raise ExpressionError(f"{node.func.id}() takes {arity} argument(s) in {src!r}", field=field)
        args = [_compile(a, names, src, field) for a in node.args]
        return lambda env: f(*(a(env) for a in args))
    raise bad(type(node).__name__)


_OP_TEXT = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.Eq: "==",
            ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_FUNC_TEXT = {"exp": "math.exp", "log": "math.log", "log10": "math.log10", "sqrt": "math.sqrt", "abs": "abs",
              "min": "min", "max": "max"}


def scalar_source(expr: Expression, names: Mapping[str, str]) -> str:
    """The expression as Python source on scalars, each name replaced by ``names[name]`` (for a compiled kernel:
    ``math`` functions, ``a if c else b``, fully parenthesised). The expression was checked when compiled, so
    every construct here is one of the language's.

    >>> scalar_source(compile_expression("V * exp(-K * 2) if K > 0 else 0"), {"V": "p[0]", "K": "p[1]"})
    '((p[0] * math.exp(((-p[1]) * 2.0))) if (p[1] > 0.0) else 0.0)'
    """
    def text(node: ast.AST) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return repr(float(node.value))
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BinOp):
            return f"({text(node.left)} {_OP_TEXT[type(node.op)]} {text(node.right)})"
        if isinstance(node, ast.UnaryOp):
            op = {ast.USub: "-", ast.UAdd: "+", ast.Not: "not "}[type(node.op)]
            return f"({op}{text(node.operand)})"
        if isinstance(node, ast.Compare):
            items = [text(node.left)] + [text(c) for c in node.comparators]
            parts = [f"({items[k]} {_OP_TEXT[type(o)]} {items[k + 1]})" for k, o in enumerate(node.ops)]
            return parts[0] if len(parts) == 1 else "(" + " and ".join(parts) + ")"
        if isinstance(node, ast.BoolOp):
            return "(" + (" and " if isinstance(node.op, ast.And) else " or ").join(text(v) for v in node.values) + ")"
        if isinstance(node, ast.IfExp):
            return f"({text(node.body)} if {text(node.test)} else {text(node.orelse)})"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return f"{_FUNC_TEXT[node.func.id]}({', '.join(text(a) for a in node.args)})"
        raise ExpressionError(f"{type(node).__name__} cannot be compiled in {expr.source!r}")  # pragma: no cover

    return text(ast.parse(expr.source.strip(), mode="eval").body)
