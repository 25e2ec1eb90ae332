"""The syntactic rules: remote-code, config-drift, unused-implementation.

- remote-code: `trust_remote_code=True` as a call keyword or a dict entry (kwargs dicts); and
  `trust_remote_code=<parameter>` / `=self.x` (set from an `__init__` parameter) whose default is
  True where a call of the function leaves the default or nothing calls it (`cai.audit.defaults`).
- config-drift: literal settings collected outside tests: quantization (`load_in_4bit=True` /
  `load_in_8bit=True`, in BitsAndBytesConfig, from_pretrained or kwargs dicts), LoRA rank
  (`LoraConfig(r=...)`), DPO beta (`DPOConfig(beta=...)`, `DPOTrainer(beta=...)`). When one
  setting has two or more values in two or more files, every site whose value differs from the
  most common one (ties: the first, by path) is reported. Values read from a variable, config
  object or constants module are a shared source and never reported, and neither are literals in
  a branch chosen at run time (`if cfg.quantization == "8bit": ... else: ...`): one arm of a
  configured choice. Tests are exempt: tiny
  test configurations differ from production on purpose. A call of a project wrapper taking
  `load_in_4bit` / `load_in_8bit` parameters counts with its effective quantization (the caller's
  flags over the wrapper's defaults; with both on, the flag the wrapper tests first), and
  quantization-default-override reports a call whose flag is combined with a default that turns
  the other one on (the caller asks for 8-bit and gets 4-bit).
- unused-implementation: a module defining public (non-underscore) functions or classes that no
  other module imports (absolute, relative, `from pkg import mod`, suffix-matched for scripts
  run from their own directory), that no string names (importlib / entry points: dotted name,
  path or `name.py` in Python strings other than docstrings, or in pyproject/cfg/sh/yaml/Makefile
  ... files; imports in notebook cells count too; Markdown is not read, because docs claiming a module is used is the failure this
  rule exists for) and that is not an entry point. Entry points: tests, conftest, `__init__`,
  `__main__`, setup.py, modules with an `if __name__ == "__main__":` block or top-level
  statements that do work (calls, loops, with-blocks). Imports from tests count as uses: the
  rule reports code that nothing at all reaches.
"""

from __future__ import annotations

import ast
import re
from collections import Counter

from cai.audit.codebase import Codebase, SourceFile, dotted_parts
from cai.audit.defaults import Defaults, Param, params_of
from cai.audit.findings import Finding
from cai.audit.values import is_const

ENTRY_NAMES = {"__main__.py", "setup.py", "conftest.py", "manage.py", "noxfile.py", "fabfile.py", "conf.py"}


# ---------------------------------------------------------------------- remote-code
def remote_code(cb: Codebase) -> list[Finding]:
    out = []
    msg = (
        "trust_remote_code=True executes Python shipped inside the checkpoint repository at load time: "
        "arbitrary code, and the model's behaviour can change with any push to that repository. Fix: drop it "
        "and use an architecture transformers implements natively; if unavoidable, pin `revision=` to a "
        "reviewed commit hash."
    )
    for sf in cb.parsed:
        for node in sf.nodes:
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code" and is_const(kw.value, True):
                        out.append(Finding("trust-remote-code", sf.rel, kw.lineno, msg, kw.col_offset + 1))
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and is_const(v, True):
                        out.append(Finding("trust-remote-code", sf.rel, k.lineno, msg, k.col_offset + 1))
    out += _remote_code_by_default(cb, msg)
    return out


def _remote_code_by_default(cb: Codebase, msg: str) -> list[Finding]:
    """`trust_remote_code=<parameter>` (or `=self.x` set from an `__init__` parameter) whose default
    is True, where some call of the function leaves the default or nothing calls it."""
    d = Defaults(cb)
    out = []
    for sf in cb.parsed:
        if "trust_remote_code" not in sf.names:
            continue
        for fn, cls in cb.functions(sf):
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                for kw in node.keywords:
                    if kw.arg != "trust_remote_code" or isinstance(kw.value, ast.Constant):
                        continue
                    p = d.param(sf, fn, cls, kw.value)
                    if p is None or not is_const(p.default, True):
                        continue
                    relying = d.relying_on_default(p)
                    if relying is not None and not relying:
                        continue  # every caller passes its own value
                    where = (
                        "and nothing in the audited code calls it, so the default is what runs"
                        if relying is None
                        else f"which {len(relying)} call(s) leave in place ({_at(relying)})"
                    )
                    out.append(
                        Finding(
                            "trust-remote-code",
                            sf.rel,
                            kw.lineno,
                            f"trust_remote_code is effectively True here: `{ast.unparse(kw.value)}` comes from the "
                            f"default `{p.name}=True` of {p.owner}() ({p.sf.rel}:{p.default.lineno}), {where}. "
                            + msg,
                            kw.col_offset + 1,
                        )
                    )
    return out


def _at(calls) -> str:
    shown = ", ".join(f"{sf.rel}:{c.lineno}" for sf, c in calls[:3])
    return shown + (f" and {len(calls) - 3} more" if len(calls) > 3 else "")


# ---------------------------------------------------------------------- config-drift
DRIFT_NAMES = {
    "quantization-drift": "quantization",
    "lora-rank-drift": "LoRA rank",
    "dpo-beta-drift": "DPO beta",
}


def _number(node) -> float | int | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    return None


def _conditional(sf: SourceFile, node: ast.AST) -> bool:
    """Whether node sits in a branch chosen at run time (if/elif/else, `x if c else y`, match):
    then the literal is one arm of a choice made by configuration, not a hard-coded setting."""
    parents = sf.parents
    child, cur = node, parents.get(id(node))
    while cur is not None and not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
        if isinstance(cur, (ast.If, ast.IfExp)) and child is not cur.test and not _is_main_guard(cur.test):
            return True
        if isinstance(cur, ast.match_case):
            return True
        child, cur = cur, parents.get(id(cur))
    return False


def config_drift(cb: Codebase) -> list[Finding]:
    sites: dict[str, list[tuple[SourceFile, ast.AST, str]]] = {k: [] for k in DRIFT_NAMES}
    for sf in cb.parsed:
        if sf.is_test:
            continue
        for node in sf.nodes:
            if isinstance(node, ast.Call):
                name = (dotted_parts(node.func) or [""])[-1]
                for kw in node.keywords:
                    if kw.arg in ("load_in_4bit", "load_in_8bit") and is_const(kw.value, True):
                        sites["quantization-drift"].append((sf, kw, "4-bit" if "4" in kw.arg else "8-bit"))
                    elif kw.arg == "r" and name.endswith("LoraConfig") and _number(kw.value) is not None:
                        sites["lora-rank-drift"].append((sf, kw, f"r={_number(kw.value)}"))
                    elif (
                        kw.arg == "beta"
                        and name.startswith("DPO")
                        and name.endswith(("Config", "Trainer"))
                        and _number(kw.value) is not None
                    ):
                        sites["dpo-beta-drift"].append((sf, kw, f"beta={_number(kw.value)}"))
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value in ("load_in_4bit", "load_in_8bit") and is_const(v, True):
                        sites["quantization-drift"].append((sf, k, "4-bit" if "4" in k.value else "8-bit"))
    out = []
    # a call of a project wrapper counts with its effective quantization (caller flags over defaults)
    literal = {id(node) for _, node, _ in sites["quantization-drift"]}
    wrapped: list[tuple[SourceFile, ast.AST, str]] = []
    for sf, call, fn, cls, flags, passed in _quant_wrapper_calls(cb):
        literal -= {id(kw) for kw in call.keywords}
        asked = [f for f in flags if is_const(passed[f], True)]
        on_by_default = [f for f, p in flags.items() if passed[f] is None and is_const(p.default, True)]
        on = asked + on_by_default
        if asked and on_by_default:
            out.append(_default_override(sf, call, fn, cls, flags, asked, on_by_default))
            first = _first_checked(cls if cls is not None else fn, flags)
            on = [first[0]] if first is not None else on
        if len(on) == 1:
            wrapped.append((sf, call, BITS[on[0]]))
    sites["quantization-drift"] = [s for s in sites["quantization-drift"] if id(s[1]) in literal] + wrapped
    for rule, found in sites.items():
        found = [s for s in found if not _conditional(s[0], s[1])]
        if len({v for _, _, v in found}) < 2:
            continue
        found.sort(key=lambda s: (s[0].rel, s[1].lineno))
        counts = Counter(v for _, _, v in found)
        top = max(counts.values())
        reference = next(v for _, _, v in found if counts[v] == top)
        for sf, node, value in found:
            if value == reference:
                continue
            others = [(o, n, v) for o, n, v in found if v != value and o is not sf]
            if not others:
                continue
            listed = ", ".join(f"{v} at {o.rel}:{n.lineno}" for o, n, v in others[:3])
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            out.append(
                Finding(
                    rule,
                    sf.rel,
                    node.lineno,
                    f"{DRIFT_NAMES[rule]} is {value} here but {listed}{more}: the same setting is chosen differently "
                    "across scripts with no shared source, so their results are not comparable and nobody can tell "
                    f"which is intended. Fix: choose the {DRIFT_NAMES[rule]} once (run config or a shared constants "
                    "module) and read it everywhere.",
                    node.col_offset + 1,
                )
            )
    return out


BITS = {"load_in_4bit": "4-bit", "load_in_8bit": "8-bit"}


def _quant_wrapper_calls(cb: Codebase):
    """(file, call, function, class, {flag: Param}, {flag: passed}) for every call, outside tests,
    of a function or class of the audited code taking load_in_4bit / load_in_8bit parameters."""
    d = Defaults(cb)
    for wsf in cb.parsed:
        if not (set(BITS) & wsf.names):
            continue
        for fn, cls in cb.functions(wsf):
            _, defaults = params_of(fn, cls is not None)
            names = {p.arg for p in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
            flags = {f: Param(wsf, fn, cls, f, defaults.get(f)) for f in BITS if f in names}
            if not flags:
                continue
            for sf, call in d.calls(fn):
                passed = {f: d.passed(call, p) for f, p in flags.items()}
                if not sf.is_test and all(v is not ... for v in passed.values()):
                    yield sf, call, fn, cls, flags, passed


def _first_checked(scope: ast.AST, flags) -> tuple[str, int] | None:
    """The flag the wrapper tests first (`if self.load_in_4bit: ... elif ...`), with its line: with
    both on, that branch is the one taken."""
    tests = sorted(
        (n.test for n in ast.walk(scope) if isinstance(n, (ast.If, ast.IfExp))), key=lambda t: (t.lineno, t.col_offset)
    )
    for t in tests:
        seen = {n.id for n in ast.walk(t) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(t) if isinstance(n, ast.Attribute)
        }
        hit = [f for f in flags if f in seen]
        if len(hit) == 1:
            return hit[0], t.lineno
        if hit:
            return None
    return None


def _default_override(sf, call, fn, cls, flags, asked, on_by_default) -> Finding:
    owner = f"{cls.name}" if cls is not None and fn.name == "__init__" else flags[asked[0]].owner
    defaults = ", ".join(f"`{f}=True` ({flags[f].sf.rel}:{flags[f].default.lineno})" for f in on_by_default)
    first = _first_checked(cls if cls is not None else fn, flags)
    if first is not None:
        effect = (
            f"{owner} tests `{first[0]}` first ({flags[first[0]].sf.rel}:{first[1]}), so this call gets "
            f"{BITS[first[0]]}" + ("" if first[0] in asked else f", not the {BITS[asked[0]]} it asks for")
        )
    else:
        effect = "both flags are on, so what loads depends on the wrapper's internals (transformers refuses both at once)"
    return Finding(
        "quantization-default-override",
        sf.rel,
        call.lineno,
        f"this call asks {owner}() for {BITS[asked[0]]} (`{asked[0]}=True`) but leaves its default {defaults} "
        f"on: {effect}. The effective quantization is not what the caller reads. Fix: give the wrapper one "
        "`quantization` parameter (None | '4bit' | '8bit'), or pass the other flag explicitly as False.",
        call.col_offset + 1,
    )


# ---------------------------------------------------------------------- unused-implementation
def is_entry_point(sf: SourceFile) -> bool:
    name = sf.rel.rsplit("/", 1)[-1]
    if sf.is_test or sf.is_init or name in ENTRY_NAMES:
        return True
    for node in sf.tree.body:
        if isinstance(node, ast.If) and _is_main_guard(node.test):
            return True
        if isinstance(node, ast.Expr) and isinstance(node.value, (ast.Call, ast.Await)):
            return True
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)):
            return True
    return False


def _is_main_guard(test: ast.AST) -> bool:
    if not isinstance(test, ast.Compare) or len(test.comparators) != 1:
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


TOKEN_RE = re.compile(r"[\w][\w.\-]*")
NOTEBOOK_IMPORT_RE = re.compile(r"(?:^|\\n|\")\s*(?:from|import)\s+([\w.]+)")
MAX_TEXT_TOTAL = 50_000_000


def _references(cb: Codebase) -> tuple[set[str], list[str], set[str]]:
    """Names that strings mention: every dotted/path token (and its dotted prefixes) of string
    constants outside docstrings and of config/script files; plus the constant prefixes of
    f-strings ending in '.' (dynamic imports: f"pkg.stages.{name}")."""
    tokens: set[str] = set()
    prefixes: list[str] = []
    imports: set[str] = set()

    def add(text: str) -> None:
        for tok in TOKEN_RE.findall(text):
            tok = tok.rstrip(".-")
            tokens.add(tok)
            if "." in tok:
                parts = tok.split(".")
                for i in range(1, len(parts)):
                    tokens.add(".".join(parts[:i]))

    for sf in cb.parsed:
        skip = {id(n.value) for n in sf.nodes if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in sf.nodes:
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if len(node.value) < 10_000:
                    add(node.value)
            elif isinstance(node, ast.JoinedStr) and node.values:
                head = node.values[0]
                if isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value.endswith("."):
                    prefixes.append(head.value)
    budget = MAX_TEXT_TOTAL
    for _rel, path in cb.text_files:
        try:
            size = path.stat().st_size
            if size <= 1_000_000 and size <= budget:
                budget -= size
                text = path.read_text(encoding="utf-8", errors="replace")
                add(text)
                if path.suffix == ".ipynb":  # notebook cells importing modules
                    imports.update(NOTEBOOK_IMPORT_RE.findall(text))
        except OSError:
            pass
    return tokens, prefixes, imports


def unused_modules(cb: Codebase) -> list[Finding]:
    candidates = []
    for sf in cb.parsed:
        if is_entry_point(sf):
            continue
        public = [
            n.name
            for n in sf.tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")
        ]
        if public:
            candidates.append((sf, public))
    if not candidates:
        return []
    used: set[int] = set()
    for sf in cb.parsed:
        for dotted in sf.imported:
            for cand in cb.candidates(dotted):
                if cand is not sf:
                    used.add(id(cand))
    tokens, prefixes, nb_imports = _references(cb)
    for dotted in nb_imports:
        for cand in cb.candidates(dotted):
            used.add(id(cand))
    out = []
    for sf, public in candidates:
        if id(sf) in used:
            continue
        parts = sf.module.split(".")
        names = {sf.rel.rsplit("/", 1)[-1]}
        names |= {".".join(parts[i:]) for i in range(len(parts) - 1)}  # "pkg.mod" also names "src.pkg.mod"
        if names & tokens:
            continue
        if any(("." + sf.module).find("." + p.strip(".") + ".") >= 0 for p in prefixes if len(p) > 1):
            continue
        shown = ", ".join(public[:4]) + (f" and {len(public) - 4} more" if len(public) > 4 else "")
        first = next(n for n in sf.tree.body if getattr(n, "name", None) == public[0])
        out.append(
            Finding(
                "unused-module",
                sf.rel,
                first.lineno,
                f"{sf.rel} implements {shown}, but no module of the audited code imports it and it is not an "
                "entry point: built but never wired in, so whatever it implements does not happen in the "
                "pipeline even if docs say it does. Fix: import and call it where its output is needed, or "
                "delete it.",
                first.col_offset + 1,
            )
        )
    return out
