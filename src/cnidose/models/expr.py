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
import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cnidose.errors import ExpressionError

__all__ = ["Expression", "compile_expression", "derivative", "scalar_source"]

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


# -- derivatives ------------------------------------------------------------------------------------------------------
_LN10 = 2.302585092994046  # ln 10


def _num(v: float) -> ast.expr:
    return ast.UnaryOp(ast.USub(), ast.Constant(-v)) if v < 0 else ast.Constant(v)


def _const(node: ast.expr) -> float | None:
    """The value of a constant node (a number, or minus a number), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _const(node.operand)
        return None if v is None else -v
    return None


def _add(a: ast.expr, b: ast.expr) -> ast.expr:
    ca, cb = _const(a), _const(b)
    if ca == 0.0:
        return b
    if cb == 0.0:
        return a
    if ca is not None and cb is not None:
        return _num(ca + cb)
    return ast.BinOp(a, ast.Add(), b)


def _neg(a: ast.expr) -> ast.expr:
    ca = _const(a)
    return _num(-ca) if ca is not None else ast.UnaryOp(ast.USub(), a)


def _sub(a: ast.expr, b: ast.expr) -> ast.expr:
    if _const(b) == 0.0:
        return a
    if _const(a) == 0.0:
        return _neg(b)
    return ast.BinOp(a, ast.Sub(), b)


def _mul(a: ast.expr, b: ast.expr) -> ast.expr:
    ca, cb = _const(a), _const(b)
    if ca == 0.0 or cb == 0.0:
        return ast.Constant(0.0)
    if ca == 1.0:
        return b
    if cb == 1.0:
        return a
    if ca is not None and cb is not None:
        return _num(ca * cb)
    return ast.BinOp(a, ast.Mult(), b)


def _div(a: ast.expr, b: ast.expr) -> ast.expr:
    if _const(a) == 0.0:
        return ast.Constant(0.0)
    if _const(b) == 1.0:
        return a
    return ast.BinOp(a, ast.Div(), b)


def _call(name: str, *args: ast.expr) -> ast.expr:
    return ast.Call(ast.Name(name, ast.Load()), list(args), [])


def _d(node: ast.expr, x: str) -> ast.expr:
    """d node / d x as a new tree (the language's constructs only), lightly simplified (0 and 1 folded)."""
    zero = ast.Constant(0.0)
    if isinstance(node, ast.Constant):
        return zero
    if isinstance(node, ast.Name):
        return ast.Constant(1.0) if node.id == x else zero
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return _neg(_d(node.operand, x))
        if isinstance(node.op, ast.UAdd):
            return _d(node.operand, x)
        return zero  # not: a truth value, piecewise constant
    if isinstance(node, (ast.Compare, ast.BoolOp)):
        return zero  # truth values are piecewise constant
    if isinstance(node, ast.IfExp):
        a, b = _d(node.body, x), _d(node.orelse, x)
        if _const(a) == 0.0 and _const(b) == 0.0:
            return zero
        return ast.IfExp(node.test, a, b)
    if isinstance(node, ast.BinOp):
        u, v = node.left, node.right
        du, dv = _d(u, x), _d(v, x)
        if isinstance(node.op, ast.Add):
            return _add(du, dv)
        if isinstance(node.op, ast.Sub):
            return _sub(du, dv)
        if isinstance(node.op, ast.Mult):
            return _add(_mul(du, v), _mul(u, dv))
        if isinstance(node.op, ast.Div):  # du / v - u dv / v²
            return _sub(_div(du, v), _div(_mul(u, dv), ast.BinOp(v, ast.Mult(), v)))
        if isinstance(node.op, ast.Pow):
            cv = _const(v)
            if _const(dv) == 0.0:  # u ** c: c u ** (c - 1) du
                if _const(du) == 0.0:
                    return zero
                if cv is not None:
                    power = ast.Constant(1.0) if cv == 1.0 else (u if cv == 2.0 else
                                                                 ast.BinOp(u, ast.Pow(), _num(cv - 1.0)))
                    return _mul(_mul(_num(cv), power), du)
                return _mul(_mul(v, ast.BinOp(u, ast.Pow(), ast.BinOp(v, ast.Sub(), ast.Constant(1.0)))), du)
            # u ** v (v depends on x): u ** v (dv ln u + v du / u)
            inner = _add(_mul(dv, _call("log", u)), _div(_mul(v, du), u))
            return _mul(node, inner)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        f = node.func.id
        args = node.args
        if f in ("min", "max"):
            a, b = _d(args[0], x), _d(args[1], x)
            if _const(a) == 0.0 and _const(b) == 0.0:
                return zero
            op: ast.cmpop = ast.LtE() if f == "min" else ast.GtE()
            return ast.IfExp(ast.Compare(args[0], [op], [args[1]]), a, b)
        a = args[0]
        da = _d(a, x)
        if _const(da) == 0.0:
            return zero
        if f == "exp":
            return _mul(node, da)
        if f == "log":
            return _div(da, a)
        if f == "log10":
            return _div(da, _mul(a, ast.Constant(_LN10)))
        if f == "sqrt":
            return _div(da, _mul(ast.Constant(2.0), node))
        if f == "abs":  # the derivative of |a| is sign(a) da (taken as +da at 0)
            return ast.IfExp(ast.Compare(a, [ast.GtE()], [ast.Constant(0.0)]), da, _neg(da))
    raise ExpressionError(f"cannot differentiate {ast.unparse(node)!r}")  # pragma: no cover (checked constructs)


@functools.lru_cache(maxsize=4096)
def derivative(expr: Expression, name: str) -> Expression | None:
    """The partial derivative of ``expr`` with respect to ``name``, as an expression of the same language, or None
    where it is identically zero (``expr`` does not read ``name``, or only in conditions). Made once per expression
    and name (a fit asks for the same ones at every iteration).

    Conditions (``if``/``else``, ``min``/``max``, ``abs``) are differentiated branch by branch: the derivative is
    that of the branch the values select (one-sided at a kink, as forward-mode automatic differentiation).

    >>> str(derivative(compile_expression("TVCL * (WT / 70) ** 0.75 * exp(ETA_CL)"), "ETA_CL").source)
    'TVCL * (WT / 70) ** 0.75 * exp(ETA_CL)'
    >>> derivative(compile_expression("V * exp(-K * 2)"), "K").source
    'V * (exp(-K * 2) * -2.0)'
    >>> derivative(compile_expression("A if K > 0 else 1"), "K") is None
    True
    """
    if name not in expr.names:
        return None
    tree = ast.parse(expr.source.strip(), mode="eval").body
    d = _d(tree, name)
    if _const(d) == 0.0:
        return None
    return compile_expression(ast.unparse(ast.fix_missing_locations(ast.Expression(d))))
