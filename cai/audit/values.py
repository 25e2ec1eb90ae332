"""Value tracing for `cai.audit.flow`: the abstract values a scope's names hold and the walker that
carries them through statements in source order.

`Tracer` knows paths (branches merged, loops walked twice, `return`/`raise`/`break` ending a path,
`except` handlers starting from the state before the `try` body) and bindings (names, `self.x`,
containers), not what a tokenizer or a model is: calls, and what a finished path hands back, are
decided by the checks `cai.audit.flow.Scope` mixes in (`call`, `load`, `disable`, `collected`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cai.audit.codebase import SourceFile, dotted_parts

if TYPE_CHECKING:
    from cai.audit.flow import FlowAnalyzer

RAISES = {"raises", "assertRaises", "assertRaisesRegex"}
MODELISH = {"model", "pipe", "vllm"}
MAX_LOOP_DEPTH = 3


@dataclass(eq=False)
class TokOrigin:
    sf: SourceFile
    node: ast.Call
    how: str
    unsafe_use: tuple | None = None
    returned_by: str | None = None
    consumers: int = 0
    attr_escapes: list = field(default_factory=list)
    global_escapes: list = field(default_factory=list)


@dataclass(eq=False)
class Val:
    kind: str  # tok | model | pipe | vllm | param | messages | obj (an instance of a project class)
    site: tuple | None = None  # (rel, line, col) of the load
    label: str = ""
    disabled: bool = False
    owns: bool = True
    offloaded: bool = False
    name: str = ""  # parameter name
    origin: TokOrigin | None = None
    cls: tuple | None = None  # ("class", file, ClassDef) of an obj


@dataclass
class Summary:
    returns: object = None  # spec: ("tok", origin, disabled) | ("model", kind, label) | ("param", name) | tuple
    disables: frozenset = frozenset()  # parameters whose chat template the function disables
    uses: frozenset = frozenset()  # parameters the function encodes with, renders through or passes on
    attr_disables: frozenset = frozenset()  # `self.x` whose chat template the method disables


def key_of(node: ast.AST) -> str | None:
    parts = dotted_parts(node)
    return ".".join(parts) if parts else None


def flatten(v) -> list:
    if isinstance(v, tuple):
        out = []
        for x in v:
            out.extend(flatten(x))
        return out
    return [v] if isinstance(v, Val) else []


def is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def kwarg(node: ast.Call, name: str) -> ast.expr | None:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def looks_like_messages(node: ast.AST) -> bool:
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        return all(looks_like_messages(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return any(isinstance(k, ast.Constant) and k.value == "role" for k in node.keys)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return kwarg(node, "role") is not None
    return False


def spec_items(spec) -> list:
    if isinstance(spec, tuple) and spec and not isinstance(spec[0], str):
        out = []
        for x in spec:
            out.extend(spec_items(x))
        return out
    return [spec] if spec is not None else []


class Tracer:
    """Walks one scope (module body, function, method) in source order; `final` scopes report,
    the others only summarise what the function returns and does to its parameters."""

    def __init__(self, A: FlowAnalyzer, sf: SourceFile, fn, cls, final: bool):
        self.A, self.sf, self.fn, self.cls, self.final = A, sf, fn, cls, final
        self.env: dict[str, object] = {}
        self.cont: dict[str, list[Val]] = {}
        self.ret_specs: list = []
        self.disables: set[str] = set()
        self.param_uses: set[str] = set()
        self.attr_disables: set[str] = set()
        self.opaque: set[str] = set()  # names bound here to values of unknown kind
        self.suppress = 0
        self.loop_depth = 0
        # the rest of the current path never runs (after return / raise / break); a path that
        # ended so leaves no state behind: `try: m = load(); return m` does not hold m in the
        # next retry, and an `except` fallback starts from the state before the failed load
        self.dead = False
        self.breaks: list[list[tuple]] = []

    # ------------------------------------------------------------------ driver
    def run(self) -> Summary:
        if self.fn is None:
            self.stmts(self.sf.tree.body)
        else:
            a = self.fn.args
            for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                self.env[p.arg] = Val("param", name=p.arg)
            self.stmts(self.fn.body)
        if self.final:
            self._escapes()
        returns = None
        for spec in self.ret_specs:
            if spec is not None:
                returns = spec
                if any(isinstance(x, tuple) and x and x[0] in ("tok", "model") for x in spec_items(spec)):
                    break
        return Summary(returns, frozenset(self.disables), frozenset(self.param_uses), frozenset(self.attr_disables))

    def _escapes(self) -> None:
        for k, v in self.env.items():
            for val in flatten(v):
                if val.kind != "tok" or val.disabled or val.origin is None:
                    continue
                if k.startswith("self.") and k.count(".") == 1 and self.cls is not None:
                    val.origin.attr_escapes.append((self.sf, self.cls, k[5:]))
                elif self.fn is None and "." not in k:
                    val.origin.global_escapes.append((self.sf, k))

    def finding(self, rule: str, node: ast.AST, message: str) -> None:
        if self.final and not self.suppress:
            self.A.add(rule, self.sf, node, message)

    def _site(self, node) -> tuple:
        return (self.sf.rel, node.lineno, node.col_offset)

    # ------------------------------------------------------------------ statements
    def stmts(self, body) -> None:
        for s in body:
            if self.dead:
                return
            self.stmt(s)

    def stmt(self, s: ast.stmt) -> None:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return
        if isinstance(s, ast.Assign):
            v = self.ev(s.value)
            for t in s.targets:
                if isinstance(t, ast.Attribute) and t.attr == "chat_template":
                    if is_const(s.value, None):
                        self.disable(key_of(t.value))
                    continue
                self.bind(t, v)
        elif isinstance(s, ast.AnnAssign):
            if s.value is not None:
                self.bind(s.target, self.ev(s.value))
        elif isinstance(s, ast.AugAssign):
            self.ev(s.value)
        elif isinstance(s, ast.Expr):
            self.ev(s.value)
        elif isinstance(s, ast.Return):
            self.on_return(self.ev(s.value) if s.value is not None else None)
            self.dead = True
        elif isinstance(s, ast.Break) and self.breaks:
            self.breaks[-1].append(self.state())
            self.dead = True
        elif isinstance(s, ast.Delete):
            for t in s.targets:
                self.delete(t)
        elif isinstance(s, ast.If):
            self.ev(s.test)
            self.branches([s.body, s.orelse])
        elif isinstance(s, (ast.For, ast.AsyncFor)):
            self.ev(s.iter)
            self.loop(s.body, target=s.target)
            self.stmts(s.orelse)
        elif isinstance(s, ast.While):
            self.ev(s.test)
            self.loop(s.body)
            self.stmts(s.orelse)
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            raises = 0
            for item in s.items:
                ce = item.context_expr
                if isinstance(ce, ast.Call) and (dotted_parts(ce.func) or [""])[-1] in RAISES:
                    raises += 1
                v = self.ev(ce)
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, v)
            self.suppress += raises
            self.stmts(s.body)
            self.suppress -= raises
        elif isinstance(s, ast.Try) or type(s).__name__ == "TryStar":
            # `try: tok.apply_chat_template(...) except ChatTemplateDisabledError:` is a probe that the
            # template is disabled (like pytest.raises), not a use of it
            probe = any(
                "ChatTemplate" in (key_of(t) or "")
                for h in s.handlers
                if h.type is not None
                for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])
            )
            before = self.state()
            self.suppress += probe
            self.stmts(s.body)
            self.suppress -= probe
            self.stmts(s.orelse)
            outs = [self.state()]
            for h in s.handlers:  # a handler runs when the body failed: from the state before it
                self.restore(before)
                self.stmts(h.body)
                outs.append(self.state())
            self.merge(before, outs)
            self.stmts(s.finalbody)
        elif isinstance(s, ast.Match):
            self.ev(s.subject)
            self.branches([c.body for c in s.cases] + [[]])
        elif isinstance(s, (ast.Raise, ast.Assert)):
            for child in ast.iter_child_nodes(s):
                self.ev(child)
            self.dead = isinstance(s, ast.Raise)

    def loop(self, body, target=None) -> None:
        passes = 2 if self.loop_depth < MAX_LOOP_DEPTH else 1
        self.loop_depth += 1
        before = self.state()
        self.breaks.append([])
        for _ in range(passes):
            if self.dead:
                break  # every path through the body returned or raised: no next iteration
            if target is not None:
                self.bind(target, None)
            self.stmts(body)
        self.loop_depth -= 1
        self.merge(before, [self.state(), *self.breaks.pop()])

    def state(self) -> tuple:
        return (dict(self.env), {k: list(v) for k, v in self.cont.items()}, self.dead)

    def restore(self, st: tuple) -> None:
        self.env, self.cont, self.dead = dict(st[0]), {k: list(v) for k, v in st[1].items()}, False

    def merge(self, before: tuple, outs: list[tuple]) -> None:
        """Continue from the paths that reach the end (all dead: dead, from `before`)."""
        live = [(e, c) for e, c, dead in outs if not dead]
        if not live:
            self.restore(before)
            self.dead = True
            return
        self._join(before[0], before[1], live)

    def branches(self, bodies) -> None:
        base_env = dict(self.env)
        base_cont = {k: list(v) for k, v in self.cont.items()}
        outs = []
        for body in bodies:
            self.env = dict(base_env)
            self.cont = {k: list(v) for k, v in base_cont.items()}
            self.dead = False
            self.stmts(body)
            outs.append((self.env, self.cont, self.dead))
        self.merge((base_env, base_cont, False), outs)

    def _join(self, base_env: dict, base_cont: dict, outs: list[tuple]) -> None:
        # a binding released in any branch counts as released (optimistic about releases);
        # a value bound in any branch counts as bound (pessimistic about loads).
        released = {k for e, _ in outs for k in base_env if k not in e}
        env: dict[str, object] = {}
        for e, _ in outs:
            for k, v in e.items():
                if k in released and v is base_env.get(k):
                    continue
                env.setdefault(k, v)
        cont: dict[str, list[Val]] = {}
        for k in {k for _, c in outs for k in c}:
            base = base_cont.get(k, [])
            kept = [v for v in base if all(any(v is w for w in c.get(k, [])) for _, c in outs)]
            new: list[Val] = []
            for _, c in outs:
                for v in c.get(k, []):
                    if not any(v is b for b in base) and not any(v is n for n in new):
                        new.append(v)
            cont[k] = kept + new
        self.env, self.cont, self.dead = env, cont, False

    def bind(self, t: ast.AST, v) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            vals = v if isinstance(v, tuple) and len(v) == len(t.elts) else (None,) * len(t.elts)
            for el, vv in zip(t.elts, vals):
                self.bind(el, vv)
            return
        if isinstance(t, ast.Starred):
            self.bind(t.value, None)
            return
        if isinstance(t, ast.Subscript):
            self.ev(t.slice)
            k = key_of(t.value)
            if k is None:
                self.ev(t.value)
            elif isinstance(v, Val) and v.kind in MODELISH and v.owns:
                self.cont.setdefault(k, []).append(v)
            return
        k = key_of(t)
        if k is None:
            if isinstance(t, ast.Attribute):
                self.ev(t.value)
            return
        self.cont.pop(k, None)
        for kk in [x for x in self.env if x.startswith(k + ".")]:
            del self.env[kk]
        if v is None:
            self.env.pop(k, None)
            self.opaque.add(k)
        else:
            self.env[k] = v
            self.opaque.discard(k)

    def delete(self, t: ast.AST) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for el in t.elts:
                self.delete(el)
        elif isinstance(t, ast.Subscript):
            k = key_of(t.value)
            if k is not None and self.cont.get(k):
                self.cont[k].pop()
        else:
            k = key_of(t)
            if k is not None:
                self.env.pop(k, None)
                self.cont.pop(k, None)

    def on_return(self, v) -> None:
        self.ret_specs.append(self.spec(v))
        if self.final and self.fn is not None:
            for val in flatten(v):
                if val.kind == "tok" and not val.disabled and val.origin is not None:
                    val.origin.returned_by = val.origin.returned_by or self.fn.name

    def spec(self, v):
        if isinstance(v, tuple):
            return tuple(self.spec(x) for x in v) if v else None
        if not isinstance(v, Val):
            return None
        if v.kind == "tok":
            return ("tok", v.origin, v.disabled)
        if v.kind in MODELISH and v.owns and v.site is not None:
            return ("model", v.kind, v.label)
        if v.kind == "param":
            return ("param", v.name)
        return None

    # ------------------------------------------------------------------ expressions
    def ev(self, node):
        if node is None:
            return None
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, (ast.Name, ast.Attribute)):
            k = key_of(node)
            if k is not None and k in self.env:
                return self.env[k]
            if isinstance(node, ast.Attribute):
                self.ev(node.value)
            return None
        if isinstance(node, ast.Tuple):
            return tuple(self.ev(e) for e in node.elts)
        if isinstance(node, ast.IfExp):
            self.ev(node.test)
            a, b = self.ev(node.body), self.ev(node.orelse)
            return a if a is not None else b
        if isinstance(node, ast.NamedExpr):
            v = self.ev(node.value)
            self.bind(node.target, v)
            return v
        if isinstance(node, ast.Await):
            return self.ev(node.value)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return self.comprehension(node)
        if isinstance(node, ast.Lambda):
            return None
        if isinstance(node, ast.List) and looks_like_messages(node):
            return Val("messages")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.ev(child)
        return None

    def comprehension(self, node) -> None:
        for gen in node.generators:
            self.ev(gen.iter)
            for cond in gen.ifs:
                self.ev(cond)
        elts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        for elt in elts:
            v = self.ev(elt)
            if not isinstance(node, ast.GeneratorExp):
                self.collected(elt, v)  # a list/set/dict keeps every element at once
        return None
