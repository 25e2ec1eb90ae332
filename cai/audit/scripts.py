"""Orchestration: what the entry points run, and how many of them there are.

- dangling-reference: an orchestrator runs a script that is not in the audited code —
  `subprocess.run(["python", "x.py"])`, `[sys.executable, SCRIPT]`, `os.system("python x.py")`,
  `python x.py` / `python -m pkg.mod` lines in shell scripts, Makefiles and YAML — or imports a
  module of a project package that does not exist. Script paths resolve through constants (as in
  `cai.audit.evaluation.Paths`), against the audited root and the orchestrator's directory. When a
  renamed or deprecated copy exists (`train_v2.py`, `old/train.py`), the message names it.
  Imports inside `try:` (optional dependencies) are not reported.
- duplicate-entry-points: training or evaluation entry points whose statements, after
  replacing every name by `_` and every literal by its type, match at 85% or more (difflib over
  the statement sequence, at least 12 statements each), with no status: neither a module
  docstring or leading comment saying deprecated / superseded / legacy / ablation / variant /
  archived, nor an archive/deprecated/old/legacy directory. Reported once per group.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import shlex

from cai.audit.codebase import Codebase, SourceFile, dotted_parts
from cai.audit.evaluation import Paths, role
from cai.audit.findings import Finding
from cai.audit.rules import is_entry_point

RUN_CALLS = {"run", "call", "check_call", "check_output", "Popen", "system", "create_subprocess_exec", "create_subprocess_shell"}
SHELL_RE = re.compile(r"\bpython[0-9.]*\s+(?:-u\s+)?(?:-m\s+([A-Za-z_][\w.]*)|([\w./-]+\.py))")
STATUS_RE = re.compile(r"deprecated|superseded|legacy|ablation|variant of|archived|do not use|obsolete|kept for reference", re.I)
STATUS_DIRS = {"archive", "archived", "deprecated", "old", "legacy", "attic"}
SIMILAR, MIN_STATEMENTS = 0.85, 12
ROLE_WORDS = {"train": "training", "eval": "evaluation"}


# ---------------------------------------------------------------------- dangling references
def _tokens(cb: Codebase, paths: Paths, sf: SourceFile, call: ast.Call) -> list[str]:
    if not call.args:
        return []
    a = call.args[0]
    if isinstance(a, (ast.List, ast.Tuple)):  # sys.executable and other run-time values stay placeholders
        return [paths.value(sf, e) or "{" + ast.unparse(e) + "}" for e in a.elts]
    v = paths.value(sf, a)
    try:
        return shlex.split(v) if v is not None else []
    except ValueError:
        return []


def _targets(tokens: list[str]) -> list[tuple[str, str]]:
    """("script", path) / ("module", dotted) run by a command line."""
    out = []
    for i, t in enumerate(tokens):
        if t == "-m" and i + 1 < len(tokens) and i > 0 and re.search(r"python|executable", tokens[i - 1]):
            out.append(("module", tokens[i + 1]))
        elif t.endswith(".py") and "{" not in t:
            out.append(("script", t))
    return out


class Dangling:
    def __init__(self, cb: Codebase):
        self.cb = cb
        self.rels = {sf.rel for sf in cb.files}
        self.packages = {m.split(".")[0] for m in cb.modules if "." in m}

    def script_exists(self, orchestrator: str, target: str) -> bool:
        if os.path.isabs(target) or target.startswith(".."):
            return True  # outside the audited tree: not ours to judge
        t = os.path.normpath(target)
        here = os.path.normpath(os.path.join(os.path.dirname(orchestrator), t))
        return t in self.rels or here in self.rels or any(r.endswith("/" + t) for r in self.rels)

    def module_exists(self, dotted: str) -> bool:
        if dotted.split(".")[0] not in self.packages:
            return True  # not a project package: an installed one
        return bool(self.cb.candidates(dotted)) or dotted in self.cb._packages

    def copies(self, target: str) -> list[str]:
        stem = os.path.basename(target)[:-3] if target.endswith(".py") else target.rsplit(".", 1)[-1]
        names = {r: os.path.basename(r)[:-3] for r in self.rels}
        close = set(difflib.get_close_matches(stem, names.values(), n=3, cutoff=0.75))
        return sorted(r for r, n in names.items() if n in close or n.startswith(stem + "_") or stem.startswith(n + "_"))[:3]

    def finding(self, rel: str, line: int, col: int, kind: str, target: str) -> Finding:
        copies = self.copies(target)
        what = {"script": "runs the script", "module": "runs the module", "import": "imports the module"}[kind]
        if copies:
            tail = f"; only renamed or deprecated copies exist ({', '.join(copies)})"
        else:
            tail = ""
        return Finding(
            "dangling-reference",
            rel,
            line,
            f"{what} `{target}`, which is not in the audited code{tail}: this step fails when the "
            "orchestrator reaches it, or runs a stale copy nobody reviews. Fix: point it at the current "
            "script (or restore it), and delete the copies that are no longer run.",
            col,
        )


def dangling_references(cb: Codebase) -> list[Finding]:
    d, paths, out = Dangling(cb), Paths(cb), []
    for sf in cb.parsed:
        for node in sf.nodes:
            if isinstance(node, ast.Call):
                if not _runs_process(sf, node):
                    continue
                for kind, target in _targets(_tokens(cb, paths, sf, node)):
                    ok = d.script_exists(sf.rel, target) if kind == "script" else d.module_exists(target)
                    if not ok:
                        out.append(d.finding(sf.rel, node.lineno, node.col_offset + 1, kind, target))
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not _in_try(sf, node):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [cb.absolutize(node.module, node.level, sf)]
                )
                for dotted in names:
                    if dotted and not d.module_exists(dotted):
                        out.append(d.finding(sf.rel, node.lineno, node.col_offset + 1, "import", dotted))
    for rel, path in cb.text_files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace") if path.stat().st_size < 1_000_000 else ""
        except OSError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for m in SHELL_RE.finditer(line):
                module, script = m.groups()
                if script and "$" not in script and not d.script_exists(rel, script):
                    out.append(d.finding(rel, lineno, m.start() + 1, "script", script))
                elif module and not d.module_exists(module):
                    out.append(d.finding(rel, lineno, m.start() + 1, "module", module))
    return out


def _runs_process(sf: SourceFile, call: ast.Call) -> bool:
    """subprocess.run / os.system / asyncio.create_subprocess_exec, or one imported by name."""
    parts = dotted_parts(call.func) or []
    if not parts or parts[-1] not in RUN_CALLS:
        return False
    if len(parts) >= 2:
        return parts[-2] in ("subprocess", "os", "asyncio")
    imp = sf.imports.get(parts[0])
    return imp is not None and imp[0] == "symbol" and imp[1] in ("subprocess", "os", "asyncio")


def _in_try(sf: SourceFile, node: ast.AST) -> bool:
    cur = sf.parents.get(id(node))
    while cur is not None:
        if isinstance(cur, ast.Try):
            return True
        cur = sf.parents.get(id(cur))
    return False


# ---------------------------------------------------------------------- duplicate entry points
class _Shape(ast.NodeTransformer):
    def visit_Name(self, node):
        return ast.Name(id="_", ctx=node.ctx)

    def visit_arg(self, node):
        return ast.arg(arg="_")

    def visit_Constant(self, node):
        return ast.Constant(value=type(node.value).__name__)

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        node.name = "_"
        return node


def shape(sf: SourceFile) -> list[str]:
    """The file's simple statements in order, names and literals normalised away."""
    out = []
    for node in ast.walk(sf.tree):
        if isinstance(node, ast.stmt) and not hasattr(node, "body"):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # docstrings
            out.append(ast.dump(_Shape().visit(ast.parse(ast.unparse(node)).body[0])))
    return out


def has_status(sf: SourceFile) -> bool:
    if set(sf.rel.split("/")[:-1]) & STATUS_DIRS:
        return True
    head = ast.get_docstring(sf.tree) or ""
    head += "\n".join(line for line in sf.lines[:10] if line.lstrip().startswith("#"))
    return bool(STATUS_RE.search(head))


def duplicate_entry_points(cb: Codebase) -> list[Finding]:
    files = [
        sf for sf in cb.parsed if not sf.is_test and role(sf) and is_entry_point(sf) and not sf.is_init and not has_status(sf)
    ]
    shapes = {sf.rel: shape(sf) for sf in files}
    files = [sf for sf in files if len(shapes[sf.rel]) >= MIN_STATEMENTS]
    parent = {sf.rel: sf.rel for sf in files}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    ratio = {}
    for i, a in enumerate(files):
        for b in files[i + 1 :]:
            if role(a) != role(b):
                continue
            sa, sb = shapes[a.rel], shapes[b.rel]
            m = difflib.SequenceMatcher(None, sa, sb, autojunk=False)
            if m.real_quick_ratio() >= SIMILAR and m.quick_ratio() >= SIMILAR and (r := m.ratio()) >= SIMILAR:
                parent[find(b.rel)] = find(a.rel)
                ratio[(a.rel, b.rel)] = r
    groups: dict[str, list[str]] = {}
    for sf in files:
        groups.setdefault(find(sf.rel), []).append(sf.rel)
    by_rel = {sf.rel: sf for sf in files}
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort()
        low = min(r for (a, b), r in ratio.items() if a in members)
        out.append(
            Finding(
                "duplicate-entry-points",
                members[0],
                1,
                f"{', '.join(members)} are near-duplicate {ROLE_WORDS[role(by_rel[members[0]])]} scripts "
                f"(at least {low:.0%} the same statements once names and literals are normalised) and none "
                "says which is current: results get produced by whichever someone ran. Fix: keep one script "
                "configured per variant, or mark the others deprecated (module docstring) or move them to archive/.",
            )
        )
    return out
