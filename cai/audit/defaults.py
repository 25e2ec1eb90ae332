"""Values through defaults: what a keyword really is once parameter defaults and caller overrides
are resolved.

Research code routes settings through its own wrappers: `ModelLoader(name, load_in_8bit=True)`
whose `__init__` has `load_in_4bit=True`, or `from_pretrained(..., trust_remote_code=self.trust_remote_code)`
whose constructor default is True. Judging only literals at `from_pretrained` misses both. This
module binds a value read in a function (`trust_remote_code`, `self.trust_remote_code` set from an
`__init__` parameter) to the parameter it comes from, and finds every call of that function or
class in the audited code with what each call passes for it, so rules can report the effective
value and where it came from.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from cai.audit.codebase import Codebase, SourceFile, dotted_parts


@dataclass(frozen=True)
class Param:
    """A parameter of a function (or of a class's `__init__`) of the audited code."""

    sf: SourceFile
    fn: ast.AST
    cls: ast.ClassDef | None
    name: str
    default: ast.expr | None  # None: no default

    @property
    def owner(self) -> str:
        return f"{self.cls.name}.{self.fn.name}" if self.cls is not None else self.fn.name


def params_of(fn: ast.AST, bound: bool) -> tuple[list[str], dict[str, ast.expr]]:
    """(positional parameter names without self/cls when bound, name -> default expression)."""
    a = fn.args
    pos = [p.arg for p in [*a.posonlyargs, *a.args]]
    defaults = dict(zip(pos[len(pos) - len(a.defaults):], a.defaults))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        if d is not None:
            defaults[p.arg] = d
    if bound and pos and pos[0] in ("self", "cls"):
        pos = pos[1:]
    return pos, defaults


class Defaults:
    """Parameter bindings and the call sites of every function and class of one codebase."""

    def __init__(self, cb: Codebase):
        self.cb = cb
        self._calls: dict[int, list[tuple[SourceFile, ast.Call]]] | None = None

    def param(self, sf: SourceFile, fn: ast.AST, cls: ast.ClassDef | None, expr: ast.expr) -> Param | None:
        """The parameter `expr` reads: a parameter of fn, or `self.x` that cls's `__init__` sets
        from one of its parameters (`self.x = x`)."""
        parts = dotted_parts(expr)
        if parts is None:
            return None
        if len(parts) == 1:
            return self._param(sf, fn, cls, parts[0])
        if len(parts) == 2 and parts[0] == "self" and cls is not None:
            init = self.cb.method(sf, cls, "__init__")
            if init is None:
                return None
            _, isf, ifn, icls = init
            for node in ast.walk(ifn):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
                    if any(dotted_parts(t) == parts for t in node.targets):
                        return self._param(isf, ifn, icls, node.value.id)
        return None

    def _param(self, sf, fn, cls, name: str) -> Param | None:
        a = fn.args
        if name not in {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}:
            return None
        return Param(sf, fn, cls, name, params_of(fn, cls is not None)[1].get(name))

    def calls(self, fn: ast.AST) -> list[tuple[SourceFile, ast.Call]]:
        """Every call of fn in the audited code (a class call counts for its `__init__`)."""
        if self._calls is None:
            self._calls = {}
            for sf in self.cb.parsed:
                for node in sf.nodes:
                    if isinstance(node, ast.Call) and dotted_parts(node.func):
                        t = self.cb.resolve(sf, node.func)
                        if t is not None and t[0] == "class":
                            t = self.cb.method(t[1], t[2], "__init__")
                        if t is not None and t[0] == "func":
                            self._calls.setdefault(id(t[2]), []).append((sf, node))
        return self._calls.get(id(fn), [])

    @staticmethod
    def passed(call: ast.Call, p: Param):
        """What the call passes for p: the expression, None when it leaves the default, or
        Ellipsis when that cannot be told (`*args` / `**kwargs`)."""
        for kw in call.keywords:
            if kw.arg == p.name:
                return kw.value
            if kw.arg is None:
                return ...
        pos, _ = params_of(p.fn, p.cls is not None)
        for i, arg in enumerate(call.args):
            if isinstance(arg, ast.Starred):
                return ...
            if i < len(pos) and pos[i] == p.name:
                return arg
        return None

    def relying_on_default(self, p: Param) -> list[tuple[SourceFile, ast.Call]] | None:
        """The calls that leave p at its default; None when nothing in the audited code calls
        the function (then the default is what runs)."""
        calls = self.calls(p.fn)
        if not calls:
            return None
        return [(sf, c) for sf, c in calls if self.passed(c, p) is None]
