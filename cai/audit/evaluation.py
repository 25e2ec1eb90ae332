"""Evaluation methodology: scoring, data overlap, reproducibility.

- heuristic-scoring / heuristic-scoring-decides: a scoring function (named score/judge/grade/
  correct/pass/verdict/...) taking a response that decides from a length threshold
  (`len(response) > 500`), refusal keywords ("sorry", "I cannot" ... `in` the response) or
  non-emptiness (`return bool(response.strip())`), and never reads what the instruction asked
  (no instruction/constraint/kwargs/reference/checker name in its body). An error when its
  verdicts feed a significance test or a gate (a file calling it, or its own, calls mcnemar /
  binomtest / ttest / wilcoxon / bootstrap / a gate): a length cut-off then ships as p = 2e-12.
- incomparable-scorers: two or more evaluation entry points reading the same data file, each
  with its own scorers and no scorer they all share: their numbers cannot be compared. Reported
  once per group, at the first entry point.
- eval-on-training-data: an evaluation file reads a data file that a training or pair-building
  file also reads (paths resolved through string constants, module and imported path constants,
  `Path(...) / "x"`, `os.path.join`, f-strings, `+`). Reported at the evaluation read.
- unseeded-sampling: `do_sample=True` or a literal `temperature > 0` in evaluation code, where
  neither the file nor a project module it imports sets a seed (torch.manual_seed, set_seed,
  random.seed, np.random.seed, `seed=` to vLLM) and no `generator=` is passed.

File roles come from names: evaluation = a path part or function named eval/bench/judge/score/
infer/predict/compare; training = train/sft/dpo/finetune/pairs/build/prepare, or a file that
constructs a *Trainer. Tests are exempt.
"""

from __future__ import annotations

import ast
import os
import re

from cai.audit.codebase import Codebase, SourceFile, dotted_parts
from cai.audit.findings import Finding
from cai.audit.rules import is_entry_point

EVAL_RE = re.compile(r"eval|bench|judge|score|infer|predict|compare", re.I)
TRAIN_RE = re.compile(r"train|sft|dpo|finetune|fine_tune|pairs|build|prepare", re.I)
SCORER_RE = re.compile(r"score|judge|grade|correct|success|pass|verdict|follows|complian|is_valid|accept", re.I)
RESPONSE_RE = re.compile(r"resp|output|completion|answer|generat|pred|reply|^text$|^out$", re.I)
INSTRUCTION_RE = re.compile(
    r"instruction|constraint|kwargs|checker|verif|expected|reference|target|gold|label|question|prompt|spec", re.I
)
REFUSALS = ("sorry", "i cannot", "i can't", "as an ai", "unable to", "i apologize", "cannot help", "not able to")
SIGNIFICANCE_RE = re.compile(
    r"mcnemar|binom_?test|ttest|wilcoxon|chi2_contingency|fisher_exact|permutation_test|bootstrap|mannwhitney|^gate|_gate$",
    re.I,
)
SEED_CALLS = {"manual_seed", "manual_seed_all", "set_seed", "seed", "seed_everything", "enable_full_determinism"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
READ_KWARGS = ("data_files", "path", "path_or_buf", "filepath", "file", "filename", "fname")


def role(sf: SourceFile) -> str | None:
    """"eval", "train" or None, from the file's path (its name first) and trainer construction."""
    parts = sf.rel[:-3].split("/")
    for part in reversed(parts):
        if EVAL_RE.search(part):
            return "eval"
        if TRAIN_RE.search(part):
            return "train"
    if any(n.endswith("Trainer") for n in sf.names):
        return "train"
    return None


def _last(call: ast.Call) -> str:
    return (dotted_parts(call.func) or [""])[-1] if not isinstance(call.func, ast.Attribute) else call.func.attr


# ---------------------------------------------------------------------- path constants
class Paths:
    """String values of path expressions, through constants and imports of the audited code."""

    def __init__(self, cb: Codebase):
        self.cb = cb

    def value(self, sf: SourceFile, e: ast.AST, depth: int = 0) -> str | None:
        if depth > 8 or e is None:
            return None
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in sf.consts:
                return self.value(sf, sf.consts[e.id], depth + 1)
            imp = sf.imports.get(e.id)
            if imp and imp[0] == "symbol":
                mod = self.cb.resolve_module(imp[1], sf) if imp[1] else None
                if mod is not None and mod is not sf and imp[2] in mod.consts:
                    return self.value(mod, mod.consts[imp[2]], depth + 1)
            return None
        if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Div, ast.Add)):
            a, b = self.value(sf, e.left, depth + 1), self.value(sf, e.right, depth + 1)
            if a is None or b is None:
                return None
            return f"{a}/{b}" if isinstance(e.op, ast.Div) else a + b
        if isinstance(e, ast.JoinedStr):
            out = []
            for v in e.values:
                s = v.value if isinstance(v, ast.Constant) else self.value(sf, v.value, depth + 1)
                if s is None:
                    return None
                out.append(s)
            return "".join(out)
        if isinstance(e, ast.Call):
            name = _last(e)
            if name in ("Path", "PurePath", "join") and e.args and not e.keywords:
                vals = [self.value(sf, a, depth + 1) for a in e.args]
                return None if None in vals else "/".join(vals)
            if name in ("str", "resolve", "absolute", "expanduser", "fspath") and isinstance(e.func, ast.Attribute):
                return self.value(sf, e.func.value, depth + 1)
            if name in ("str", "fspath") and e.args:
                return self.value(sf, e.args[0], depth + 1)
        return None


def _norm(path: str) -> str:
    return os.path.normpath(path.replace("\\", "/")).lstrip("./") if not path.startswith("/") else os.path.normpath(path)


def data_reads(cb: Codebase, paths: Paths, sf: SourceFile) -> list[tuple[ast.Call, str]]:
    """(call, normalised data path) for every read of a data file in sf (writes excluded)."""
    out = []
    for node in sf.nodes:
        if not isinstance(node, ast.Call):
            continue
        name = _last(node).lower()
        if any(w in name for w in ("write", "save", "dump", "to_json", "to_csv", "mkdir", "exists")):
            continue
        if not (name == "open" or "read" in name or "load" in name):
            continue
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
                continue
        exprs = list(node.args[:2]) + [k.value for k in node.keywords if k.arg in READ_KWARGS]
        if isinstance(node.func, ast.Attribute) and name.startswith("read"):
            exprs.append(node.func.value)  # Path(p).read_text()
        for e in exprs:
            for leaf in (e.values if isinstance(e, ast.Dict) else e.elts if isinstance(e, (ast.List, ast.Tuple)) else [e]):
                v = paths.value(sf, leaf)
                if v and v.endswith(DATA_SUFFIXES) and not re.search(r"config|setting|hparam", v, re.I):
                    out.append((node, _norm(v)))
    return out


# ---------------------------------------------------------------------- heuristic scoring
def _names(fn: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) < 40:
            out.add(n.value)  # record["instruction"]
    return out


def _mentions(e: ast.AST, params: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in params for n in ast.walk(e))


def _number(sf: SourceFile, e: ast.AST, defaults: dict) -> float | None:
    if isinstance(e, ast.Constant) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool):
        return e.value
    if isinstance(e, ast.Name):
        src = defaults.get(e.id, sf.consts.get(e.id))
        if src is not None and src is not e:
            return _number(sf, src, {})
    return None


def _strings(sf: SourceFile, e: ast.AST) -> list[str]:
    if isinstance(e, ast.Name) and e.id in sf.consts:
        e = sf.consts[e.id]
    return [n.value.lower() for n in ast.walk(e) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def heuristic(sf: SourceFile, fn: ast.FunctionDef) -> str | None:
    """What the scorer decides from, or None when it is not a heuristic scorer."""
    args = [a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]]
    resp = {a for a in args if RESPONSE_RE.search(a)}
    if not resp:
        return None
    if any(INSTRUCTION_RE.search(n) for n in _names(fn) - resp):
        return None
    for n in ast.walk(fn):  # text = response.strip(): text is the response too
        if isinstance(n, ast.Assign) and _mentions(n.value, resp):
            resp |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    pos = [*fn.args.posonlyargs, *fn.args.args]
    defaults = {a.arg: d for a, d in zip(pos[len(pos) - len(fn.args.defaults) :], fn.args.defaults)}
    defaults |= {a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None}
    for n in ast.walk(fn):
        if isinstance(n, ast.Compare) and len(n.comparators) == 1:
            left, right, op = n.left, n.comparators[0], n.ops[0]
            for a, b in ((left, right), (right, left)):
                if isinstance(a, ast.Call) and _last(a) == "len" and a.args and _mentions(a.args[0], resp):
                    t = _number(sf, b, defaults)
                    if t is not None:
                        what = "non-emptiness" if t in (0, 1) else f"a length threshold ({ast.unparse(n)})"
                        return what
            if isinstance(op, (ast.In, ast.NotIn)) and _mentions(right, resp):
                words = _strings(sf, left) if not isinstance(left, ast.Name) or left.id in sf.consts else []
                if any(r in w for w in words for r in REFUSALS):
                    return f"refusal keywords ({ast.unparse(n)[:60]})"
                for comp in ast.walk(fn):  # any(k in response for k in REFUSAL_WORDS)
                    if isinstance(comp, ast.comprehension) and isinstance(comp.target, ast.Name):
                        if _mentions(left, {comp.target.id}):
                            if any(r in w for w in _strings(sf, comp.iter) for r in REFUSALS):
                                return f"refusal keywords ({ast.unparse(comp.iter)[:40]})"
            if isinstance(op, (ast.NotEq, ast.Eq)) and _mentions(left, resp) and isinstance(right, ast.Constant) and right.value == "":
                return "non-emptiness"
        if isinstance(n, ast.Return) and isinstance(n.value, ast.Call) and _last(n.value) == "bool":
            if n.value.args and _mentions(n.value.args[0], resp):
                return "non-emptiness"
    return None


def scorers(cb: Codebase) -> list[tuple[SourceFile, ast.FunctionDef]]:
    return [
        (sf, fn)
        for sf in cb.parsed
        if not sf.is_test
        for fn, _cls in cb.functions(sf)
        if SCORER_RE.search(fn.name)
    ]


def heuristic_scoring(cb: Codebase) -> list[Finding]:
    out = []
    for sf, fn in scorers(cb):
        what = heuristic(sf, fn)
        if what is None:
            continue
        feeds = None
        for other in cb.parsed:
            if other is not sf and fn.name not in other.names:
                continue
            for n in other.nodes:
                if isinstance(n, ast.Call) and SIGNIFICANCE_RE.search(_last(n)):
                    feeds = (other, n)
                    break
            if feeds:
                break
        rule = "heuristic-scoring-decides" if feeds else "heuristic-scoring"
        tail = (
            f" Its verdicts feed `{_last(feeds[1])}()` ({feeds[0].rel}:{feeds[1].lineno}): a significance test or "
            "gate on such verdicts measures the heuristic (e.g. answer length), not instruction following."
            if feeds
            else " Its pass rate measures the heuristic, not instruction following."
        )
        out.append(
            Finding(
                rule,
                sf.rel,
                fn.lineno,
                f"{fn.name}() decides success from {what}, never reading what the instruction asked.{tail} "
                "Fix: score with a verifier of the instruction's own constraint (IFEval-style checkers, "
                "`cai score`), one canonical scorer shared by every evaluation.",
                fn.col_offset + 1,
            )
        )
    return out


# ---------------------------------------------------------------------- scorers across entry points
def incomparable_scorers(cb: Codebase, paths: Paths) -> list[Finding]:
    by_data: dict[str, list[tuple[SourceFile, set]]] = {}
    for sf in cb.parsed:
        if sf.is_test or role(sf) != "eval" or not is_entry_point(sf):
            continue
        used = set()
        for n in sf.nodes:
            if isinstance(n, ast.Call) and SCORER_RE.search(_last(n)):
                target = cb.resolve(sf, n.func)
                if target is not None and target[0] == "func":
                    used.add((target[1].rel, target[2].name))
                elif target is None or target[0] == "ext":  # a method of a local instance: known by its name
                    used.add(("", _last(n)))
        if not used:
            continue
        for path in {os.path.basename(p) for _, p in data_reads(cb, paths, sf)}:
            by_data.setdefault(path, []).append((sf, used))
    out, seen = [], set()
    for data, group in sorted(by_data.items()):
        if len(group) < 2 or set.intersection(*(u for _, u in group)):
            continue
        key = tuple(sorted(sf.rel for sf, _ in group))
        if key in seen:
            continue
        seen.add(key)
        group.sort(key=lambda g: g[0].rel)
        listed = "; ".join(f"{sf.rel}: {', '.join(sorted(n for _, n in u))}" for sf, u in group)
        first = group[0][0]
        out.append(
            Finding(
                "incomparable-scorers",
                first.rel,
                1,
                f"{len(group)} evaluation entry points score {data} with different scorers and none shared "
                f"({listed}): their numbers cannot be compared, and which one a report quotes is a choice. "
                "Fix: one canonical scorer (a shared module or `cai score`) that every evaluation calls.",
            )
        )
    return out


# ---------------------------------------------------------------------- train/eval data overlap
def eval_on_training_data(cb: Codebase, paths: Paths) -> list[Finding]:
    train: dict[str, tuple[SourceFile, ast.Call]] = {}
    evals = []
    for sf in cb.parsed:
        if sf.is_test:
            continue
        r = role(sf)
        for call, p in data_reads(cb, paths, sf):
            if r == "train":
                train.setdefault(p, (sf, call))
            elif r == "eval":
                evals.append((sf, call, p))
    out = []
    for sf, call, p in evals:
        if p not in train:
            continue
        tsf, tcall = train[p]
        out.append(
            Finding(
                "eval-on-training-data",
                sf.rel,
                call.lineno,
                f"this evaluation reads {p}, which {tsf.rel}:{tcall.lineno} (training or pair building) also reads: the model is "
                "scored on data it was trained on, so the score measures memorisation, not generalisation. "
                "Fix: evaluate on a held-out file that no training or pair-building script reads.",
                call.col_offset + 1,
            )
        )
    return out


# ---------------------------------------------------------------------- unseeded sampling
def _seeds(sf: SourceFile) -> bool:
    for n in sf.nodes:
        if isinstance(n, ast.Call):
            if _last(n) in SEED_CALLS:
                return True
            if any(k.arg in ("seed", "generator") for k in n.keywords):
                return True
    return False


def _sampling(node: ast.AST) -> str | None:
    pairs = []
    if isinstance(node, ast.Call):
        pairs = [(k.arg, k.value) for k in node.keywords]
    elif isinstance(node, ast.Dict):
        pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
    for k, v in pairs:
        if k == "do_sample" and isinstance(v, ast.Constant) and v.value is True:
            return "do_sample=True"
        if k == "temperature" and isinstance(v, ast.Constant) and isinstance(v.value, (int, float)) and v.value > 0:
            if not any(kk == "do_sample" and isinstance(vv, ast.Constant) and vv.value is False for kk, vv in pairs):
                return f"temperature={v.value}"
    return None


def unseeded_sampling(cb: Codebase) -> list[Finding]:
    out = []
    for sf in cb.parsed:
        if sf.is_test:
            continue
        evaluation = role(sf) == "eval"
        sites = []
        for fn, _cls in cb.functions(sf) if not evaluation else [(sf.tree, None)]:
            if not evaluation and not EVAL_RE.search(fn.name):
                continue
            sites += [(n, s) for n in ast.walk(fn) if (s := _sampling(n)) is not None]
        if not sites or _seeds(sf):
            continue
        if any(_seeds(m) for d in sf.imported for m in cb.candidates(d) if m is not sf):
            continue
        for node, what in {id(n): (n, w) for n, w in sites}.values():
            out.append(
                Finding(
                    "unseeded-sampling",
                    sf.rel,
                    node.lineno,
                    f"evaluation samples ({what}) and no seed is set in this file or the project modules it imports: "
                    "rerunning gives different scores, and a difference between models may be sampling noise. "
                    "Fix: call transformers.set_seed(seed) (vLLM: SamplingParams(seed=...)) with the seed recorded, "
                    "or evaluate greedily.",
                    node.col_offset + 1,
                )
            )
    return out


def evaluation_rules(cb: Codebase) -> list[Finding]:
    paths = Paths(cb)
    return heuristic_scoring(cb) + incomparable_scorers(cb, paths) + eval_on_training_data(cb, paths) + unseeded_sampling(cb)
