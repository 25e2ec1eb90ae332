"""Statement-order analysis of every scope (module body, function, method) for the rules that
depend on what a value *is* when it is used: chat-template, special-tokens, memory-sequencing.

The model is deliberately small and stdlib-only:

- Each scope is walked in source order. Variables and `self.x` attributes hold abstract values:
  a tokenizer (with its chat-template state), a model, a pipeline, a vLLM engine, a parameter,
  chat messages. Branches are walked separately and merged; loop bodies are walked twice so
  "the second iteration loads while the first model is still referenced" is seen.
- Calls into the audited codebase are resolved (imports, relative imports, `self.method`,
  re-exports) and summarised: what the function returns (a tokenizer with or without its template,
  a freshly loaded model, one of its parameters) and which parameters it sanitises
  (`p.chat_template = None`). So a helper `load_tok()` that disables the template makes its
  callers safe, and `encode(tok, text)` passing add_special_tokens=False is never flagged.
- Instances of project classes are followed too: `Loader(name).load()`, `loader = Loader(...);
  loader.load()` and `self.loader.load()` (where some method sets `self.loader = Loader(...)`)
  run the summary of `Loader.load`, so a wrapper returning `from_pretrained` results is a load.
- `self.x` set to a tokenizer in another method (`__init__`, `setup`) is encoding when called,
  `self.x(text)` or `self.x.encode(text)`; so is `self.tokenizer(...)` by name.
- A tokenizer whose template is never disabled is reported once, at its load site (where the fix
  goes), when it is used (encoded, passed on, saved) before `chat_template = None`, stored on
  `self` by a class that never disables it, or returned to callers none of which disables it.
- A path that ends (`return`, `raise`, `break`) leaves no state behind: a retry loop returning
  the first successful load, and an `except` fallback (walked from the state before the failed
  `try` body), hold one model, not two.
- An explicit `add_special_tokens=...` (True included) is a deliberate choice and never reported;
  neither is the default for tokenizers that add no BOS/EOS (a literal Qwen / GPT-2 / Pythia
  checkpoint, or `add_bos_token=False` at the load).
- A template left set is chat-template-not-disabled (error, naming the renderer) only where the
  audited code renders templates somewhere (apply_chat_template, lm-eval `apply_chat_template=`,
  vLLM `LLM.chat`, a TRL trainer in a file building "messages" data); otherwise the latent warning
  chat-template-latent, which says that `tokenizer(text)` itself applies no template.
- Model loads while another owned model is referenced in the same scope are reported at the load.
  Wrapping (`PeftModel.from_pretrained(base, ...)`, `get_peft_model`) is not a load; `del x`,
  `x = None`, `x.cpu()`, `x.to("cpu")` and release-named helpers are releases.
- Test modules (see `cai.audit.codebase.is_test_file`) are not reported on: tests build raw
  tokenizers, render templates and load extra tiny models on purpose, as negative controls.
  `with pytest.raises(...)` blocks and `try:` blocks catching a `*ChatTemplate*` exception
  (probes that the template refuses) are not reported on anywhere.

This module is the driver: `FlowAnalyzer` runs the scopes and summarises called functions, and
`Scope.call` resolves each call. The concerns live beside it: `cai.audit.values` (abstract values
and the path-sensitive walk), `cai.audit.loaders` (what loads, wraps or releases a model, and the
memory-sequencing findings), `cai.audit.tokenizers` (templates, encodings and their findings).
"""


from __future__ import annotations

import ast

from cai.audit.codebase import Codebase, SourceFile, dotted_parts
from cai.audit.findings import Finding
from cai.audit.loaders import MemoryChecks, attr_kinds, ext_kind
from cai.audit.tokenizers import ENCODE_METHODS, HARMLESS_FUNCS, TokenizerChecks, template_findings
from cai.audit.values import MODELISH, Summary, TokOrigin, Tracer, Val, is_const, key_of


class FlowAnalyzer:
    """Runs every non-test scope of the codebase (reporting) and summarises called functions on demand."""

    def __init__(self, cb: Codebase):
        self.cb = cb
        self.summaries: dict[int, Summary] = {}
        self.in_progress: set[int] = set()
        self.origins: dict[tuple, TokOrigin] = {}
        self.findings: dict[tuple, Finding] = {}
        self._attr_kinds: dict[int, dict[str, str]] = {}

    def run(self) -> list[Finding]:
        for sf in self.cb.parsed:
            if sf.is_test:
                continue  # tests build raw tokenizers and extra models on purpose (negative controls)
            for fn, cls in [(None, None), *self.cb.functions(sf)]:
                try:
                    Scope(self, sf, fn, cls, final=True).run()
                except RecursionError:  # pathological nesting: skip this scope, audit the rest
                    continue
        template_findings(self)
        return list(self.findings.values())

    def add(self, rule: str, sf: SourceFile, node: ast.AST, message: str) -> None:
        line, col = getattr(node, "lineno", 1), getattr(node, "col_offset", 0) + 1
        self.findings.setdefault((rule, sf.rel, line, col), Finding(rule, sf.rel, line, message, col))

    def summary(self, sf: SourceFile, fn: ast.AST, cls: ast.ClassDef | None) -> Summary | None:
        key = id(fn)
        if key in self.summaries:
            return self.summaries[key]
        if key in self.in_progress:
            return None
        self.in_progress.add(key)
        try:
            s = Scope(self, sf, fn, cls, final=False).run()
        finally:
            self.in_progress.discard(key)
        self.summaries[key] = s
        return s

    def attr_kind(self, sf: SourceFile, cls: ast.ClassDef, attr: str) -> str | None:
        """What `self.<attr>` is assigned anywhere in the class: "pipe", "vllm", "tok", "model"."""
        if not ({"pipeline", "LLM", "from_pretrained"} & sf.names):
            return None  # nothing in this file makes such a value
        if id(cls) not in self._attr_kinds:
            self._attr_kinds[id(cls)] = attr_kinds(self.cb, sf, cls)
        return self._attr_kinds[id(cls)].get(attr)

    def origin(self, sf: SourceFile, node: ast.Call, how: str) -> TokOrigin:
        key = (sf.rel, node.lineno, node.col_offset)
        if key not in self.origins:
            self.origins[key] = TokOrigin(sf, node, how)
        return self.origins[key]


class Scope(MemoryChecks, TokenizerChecks, Tracer):
    """One scope's walk: the tracer's paths and bindings, with calls resolved into the audited
    codebase (functions, methods, project classes) or classified as loads, wraps and encodings."""

    def call(self, node: ast.Call):
        f = node.func
        fk = key_of(f)
        fval = self.env.get(fk) if fk is not None else None
        recv, meth = None, None
        if isinstance(f, ast.Attribute) and fval is None:
            recv, meth = self.ev(f.value), f.attr
        elif isinstance(f, ast.Call):
            fval = self.ev(f)
        elif not isinstance(f, (ast.Name, ast.Attribute)):
            self.ev(f)
        args = [self.ev(a.value if isinstance(a, ast.Starred) else a) for a in node.args]
        kws = {kw.arg: self.ev(kw.value) for kw in node.keywords}
        argvals = [v for v in [*args, *kws.values()] if v is not None]

        # self.x set in another method: only its kind matters here (encoding, pipeline / vLLM chat inputs)
        if fval is None and self.cls is not None:
            if fk and fk.startswith("self.") and fk.count(".") == 1:
                held = self.A.attr_kind(self.sf, self.cls, fk[5:])
                if held == "pipe":
                    self.check_messages(node, args, "a text-generation pipeline")
                    return None
                if held == "tok" or (held is None and self.tokish(None, fk)):
                    self.encode(node, fk)  # self.tokenizer(text): __call__ encodes
                    return None
            recv_key = key_of(f.value) if meth is not None else None
            if recv_key and recv_key.startswith("self.") and recv_key.count(".") == 1:
                held = self.A.attr_kind(self.sf, self.cls, recv_key[5:])
                if meth == "chat" and held == "vllm":
                    return self.method_on(Val("vllm", owns=False), meth, node, f)
                if meth in ENCODE_METHODS and held == "tok":
                    self.encode(node, f"{recv_key}.{meth}")
                    return None

        # calling a tracked value: tok(text), pipe(prompt)
        if isinstance(fval, Val):
            if self.tokish(fval, fk):
                self.encode(node, fk or "tokenizer", fval)
                self.use(fval, node, "used to encode text")
            elif fval.kind == "pipe":
                self.check_messages(node, args, "a text-generation pipeline")
            return None

        # container bookkeeping: models.append(load(...)), models.clear()
        if meth is not None:
            ck = key_of(f.value)
            if ck is not None and (ck in self.cont or meth in ("append", "add", "insert", "appendleft")):
                if meth in ("append", "add", "insert", "appendleft"):
                    for v in args:
                        if isinstance(v, Val) and v.kind in MODELISH and v.owns:
                            self.cont.setdefault(ck, []).append(v)
                    return None
                if meth == "clear":
                    self.cont[ck] = []
                    return None
                if meth in ("pop", "popitem", "remove", "popleft") and self.cont.get(ck):
                    self.cont[ck].pop()
                    return None

        # methods of a project class instance: Loader(name).load(), loader.load()
        if meth is not None and isinstance(recv, Val) and recv.kind == "obj":
            m = self.A.cb.method(recv.cls[1], recv.cls[2], meth)
            return self.local_call(node, m, args, kws) if m is not None else None
        # methods on tracked values
        if meth is not None and isinstance(recv, Val) and (recv.kind != "param" or self.tokish(recv, None)):
            return self.method_on(recv, meth, node, f)
        if meth == "apply_chat_template":
            self.apply_ct(node, None)
            return None
        if meth in ENCODE_METHODS and self.tokish(None, key_of(f.value)):
            self.encode(node, key_of(f.value) + "." + meth)
            return None

        if isinstance(f, ast.Name) and f.id == "setattr" and len(node.args) >= 3:
            if isinstance(node.args[1], ast.Constant) and node.args[1].value == "chat_template" and is_const(node.args[2], None):
                self.disable(key_of(node.args[0]))
            return None

        target = self.A.cb.resolve(self.sf, f, self.cls) if fk is not None else None
        if target is not None and target[0] == "func":
            return self.local_call(node, target, args, kws)
        if target is not None and target[0] == "class":
            for v in argvals:
                self.use(v, node, "passed to " + target[2].name)
            return Val("obj", label=target[2].name, owns=False, cls=target)
        qual = target[1] if target is not None and target[0] == "ext" else None
        kind = ext_kind(qual) if qual else None
        last = (qual or fk or "").split(".")[-1]
        if (
            kind is None
            and isinstance(f, ast.Name)
            and fval is None
            and target is not None
            and target[0] == "ext"
            and "." not in target[1]
            and self.tokish(None, f.id)
        ):
            self.encode(node, f.id)  # a global or parameter-free tokenizer called directly
            return None
        if kind == "tok-load":
            return self.tok_load(node, fk)
        if kind == "model-load":
            return self.load(node, f"`{fk}(...)`", "model")
        if kind == "unsloth":
            m = self.load(node, f"`{fk}(...)`", "model")
            o = self.A.origin(self.sf, node, f"`{fk}(...)`")
            return (m, Val("tok", site=self._site(node), origin=o))
        if kind == "wrap":
            return args[0] if args and isinstance(args[0], Val) else kws.get("model")
        if kind == "pipeline":
            for v in argvals:
                self.use(v, node, "passed to pipeline()")
            model_arg = kws.get("model") if "model" in kws else (args[1] if len(args) > 1 else None)
            if isinstance(model_arg, Val) and model_arg.kind in MODELISH:
                return Val("pipe", site=self._site(node), label="pipeline()", owns=False)
            return self.load(node, "`pipeline(...)`", "pipe")
        if kind == "vllm":
            return self.load(node, "`LLM(...)`", "vllm")
        if last not in HARMLESS_FUNCS:
            for v in argvals:
                self.use(v, node, f"passed to {_callee(node)}")
        self.released_by(last, argvals)
        return None

    def method_on(self, recv: Val, meth: str, node: ast.Call, f: ast.Attribute):
        if self.tokish(recv, key_of(f.value)):
            self.tok_method(recv, meth, node, f)
            return None
        if recv.kind in MODELISH:
            if recv.kind == "vllm" and meth == "chat":
                self.vllm_chat(node)
                return None
            return self.model_method(recv, meth, node)
        if meth == "apply_chat_template":
            self.apply_ct(node, None)
        return None

    def local_call(self, node: ast.Call, target: tuple, args: list, kws: dict):
        _, tsf, fn, tcls = target
        s = self.A.summary(tsf, fn, tcls)
        a = fn.args
        params = [p.arg for p in [*a.posonlyargs, *a.args]]
        bound = tcls is not None and params and params[0] in ("self", "cls") and not any(
            isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list
        )
        if bound and isinstance(node.func, ast.Attribute):
            head = dotted_parts(node.func)
            if not (head and head[0] == tcls.name):
                params = params[1:]
        params_all = set(params) | {p.arg for p in a.kwonlyargs}
        argmap: dict[str, object] = {}
        for p, v in zip(params, args):
            argmap[p] = v
        for k, v in kws.items():
            if k is not None:
                argmap[k] = v
        disables = s.disables if s else frozenset()
        if s is not None and isinstance(node.func, ast.Attribute) and len(dotted_parts(node.func) or []) == 2 and dotted_parts(node.func)[0] == "self":
            for k in s.attr_disables:  # self._setup() disabling self.tokenizer's template
                self.disable(k)
        for p, v in argmap.items():
            if isinstance(v, Val) and p in disables:
                v.disabled = True
                if v.kind == "param":
                    self.disables.add(v.name)
        uses = s.uses if s else None  # unknown (recursion): assume it uses everything
        for v in args[len(params):]:  # swallowed by *args
            self.use(v, node, f"passed to {fn.name}()")
        for p, v in argmap.items():
            if isinstance(v, Val) and p not in disables and (uses is None or p in uses or p not in params_all):
                self.use(v, node, f"passed to {fn.name}()")
        if s is None or s.returns is None:
            return None
        return self.from_spec(s.returns, node, f"{tcls.name}.{fn.name}" if tcls is not None else fn.name, argmap)

    def from_spec(self, spec, node, fname, argmap):
        if isinstance(spec, tuple) and spec and not isinstance(spec[0], str):
            return tuple(self.from_spec(x, node, fname, argmap) for x in spec)
        if not isinstance(spec, tuple) or not spec:
            return None
        if spec[0] == "tok":
            origin, disabled = spec[1], spec[2]
            if self.final and not disabled and origin is not None:
                origin.consumers += 1
            return Val("tok", site=origin.sf.rel if origin else None, origin=origin, disabled=disabled)
        if spec[0] == "model":
            return self.load(node, f"`{fname}()` ({spec[2]})", spec[1])
        if spec[0] == "param":
            return argmap.get(spec[1])
        return None



def _callee(node: ast.Call) -> str:
    try:
        text = ast.unparse(node.func)
    except Exception:  # noqa: BLE001 - only a label
        text = "a call"
    return (text if len(text) <= 40 else text[:37] + "...") + "()"
