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
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from cai.audit.codebase import Codebase, SourceFile, dotted_parts
from cai.audit.findings import Finding

TOKENIZER_CLASS_RE = re.compile(r"(Tokenizer|Processor)(Fast)?$")
MODEL_CLASS_RE = re.compile(r"^(AutoModel|AutoPeftModel)|For[A-Z]\w*$|Model$|WithValueHead$")
PEFT_WRAPPERS = {"PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftMixedModel"}
WRAP_FUNCS = {"get_peft_model", "prepare_model_for_kbit_training", "inject_adapter_in_model"}
ENCODE_METHODS = {"encode", "encode_plus", "batch_encode_plus", "__call__"}
# save_pretrained / push_to_hub are not uses: a faithful copy of a checkpoint (a conversion cache)
# keeps its template on disk; what matters is that no prompt is rendered or encoded through it.
TOK_USE_METHODS: set[str] = set()
MODEL_ALIAS_METHODS = {
    "to", "cuda", "eval", "train", "half", "float", "bfloat16", "requires_grad_",
    "merge_and_unload", "get_base_model",
}
HARMLESS_FUNCS = {
    "len", "isinstance", "print", "type", "id", "repr", "str", "getattr", "hasattr", "vars",
    "dir", "bool", "callable", "issubclass", "setattr", "delattr", "debug", "info", "warning",
    "error", "exception", "log",
}
TOK_NAME_RE = re.compile(r"^(tok|toks|tokenizer|tokenizers|tknzr|processing_class)$|_tok$|_tokenizer$|^tokenizer_")
RELEASE_NAME_RE = re.compile(r"release|unload|free|offload|cleanup|evict|dispose", re.I)
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


def ext_kind(qual: str) -> str | None:
    parts = qual.split(".")
    last = parts[-1]
    if last == "from_pretrained" and len(parts) >= 2:
        c = parts[-2]
        if c in ("FastLanguageModel", "FastModel"):
            return "unsloth"
        if TOKENIZER_CLASS_RE.search(c):
            return "tok-load"
        if c in PEFT_WRAPPERS:
            return "wrap"
        if "Config" in c or "Extractor" in c:
            return None
        if MODEL_CLASS_RE.search(c):
            return "model-load"
        return None
    if last in WRAP_FUNCS:
        return "wrap"
    if last == "pipeline" and parts[0] in ("pipeline", "transformers"):
        return "pipeline"
    if last == "LLM" and parts[0] in ("LLM", "vllm"):
        return "vllm"
    return None


class FlowAnalyzer:
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
        self._resolve_origins()
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
            kinds = {"pipeline": "pipe", "vllm": "vllm", "tok-load": "tok", "model-load": "model"}
            found: dict[str, str] = {}
            for node in ast.walk(cls):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                    for t in node.targets:
                        k = key_of(t)
                        if k and k.startswith("self.") and k.count(".") == 1:
                            r = self.cb.resolve(sf, node.value.func, cls)
                            kind = kinds.get(ext_kind(r[1]) or "") if r is not None and r[0] == "ext" else None
                            if kind:
                                found[k[5:]] = kind
            self._attr_kinds[id(cls)] = found
        return self._attr_kinds[id(cls)].get(attr)

    def origin(self, sf: SourceFile, node: ast.Call, how: str) -> TokOrigin:
        key = (sf.rel, node.lineno, node.col_offset)
        if key not in self.origins:
            self.origins[key] = TokOrigin(sf, node, how)
        return self.origins[key]

    # -------------------------------------------------------------- tokenizer verdicts
    def _resolve_origins(self) -> None:
        for o in self.origins.values():
            if o.sf.is_test:
                continue
            reason = None
            if o.unsafe_use is not None:
                path, line, what = o.unsafe_use
                reason = f"it is {what} at {path}:{line} with the template still set"
            elif o.returned_by and o.consumers == 0:
                reason = f"{o.returned_by}() returns it with the template still set and no caller in the audited code disables it"
            else:
                for sf, cls, attr in o.attr_escapes:
                    if not _disables_in(cls, f"self.{attr}"):
                        reason = f"it is kept as self.{attr} and {cls.name} never sets self.{attr}.chat_template = None"
                        break
                else:
                    for sf, name in o.global_escapes:
                        if not _disables_in(sf.nodes, name) and _referenced_in_functions(sf.nodes, name):
                            reason = f"the module-level `{name}` is used by functions of the module and never has its template disabled"
                            break
            if not reason:
                continue
            fix = (
                "Fix: set `tokenizer.chat_template = None` right after loading (or pass chat_template=None, or "
                "load through one project loader that does)."
            )
            renderer = self.renderer()
            if renderer is None:
                self.add(
                    "chat-template-latent",
                    o.sf,
                    o.node,
                    f"{o.how} loads a tokenizer and leaves the checkpoint's chat template set: {reason}. Nothing in "
                    "the audited code renders templates (apply_chat_template, a TRL trainer on conversational data, "
                    "lm-eval's apply_chat_template, vLLM's LLM.chat) and `tokenizer(text)` itself never applies one, "
                    "so the hazard is latent: the first such call added later silently wraps a base model's prompts. "
                    + fix,
                )
                continue
            rsf, rline, what = renderer
            self.add(
                "chat-template-not-disabled",
                o.sf,
                o.node,
                f"{o.how} loads a tokenizer and keeps the checkpoint's chat template: {reason}, and {what} "
                f"({rsf.rel}:{rline}) renders chat templates in this codebase. A base model prompted or trained "
                "through a chat template is no longer a base model, so base-vs-trained comparisons are void. " + fix,
            )

    def renderer(self) -> tuple | None:
        """(file, line, what) of the first thing in the audited code that renders chat templates:
        apply_chat_template (a call, or lm-eval's `apply_chat_template=True`), vLLM `LLM.chat`, or
        a TRL trainer in a file building conversational ("messages") data."""
        if not hasattr(self, "_renderer"):
            self._renderer = None
            for sf in self.cb.parsed:
                trl = bool({"SFTTrainer", "DPOTrainer"} & sf.names)
                for n in sf.nodes:
                    if isinstance(n, ast.Attribute) and n.attr == "apply_chat_template":
                        self._renderer = (sf, n.lineno, "apply_chat_template()")
                    elif isinstance(n, ast.keyword) and n.arg == "apply_chat_template" and not is_const(n.value, False):
                        self._renderer = (sf, n.value.lineno, "apply_chat_template=")
                    elif isinstance(n, ast.Attribute) and n.attr == "chat" and "LLM" in sf.names:
                        self._renderer = (sf, n.lineno, "vLLM LLM.chat()")
                    elif trl and isinstance(n, ast.Constant) and n.value == "messages":
                        self._renderer = (sf, n.lineno, "a TRL trainer on conversational data")
                    if self._renderer is not None:
                        return self._renderer
        return self._renderer


NO_SPECIAL_TOKENS_RE = re.compile(r"qwen|(^|/)(distil)?gpt2|pythia|gpt-neox", re.I)


def adds_no_special_tokens(o: TokOrigin) -> bool:
    """Whether the tokenizer's default encoding adds no BOS/EOS, as far as the load shows: a
    checkpoint named literally from a family that adds none (Qwen, GPT-2, Pythia/GPT-NeoX) or
    `add_bos_token=False` (with no `add_eos_token=True`) at the load."""
    if is_const(kwarg(o.node, "add_bos_token"), False) and not is_const(kwarg(o.node, "add_eos_token"), True):
        return True
    name = o.node.args[0] if o.node.args else kwarg(o.node, "pretrained_model_name_or_path")
    if isinstance(name, ast.Name):
        name = o.sf.consts.get(name.id)
    return isinstance(name, ast.Constant) and isinstance(name.value, str) and bool(NO_SPECIAL_TOKENS_RE.search(name.value))


def _disables_in(tree, key: str) -> bool:
    for node in ast.walk(tree) if isinstance(tree, ast.AST) else tree:
        if isinstance(node, ast.Assign) and is_const(node.value, None):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and t.attr == "chat_template" and key_of(t.value) == key:
                    return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 3
            and key_of(node.args[0]) == key
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "chat_template"
            and is_const(node.args[2], None)
        ):
            return True
    return False


def _referenced_in_functions(nodes, name: str) -> bool:
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id == name and isinstance(sub.ctx, ast.Load):
                    return True
    return False


class Scope:
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
                if any(isinstance(x, tuple) and x and x[0] in ("tok", "model") for x in _spec_items(spec)):
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

    def disable(self, k: str | None) -> None:
        if k and k.startswith("self."):
            self.attr_disables.add(k)
        v = self.env.get(k) if k else None
        if isinstance(v, Val):
            v.disabled = True
            if v.kind == "param":
                self.disables.add(v.name)

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
            if (
                not isinstance(node, ast.GeneratorExp)
                and isinstance(v, Val)
                and v.kind in MODELISH
                and v.owns
                and v.site is not None
                and isinstance(elt, ast.Call)
            ):
                self.finding(
                    "models-accumulated",
                    elt,
                    f"{v.label} runs once per item of a comprehension and every loaded model is kept in the "
                    "resulting collection, so all of them are resident at once: at the scale this targets "
                    "that is an out-of-memory. Fix: loop, load one model, use it, then "
                    "`del model; gc.collect(); torch.cuda.empty_cache()` before the next; keep results, not models.",
                )
        return None

    def tokish(self, v, k: str | None) -> bool:
        if isinstance(v, Val):
            if v.kind == "tok":
                return True
            if v.kind == "param":
                return bool(TOK_NAME_RE.search(v.name))
            return False
        # by name only for values this scope did not bind (parameters, attributes, globals):
        # `tokenizer = tiktoken.get_encoding(...)` is not a transformers tokenizer
        return bool(k and k not in self.opaque and TOK_NAME_RE.search(k.split(".")[-1]))

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
                    return self.method_on(Val("vllm", owns=False), meth, node, f, kws)
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
            return self.method_on(recv, meth, node, f, kws)
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
            o = self.A.origin(self.sf, node, f"`{fk}(...)`")
            disabled = node.keywords and is_const(kwarg(node, "chat_template"), None)
            return Val("tok", site=self._site(node), origin=o, disabled=bool(disabled), label=fk or "")
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
        if RELEASE_NAME_RE.search(last or ""):
            for v in argvals:
                if v.kind in MODELISH:
                    v.offloaded = True
        return None

    def method_on(self, recv: Val, meth: str, node: ast.Call, f: ast.Attribute, kws: dict):
        if self.tokish(recv, key_of(f.value)):
            if meth == "apply_chat_template":
                self.apply_ct(node, recv)
            elif meth in ENCODE_METHODS:
                self.encode(node, f"{key_of(f.value) or 'tokenizer'}.{meth}")
                self.use(recv, node, f"used by .{meth}()")
            elif meth in TOK_USE_METHODS:
                self.use(recv, node, f"saved by .{meth}()")
            return None
        if recv.kind in MODELISH:
            to_cpu = meth == "cpu" or (
                meth == "to"
                and any(
                    isinstance(a, ast.Constant) and a.value in ("cpu", "meta")
                    for a in [*node.args, *(kw.value for kw in node.keywords if kw.arg == "device")]
                )
            )
            if to_cpu:
                recv.offloaded = True
                return recv
            if meth in MODEL_ALIAS_METHODS:
                return recv
            if recv.kind == "vllm" and meth == "chat":
                self.finding(
                    "chat-messages-input",
                    node,
                    "vLLM's LLM.chat() renders the tokenizer's chat template around the messages; a base model "
                    "must get raw prompts in the project's format. Fix: render the prompt with the shared format "
                    "function and call LLM.generate() on the string.",
                )
            return None
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

    # ------------------------------------------------------------------ checks
    def _site(self, node) -> tuple:
        return (self.sf.rel, node.lineno, node.col_offset)

    def use(self, v, node, what: str) -> None:
        if self.suppress or not isinstance(v, Val):
            return
        if v.kind == "param":
            self.param_uses.add(v.name)
            return
        if not self.final:
            return
        if v.kind == "tok" and not v.disabled and v.origin is not None and v.origin.unsafe_use is None:
            v.origin.unsafe_use = (self.sf.rel, node.lineno, what)

    def encode(self, node: ast.Call, desc: str, tok=None) -> None:
        if not node.args and not any(kw.arg in ("text", "text_pair", "text_target") for kw in node.keywords):
            return
        names = {kw.arg for kw in node.keywords}
        val = kwarg(node, "add_special_tokens")
        if val is None and None in names:
            return  # **kwargs may carry it
        if val is not None:
            return  # passed explicitly (False, True as a deliberate choice, or decided elsewhere)
        if isinstance(tok, Val) and tok.origin is not None and adds_no_special_tokens(tok.origin):
            return  # the default adds nothing for this tokenizer
        self.finding(
            "special-tokens-default",
            node,
            f"`{desc}(...)` encodes text with the tokenizer's default add_special_tokens=True, which prepends "
            "BOS (and may append EOS) that the prompt format does not declare, so training and evaluation see "
            "different token sequences. Fix: pass add_special_tokens=False (or encode through one helper that does) "
            "and add only the special tokens the format declares.",
        )

    def apply_ct(self, node: ast.Call, v) -> None:
        if isinstance(v, Val) and v.kind == "tok" and v.disabled and kwarg(node, "chat_template") is None:
            return  # raises on a disabled tokenizer: no template can leak
        self.use(v, node, "used by apply_chat_template()")
        self.finding(
            "apply-chat-template",
            node,
            "apply_chat_template() wraps the prompt in the checkpoint's chat template; a base model never saw "
            "that format, so its scores (and any base-vs-trained comparison) are void. Fix: render prompts "
            "with the project's own format function, shared by training and evaluation, and encode with "
            "add_special_tokens=False.",
        )

    def check_messages(self, node: ast.Call, args: list, what: str) -> None:
        first = node.args[0] if node.args else kwarg(node, "text_inputs")
        val = args[0] if args else None
        if (first is not None and looks_like_messages(first)) or (isinstance(val, Val) and val.kind == "messages"):
            self.finding(
                "chat-messages-input",
                node,
                f"{what} called with {{role, content}} messages applies the tokenizer's chat template; a base "
                "model must get the raw prompt string in the project's format. Fix: render the prompt with "
                "the shared format function and pass the string.",
            )

    def alive(self) -> list[tuple[str, Val, bool]]:
        out: list[tuple[str, Val, bool]] = []
        seen: set[int] = set()
        for k, v in self.env.items():
            for val in flatten(v):
                if val.kind in MODELISH and val.owns and not val.offloaded and id(val) not in seen:
                    seen.add(id(val))
                    out.append((k, val, False))
        for k, vals in self.cont.items():
            for val in vals:
                if not val.offloaded and id(val) not in seen:
                    seen.add(id(val))
                    out.append((k, val, True))
        return out

    def load(self, node: ast.Call, label: str, kind: str) -> Val:
        v = Val(kind, site=self._site(node), label=label)
        if not self.final or self.suppress:
            return v
        alive = self.alive()
        if not alive:
            return v
        where = ", ".join(f"`{k}` (line {val.site[1]})" for k, val, _ in alive[:3])
        if self.loop_depth and any(c for _, _, c in alive):
            ck = next(k for k, _, c in alive if c)
            self.finding(
                "models-accumulated",
                node,
                f"{label} loads a model on every iteration while `{ck}` still holds the models of earlier "
                f"iterations ({where}), so they are all resident at once: at the scale this targets that "
                "is an out-of-memory. Fix: load, use and release one model per iteration "
                "(`del model; gc.collect(); torch.cuda.empty_cache()`); keep results, not models.",
            )
        else:
            self.finding(
                "model-load-while-resident",
                node,
                f"{label} loads a model while {where} still {'holds' if len(alive) == 1 else 'hold'} another, so "
                "both are resident at once: at the scale this targets that is an out-of-memory, typically hours "
                "into a run. Fix: release the first (`del model; gc.collect(); torch.cuda.empty_cache()`) before "
                "loading, or keep one base model and switch LoRA adapters in place.",
            )
        return v


def _callee(node: ast.Call) -> str:
    try:
        text = ast.unparse(node.func)
    except Exception:  # noqa: BLE001 - only a label
        text = "a call"
    return (text if len(text) <= 40 else text[:37] + "...") + "()"


def _spec_items(spec) -> list:
    if isinstance(spec, tuple) and spec and not isinstance(spec[0], str):
        out = []
        for x in spec:
            out.extend(_spec_items(x))
        return out
    return [spec] if spec is not None else []
