"""format-parity: generation fed prompts in another format than the training data is built with.

1. Prompt templates are found everywhere outside tests: f-strings, `str.format` / `%` templates
   and concatenations whose text has a role cue at the start of a line (`Instruction:`,
   `### Response:`, `Question:`, `A:`, `Assistant:` ...) and at least one placeholder. Templates
   with a response-side cue (Response / Answer / Output / Assistant / Completion / A) are the
   candidates for the training format.
2. Generation sites are `X.generate(...)` on models and vLLM engines and calls of
   text-generation pipelines. The prompt they get is traced backwards through assignments,
   loop variables, comprehensions, tokenizer calls (`tok(x, return_tensors="pt")`, `**inputs`,
   `.input_ids`, `.to(device)`) and calls into the audited code (return values, with
   parameters bound to the caller's arguments). A name takes only the assignments that reach the
   use (`inputs = tok(p); inputs = inputs.to(dev)` is two steps, not a cycle). A call of a project
   `*generate*` function or method that itself generates (`self.gen.generate(self.model, self.tok,
   instruction)`) is a site: the wrapper's own generation calls are traced with its parameters
   bound to this call's arguments, wherever the prompt sits among them.
3. A finding is made when the prompt is the *raw instruction* (a variable, parameter, attribute
   or record field named instruction/question/query) while a training template exists; or, in
   evaluation code (path or function named eval/bench/score/judge/infer/predict/compare), when
   the prompt is formatted with cues none of the training-side templates uses. A trace that
   meets anything it cannot decide (a stored `record["prompt"]`, an external formatter, two
   formats on two branches) yields nothing: only a definite mismatch is reported.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from cai.audit.codebase import Codebase, SourceFile, dotted_parts
from cai.audit.findings import Finding
from cai.audit.loaders import ext_kind
from cai.audit.tokenizers import ENCODE_METHODS, TOK_NAME_RE
from cai.audit.values import key_of

_LABELS = r"instruction|response|input|output|question|answer|user|assistant|human|prompt|completion|context|system"
CUE_RE = re.compile(rf"(?:^|\n)[ \t]*(?:#{{1,4}}[ \t]*)?(?:(?i:({_LABELS}))|(Q|A))[ \t]*:")
RESPONSE_LABELS = {"response", "answer", "a", "output", "assistant", "completion"}
RAW_NAME_RE = re.compile(r"^(raw_)?(instruction|instructions|instr|question|questions|query|queries|user_input)$")
EVAL_CONTEXT_RE = re.compile(r"eval|bench|score|judge|infer|predict|compare", re.I)
PASS_THROUGH_METHODS = {"to", "cuda", "cpu", "strip", "rstrip", "lstrip", "input_ids"}
PASS_THROUGH_FUNCS = {"str", "list", "tuple", "dict"}
PLACEHOLDER_RE = re.compile(r"\{[A-Za-z_0-9]*(?:[!:][^{}]*)?\}|%\(?\w*\)?[sdr]")


def cue_labels(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for m in CUE_RE.finditer(text):
        label = (m.group(1) or m.group(2)).lower()
        if label not in out:
            out.append(label)
    return tuple(out)


def template_text(e: ast.AST) -> tuple[str, bool] | None:
    """(text with placeholders, has a placeholder) for string-building expressions."""
    if isinstance(e, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in e.values)
        return text, any(isinstance(v, ast.FormattedValue) for v in e.values)
    if isinstance(e, ast.Constant) and isinstance(e.value, str):
        return e.value, bool(PLACEHOLDER_RE.search(e.value))
    if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
        parts, dynamic = [], False
        for side in (e.left, e.right):
            t = template_text(side)
            if t is None:
                parts.append("{}")
                dynamic = True
            else:
                parts.append(t[0])
                dynamic = dynamic or t[1]
        return "".join(parts), dynamic
    if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Mod) and isinstance(e.left, ast.Constant) and isinstance(e.left.value, str):
        return e.left.value, True
    return None


def _show(text: str) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Facts:
    assigns: dict[str, list] = field(default_factory=dict)
    anchors: dict[str, list] = field(default_factory=dict)  # per assignment: the node that makes it (position)
    iters: dict[str, ast.expr] = field(default_factory=dict)
    params: set[str] = field(default_factory=set)


def scope_facts(body, fn=None) -> Facts:
    facts = Facts()
    if fn is not None:
        a = fn.args
        facts.params = {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}

    def add(k, value, anchor):
        facts.assigns.setdefault(k, []).append(value)
        facts.anchors.setdefault(k, []).append(anchor)

    def visit(stmts):
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(s, ast.Assign):
                for t in s.targets:
                    k = key_of(t)
                    if k:
                        add(k, s.value, s)
            elif isinstance(s, ast.AnnAssign) and s.value is not None:
                k = key_of(s.target)
                if k:
                    add(k, s.value, s)
            elif isinstance(s, (ast.For, ast.AsyncFor)) and isinstance(s.target, ast.Name):
                facts.iters[s.target.id] = s.iter
            elif isinstance(s, (ast.With, ast.AsyncWith)):
                for item in s.items:
                    if isinstance(item.optional_vars, ast.Name):
                        add(item.optional_vars.id, item.context_expr, item.context_expr)
            for name in ("body", "orelse", "finalbody"):
                sub = getattr(s, name, None)
                if isinstance(sub, list):
                    visit(sub)
            for h in getattr(s, "handlers", []) or []:
                visit(h.body)
            for c in getattr(s, "cases", []) or []:
                visit(c.body)

    visit(body)
    return facts


def _blocks(sf: SourceFile, node: ast.AST) -> tuple:
    """The statement lists enclosing node inside its function, outermost first, as
    (id(compound statement), field) pairs: an assignment whose chain is a prefix of a use's chain
    runs on every path to that use."""
    parents = sf.parents
    chain = []
    child, cur = node, parents.get(id(node))
    while cur is not None and not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module, ast.Lambda)):
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            sub = getattr(cur, name, None)
            if isinstance(sub, list) and any(x is child for x in sub):
                chain.append((id(cur), name))
                break
        child, cur = cur, parents.get(id(cur))
    return tuple(reversed(chain))


def reaching(sf: SourceFile, facts: Facts, name: str, use: ast.AST) -> list:
    """The assigned values of `name` that can reach `use`: the last assignment before it that runs on
    every path to it, plus the conditional ones after that. So `inputs = tok(p); inputs = inputs.to(d)`
    traces through both steps instead of looping. Without any earlier assignment (a loop-carried value),
    every assignment of the scope."""
    values, anchors = facts.assigns.get(name, []), facts.anchors.get(name, [])
    pos = (getattr(use, "lineno", 0), getattr(use, "col_offset", 0))
    before = [
        (v, a) for v, a in zip(values, anchors)
        if (getattr(a, "end_lineno", 0) or 0, getattr(a, "end_col_offset", 0) or 0) <= pos
    ]
    if not before:
        return list(values)
    chain = _blocks(sf, use)
    out: list = []
    for v, a in before:
        mine = _blocks(sf, a)
        if chain[: len(mine)] == mine:
            out = [v]  # runs on every path to the use: kills what came before it
        else:
            out.append(v)
    return out


@dataclass
class Ctx:
    sf: SourceFile
    facts: Facts
    cls: ast.ClassDef | None
    bindings: dict = field(default_factory=dict)  # name -> (expr, Ctx)


class ParityAnalyzer:
    def __init__(self, cb: Codebase):
        self.cb = cb
        self.templates: list[tuple[SourceFile, ast.AST, tuple, str]] = []
        self._facts: dict[int, Facts] = {}

    def run(self) -> list[Finding]:
        for sf in self.cb.parsed:
            if not sf.is_test:
                try:
                    self._collect_templates(sf)
                except RecursionError:
                    continue
        training = [t for t in self.templates if RESPONSE_LABELS & set(t[2])]
        training.sort(key=lambda t: bool(EVAL_CONTEXT_RE.search(t[0].rel)))  # training-side files first
        if not training:
            return []
        findings: dict[tuple, Finding] = {}
        for sf in self.cb.parsed:
            if sf.is_test or not ("pipeline" in sf.names or any("generate" in n for n in sf.names)):
                continue  # no generation call in this file
            scopes = [(sf.tree.body, None, None)] + [(fn.body, fn, cls) for fn, cls in self.cb.functions(sf)]
            for body, fn, cls in scopes:
                try:
                    ctx = Ctx(sf, self.facts(body, fn), cls)
                    for call, prompt, what, site_ctx in self._generation_sites(body, ctx):
                        verdict = self.classify(prompt, site_ctx)
                        f = self._judge(sf, fn, call, what, verdict, training)
                        if f is not None:
                            findings.setdefault((f.path, f.line, f.column), f)
                except RecursionError:  # pathological nesting: skip this scope, audit the rest
                    continue
        return list(findings.values())

    def facts(self, body, fn) -> Facts:
        key = id(fn) if fn is not None else id(body)
        if key not in self._facts:
            self._facts[key] = scope_facts(body, fn)
        return self._facts[key]

    def _collect_templates(self, sf: SourceFile) -> None:
        docstrings = {
            id(n.body[0].value)
            for n in sf.nodes
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
        }
        inner: set[int] = set()
        for node in sf.nodes:
            if id(node) in inner or id(node) in docstrings:
                continue
            if not isinstance(node, (ast.JoinedStr, ast.Constant, ast.BinOp)):
                continue
            t = template_text(node)
            if t is None or not t[1]:
                continue
            labels = cue_labels(t[0])
            if not labels:
                continue
            self.templates.append((sf, node, labels, t[0]))
            for sub in ast.walk(node):
                if sub is not node:
                    inner.add(id(sub))

    # ------------------------------------------------------------------ sites
    def _generation_sites(self, body, ctx: Ctx, depth: int = 0):
        """(call, prompt expression, description, ctx) for each generation call of the scope;
        comprehension variables are bound to their iterables. A call of a project wrapper method
        (`self.gen.generate(self.model, self.tok, instruction)`) is a site for each generation call
        inside the wrapper, its prompt traced there with the wrapper's parameters bound to this
        call's arguments, so a prompt that is not the first argument is still found."""

        def visit(node, c: Ctx):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                return
            if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
                inner = Ctx(c.sf, c.facts, c.cls, dict(c.bindings))
                for gen in node.generators:
                    yield from visit(gen.iter, c)
                    if isinstance(gen.target, ast.Name):
                        inner.bindings[gen.target.id] = (gen.iter, c)
                for child in ast.iter_child_nodes(node):
                    if not isinstance(child, ast.comprehension):
                        yield from visit(child, inner)
                return
            if isinstance(node, ast.Call):
                wrapper = self._wrapper(node, c) if depth < 3 else None
                if wrapper is not None:
                    for _, prompt, _, inner in self._generation_sites(wrapper[1].body, wrapper[2], depth + 1):
                        yield (node, prompt, wrapper[0], inner)
                else:
                    site = self._site(node, c)
                    if site is not None:
                        yield (*site, c)
            for child in ast.iter_child_nodes(node):
                yield from visit(child, c)

        for s in body:
            yield from visit(s, ctx)

    def _site(self, node: ast.Call, ctx: Ctx):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "generate":
            recv = key_of(f.value)
            if recv is None or TOK_NAME_RE.search(recv.split(".")[-1]):
                return None
            head = recv.split(".")[0]
            imp = ctx.sf.imports.get(head)
            if imp is not None and imp[0] == "module" and head not in ctx.facts.assigns:
                return None
            prompt = self._prompt_arg(node, ("input_ids", "inputs", "prompts", "prompt"))
            return (node, prompt, f"`{recv}.generate(...)`") if prompt is not None else None
        k = key_of(f)
        if k is not None and self._is_pipeline(k, ctx):
            prompt = self._prompt_arg(node, ("text_inputs", "inputs"))
            return (node, prompt, f"the pipeline `{k}(...)`") if prompt is not None else None
        return None

    def _wrapper(self, node: ast.Call, ctx: Ctx):
        """(description, FunctionDef, Ctx with its parameters bound to the arguments) when node calls
        a `generate` function or method of the audited code that itself generates."""
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name is None or "generate" not in name:
            return None
        target = self.cb.resolve(ctx.sf, f, ctx.cls) if dotted_parts(f) else None
        if target is None and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            for rhs in ctx.facts.assigns.get(f.value.id, []):  # gen = Generator(...); gen.generate(...)
                held = self.cb.resolve(ctx.sf, rhs.func, ctx.cls) if isinstance(rhs, ast.Call) else None
                if held is not None and held[0] == "class":
                    target = self.cb.method(held[1], held[2], f.attr)
        if target is None or target[0] != "func":
            return None
        _, tsf, fn, tcls = target
        if not any(isinstance(n, ast.Attribute) and n.attr in ("generate", "pipeline") for n in ast.walk(fn)) and not any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "pipeline" for n in ast.walk(fn)
        ):
            return None
        params = [p.arg for p in [*fn.args.posonlyargs, *fn.args.args]]
        if tcls is not None and params and params[0] in ("self", "cls"):
            params = params[1:]
        bindings = {p: (arg, ctx) for p, arg in zip(params, node.args) if not isinstance(arg, ast.Starred)}
        bindings.update({kw.arg: (kw.value, ctx) for kw in node.keywords if kw.arg is not None})
        return (f"`{key_of(f) or name}(...)`", fn, Ctx(tsf, self.facts(fn.body, fn), tcls, bindings))

    @staticmethod
    def _prompt_arg(node: ast.Call, names) -> ast.expr | None:
        for kw in node.keywords:
            if kw.arg in names:
                return kw.value
        if node.args:
            a = node.args[0]
            return a.value if isinstance(a, ast.Starred) else a
        for kw in node.keywords:
            if kw.arg is None:
                return kw.value
        return None

    def _is_pipeline(self, k: str, ctx: Ctx) -> bool:
        rhs = list(ctx.facts.assigns.get(k, []))
        if k.startswith("self.") and ctx.cls is not None:
            rhs += self._class_assigns(ctx, k)
        if not ctx.facts.assigns.get(k) and "." not in k:
            if k in ctx.sf.consts:
                rhs.append(ctx.sf.consts[k])
        for e in rhs:
            if isinstance(e, ast.Call):
                t = self.cb.resolve(ctx.sf, e.func, ctx.cls)
                if t is not None and t[0] == "ext" and ext_kind(t[1]) == "pipeline":
                    return True
        return False

    def _class_assigns(self, ctx: Ctx, key: str) -> list:
        out = []
        for node in ctx.cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out += self.facts(node.body, node).assigns.get(key, [])
        return out

    # ------------------------------------------------------------------ tracing
    def classify(self, e, ctx: Ctx, depth: int = 0, seen=None):
        """("raw", description) | ("fmt", labels, text, file, node) | None (undecided)."""
        seen = set() if seen is None else seen
        if e is None or depth > 14 or (id(e), id(ctx)) in seen:
            return None
        seen = seen | {(id(e), id(ctx))}
        r = lambda x, c=ctx: self.classify(x, c, depth + 1, seen)  # noqa: E731

        if isinstance(e, (ast.JoinedStr, ast.Constant, ast.BinOp)):
            t = template_text(e)
            if t is not None:
                labels = cue_labels(t[0])
                if labels:
                    return ("fmt", labels, t[0], ctx.sf, e)
            if isinstance(e, ast.JoinedStr):
                vals = [v.value for v in e.values if isinstance(v, ast.FormattedValue)]
                rest = "".join(v.value for v in e.values if isinstance(v, ast.Constant))
                if len(vals) == 1 and not rest.strip():
                    return r(vals[0])
            if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
                sides = [r(e.left), r(e.right)]
                fmts = [s for s in sides if s and s[0] == "fmt"]
                if fmts:
                    return fmts[0]
            return None
        if isinstance(e, ast.Name):
            return self._name(e, ctx, r)
        if isinstance(e, ast.Attribute):
            if e.attr in PASS_THROUGH_METHODS:
                return r(e.value)
            k = key_of(e)
            if k is not None:
                rhs = list(ctx.facts.assigns.get(k, []))
                if k.startswith("self.") and ctx.cls is not None:
                    rhs += self._class_assigns(ctx, k)
                if rhs:
                    return self._combine([r(x) for x in rhs])
            return ("raw", f"`{k or e.attr}`") if RAW_NAME_RE.match(e.attr) else None
        if isinstance(e, ast.Subscript):
            s = e.slice
            if isinstance(s, ast.Constant) and isinstance(s.value, str):
                if RAW_NAME_RE.match(s.value):
                    return ("raw", f"the `{s.value}` field")
                if s.value == "input_ids":
                    return r(e.value)
                return None
            return r(e.value)
        if isinstance(e, ast.Call):
            return self._call(e, ctx, r)
        if isinstance(e, (ast.List, ast.Tuple, ast.Set)):
            return self._combine([r(x.value if isinstance(x, ast.Starred) else x) for x in e.elts])
        if isinstance(e, (ast.ListComp, ast.GeneratorExp, ast.SetComp)):
            inner = Ctx(ctx.sf, ctx.facts, ctx.cls, dict(ctx.bindings))
            for gen in e.generators:
                if isinstance(gen.target, ast.Name):
                    inner.bindings[gen.target.id] = (gen.iter, ctx)
            return self.classify(e.elt, inner, depth + 1, seen)
        if isinstance(e, ast.Starred):
            return r(e.value)
        if isinstance(e, ast.IfExp):
            return self._combine([r(e.body), r(e.orelse)])
        return None

    def _name(self, e: ast.Name, ctx: Ctx, r):
        name = e.id
        if name in ctx.bindings:
            expr, c = ctx.bindings[name]
            return r(expr, c)
        if name in ctx.facts.assigns:
            return self._combine([r(x) for x in reaching(ctx.sf, ctx.facts, name, e)])
        if name in ctx.facts.iters:
            return r(ctx.facts.iters[name])
        if name not in ctx.facts.params and name in ctx.sf.consts:
            return r(ctx.sf.consts[name], Ctx(ctx.sf, self.facts(ctx.sf.tree.body, None), None))
        return ("raw", f"`{name}`") if RAW_NAME_RE.match(name) else None

    def _call(self, e: ast.Call, ctx: Ctx, r):
        f = e.func
        parts = dotted_parts(f) or []
        last = parts[-1] if parts else (f.attr if isinstance(f, ast.Attribute) else "")
        first = e.args[0] if e.args else None
        if isinstance(f, ast.Attribute) and f.attr == "format":
            base = f.value
            if isinstance(base, ast.Name) and base.id in ctx.sf.consts:
                base = ctx.sf.consts[base.id]
            t = template_text(base)
            if t is not None and cue_labels(t[0]):
                return ("fmt", cue_labels(t[0]), t[0], ctx.sf, base)
            return None
        if last == "apply_chat_template":
            return None  # the chat-template rules report it
        tokish = (isinstance(f, ast.Name) and TOK_NAME_RE.search(f.id)) or (
            isinstance(f, ast.Attribute)
            and (
                (f.attr in ENCODE_METHODS and key_of(f.value) and TOK_NAME_RE.search(key_of(f.value).split(".")[-1]))
                or TOK_NAME_RE.search(f.attr)
            )
        )
        if tokish:
            text = first
            for kw in e.keywords:
                if kw.arg == "text":
                    text = kw.value
            return r(text)
        if isinstance(f, ast.Attribute) and f.attr in PASS_THROUGH_METHODS:
            return r(f.value)
        if isinstance(f, ast.Name) and f.id in PASS_THROUGH_FUNCS and first is not None:
            return r(first)
        target = self.cb.resolve(ctx.sf, f, ctx.cls) if parts else None
        if target is not None and target[0] == "func":
            return self._local(e, target, ctx, r)
        return None

    def _local(self, e: ast.Call, target, ctx: Ctx, r):
        _, tsf, fn, tcls = target
        a = fn.args
        params = [p.arg for p in [*a.posonlyargs, *a.args]]
        if tcls is not None and params and params[0] in ("self", "cls"):
            params = params[1:]
        bindings = {}
        for p, arg in zip(params, e.args):
            if not isinstance(arg, ast.Starred):
                bindings[p] = (arg, ctx)
        for kw in e.keywords:
            if kw.arg is not None:
                bindings[kw.arg] = (kw.value, ctx)
        inner = Ctx(tsf, self.facts(fn.body, fn), tcls, bindings)
        rets = [n.value for n in _returns(fn) if n.value is not None]
        if not rets:
            return None
        return self._combine([r(x, inner) for x in rets])

    @staticmethod
    def _combine(results):
        results = list(results)
        if not results or any(x is None for x in results):
            fmts = [x for x in results if x and x[0] == "fmt"]
            # one formatted path and undecided others: formatted (not raw) is all we can say
            if fmts and len({f[1] for f in fmts}) == 1:
                return fmts[0]
            return None
        if all(x[0] == "raw" for x in results):
            return results[0]
        fmts = [x for x in results if x[0] == "fmt"]
        if len(fmts) == len(results) and len({f[1] for f in fmts}) == 1:
            return fmts[0]
        return None

    # ------------------------------------------------------------------ verdict
    def _judge(self, sf, fn, call, what, verdict, training) -> Finding | None:
        if verdict is None:
            return None
        if verdict[0] == "raw":
            tsf, tnode, labels, text = training[0]
            return Finding(
                "eval-format-mismatch",
                sf.rel,
                call.lineno,
                f"{what} is fed the raw instruction ({verdict[1]}), while training prompts are built with the "
                f"format \"{_show(text)}\" ({tsf.rel}:{tnode.lineno}): the model is evaluated on a distribution "
                "it was not trained on, so scores measure the format shift, not the training. Fix: render "
                "evaluation prompts with the same function that renders the training prompts.",
                call.col_offset + 1,
            )
        labels, text, vsf, vnode = verdict[1], verdict[2], verdict[3], verdict[4]
        in_eval = EVAL_CONTEXT_RE.search(sf.rel) or (fn is not None and EVAL_CONTEXT_RE.search(fn.name))
        if not in_eval:
            return None
        others = [t for t in training if t[1] is not vnode]
        if not others or any(set(labels) == set(t[2]) for t in others):
            return None
        tsf, tnode, _, ttext = others[0]
        return Finding(
            "eval-format-mismatch",
            sf.rel,
            call.lineno,
            f"{what} is fed prompts formatted as \"{_show(text)}\" ({vsf.rel}:{vnode.lineno}), while training "
            f"prompts are built as \"{_show(ttext)}\" ({tsf.rel}:{tnode.lineno}): evaluation measures the format "
            "shift, not the training. Fix: render evaluation prompts with the same function that renders the "
            "training prompts.",
            call.col_offset + 1,
        )


def _returns(fn):
    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Return):
                yield child
            yield from walk(child)

    yield from walk(fn)
