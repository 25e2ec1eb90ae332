"""`cai audit PATH... [--format text|json|sarif] [flags]`: static audit of a training / evaluation
codebase built on transformers, peft and TRL.

Only the standard library's `ast` is used: audited code is never imported or executed. The
rules (catalogue and severity rationale in `cai.audit.findings`):

    category               rule                          severity
    chat-template          chat-template-not-disabled    error
                           apply-chat-template           error
                           chat-messages-input           error
    special-tokens         special-tokens-default        warning
    memory-sequencing      model-load-while-resident     error
                           models-accumulated            error
    format-parity          eval-format-mismatch          error
    unused-implementation  unused-module                 warning
    remote-code            trust-remote-code             error
    config-drift           quantization-drift            warning
                           lora-rank-drift               warning
                           dpo-beta-drift                warning
    scoring                heuristic-scoring             warning
                           heuristic-scoring-decides     error
                           incomparable-scorers          warning
    data-overlap           eval-on-training-data         error
    orchestration          dangling-reference            error
                           duplicate-entry-points        warning
    reproducibility        unseeded-sampling             warning
    audit                  parse-error                   warning (file reported and skipped)

How each analysis works and what it deliberately does not report: `cai.audit.flow`
(chat-template, special-tokens, memory-sequencing), `cai.audit.parity` (format-parity),
`cai.audit.evaluation` (scoring, data-overlap, reproducibility), `cai.audit.scripts`
(orchestration), `cai.audit.rules` (the rest). Flags and output formats: docs/audit.md. Test modules are exempt from the methodology rules (they build
raw tokenizers and extra tiny models on purpose, as negative controls) but not from remote-code.

All PATHs are audited together as one codebase (calls and imports resolve across them); paths in
findings are relative to the deepest directory containing every PATH. Directories named in
`cai.audit.codebase.DEFAULT_EXCLUDED_DIRS` (.git, venv, build, dist, __pycache__, ...) and
`tests/fixtures` are skipped below a given PATH; pass such a directory explicitly to audit it.

Selection (`cai.audit.cli` holds the flags): `exclude` globs drop files before parsing;
`select` / `ignore` take rule ids or category names; `severity` is the lowest severity reported;
an inline `# cai: ignore[rule-id, ...] reason` on the reported line suppresses a finding (kept in
JSON/SARIF as suppressed, left out of the text); a baseline (a previous `--format json` output)
hides the findings it already lists, matched by fingerprint (rule, path and the reported line's
text, so moving code does not resurface them).

Exit codes: 1 when any reported (selected, unsuppressed, not baselined) error-severity finding,
0 otherwise, 2 on bad input (a missing path, no Python file, an unknown rule id, a baseline that
is not a `cai audit --format json` output).
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from cai.audit.codebase import Codebase
from cai.audit.findings import CATEGORIES, RULES, Finding
from cai.audit.evaluation import evaluation_rules
from cai.audit.flow import FlowAnalyzer
from cai.audit.parity import ParityAnalyzer
from cai.audit.rules import config_drift, remote_code, unused_modules
from cai.audit.scripts import dangling_references, duplicate_entry_points
from cai.errors import BadInputError

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
TOOL_NAME = "cai-audit"
SEVERITIES = ("warning", "error")  # lowest first
SUPPRESSION = re.compile(r"#\s*cai:\s*ignore\[([^\]]*)\]\s*(.*)$")

__all__ = ["AuditResult", "Finding", "RULES", "audit", "render"]


@dataclass
class AuditResult:
    """`findings` are the reported ones; `suppressed` those an inline comment silenced;
    `baselined` counts those hidden because the baseline already lists them."""

    root: Path
    files: int
    unparsed: int
    findings: list[Finding]
    suppressed: list[Finding] = field(default_factory=list)
    baselined: int = 0
    baseline: bool = False  # whether a baseline was given (SARIF baselineState)

    @property
    def exit_code(self) -> int:
        return 1 if any(f.severity == "error" for f in self.findings) else 0

    def summary(self) -> dict:
        sev = Counter(f.severity for f in self.findings)
        return {
            "root": str(self.root),
            "files": self.files,
            "unparsed": self.unparsed,
            "findings": len(self.findings),
            "errors": sev.get("error", 0),
            "warnings": sev.get("warning", 0),
            "suppressed": len(self.suppressed),
            "baselined": self.baselined,
            "by_category": {c: n for c in CATEGORIES if (n := sum(f.category == c for f in self.findings))},
            "by_rule": dict(sorted(Counter(f.rule for f in self.findings).items())),
            "exit_code": self.exit_code,
        }


def audit(
    paths: list[str] | str,
    *,
    exclude: tuple[str, ...] | list[str] = (),
    select: tuple[str, ...] | list[str] = (),
    ignore: tuple[str, ...] | list[str] = (),
    severity: str = "warning",
    baseline: str | Path | None = None,
) -> AuditResult:
    """Audit the given files/directories as one codebase. Raises BadInputError on bad input."""
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    chosen = rule_set(select, ignore)
    if severity not in SEVERITIES:
        raise BadInputError(f"--severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
    known = read_baseline(baseline) if baseline is not None else None
    # Syntax trees hold millions of small objects and no reference cycles: the cyclic GC would
    # rescan them over and over (a 3,000-file codebase audits 3x slower with it on).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    # the analysis recurses along the syntax tree, whose depth ast.parse bounds by the recursion
    # limit itself: leave headroom for the analysis on top of the deepest parsable file.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        cb = Codebase([str(p) for p in paths], exclude=tuple(exclude))
        findings = _analyse(cb)
    finally:
        sys.setrecursionlimit(limit)
        if gc_was_enabled:
            gc.enable()
    low = SEVERITIES.index(severity)
    findings = [f for f in findings if f.rule in chosen and SEVERITIES.index(f.severity) >= low]
    reported = [f for f in findings if f.suppressed is None]
    baselined = 0
    if known is not None:
        remaining = Counter(known)
        kept = []
        for f in reported:
            if remaining[f.fingerprint] > 0:
                remaining[f.fingerprint] -= 1
                baselined += 1
            else:
                kept.append(f)
        reported = kept
    return AuditResult(
        cb.root,
        len(cb.files),
        sum(f.error is not None for f in cb.files),
        reported,
        [f for f in findings if f.suppressed is not None],
        baselined,
        known is not None,
    )


def rule_set(select, ignore) -> set[str]:
    """Rule ids chosen by --select (all when empty) minus --ignore; each entry a rule id or a
    category name."""

    def expand(names, flag) -> set[str]:
        out: set[str] = set()
        for name in names:
            if name in RULES:
                out.add(name)
            elif name in CATEGORIES:
                out |= {r.id for r in RULES.values() if r.category == name}
            else:
                close = [r for r in [*RULES, *CATEGORIES] if name in r or r in name]
                hint = f" (did you mean {', '.join(close[:3])}?)" if close else " (see docs/audit.md)"
                raise BadInputError(f"{flag}: unknown rule or category {name!r}{hint}")
        return out

    return (expand(select, "--select") if select else set(RULES)) - expand(ignore, "--ignore")


def _analyse(cb: Codebase) -> list[Finding]:
    findings: list[Finding] = []
    for sf in cb.files:
        if sf.error is not None:
            line, col, msg = sf.error
            findings.append(
                Finding(
                    "parse-error",
                    sf.rel,
                    line,
                    f"{msg}: this file could not be parsed and was not audited (the rest of the audit is "
                    "complete). Fix: correct the syntax error so the audit covers it.",
                    col,
                )
            )
    findings += FlowAnalyzer(cb).run()
    findings += ParityAnalyzer(cb).run()
    findings += remote_code(cb)
    findings += config_drift(cb)
    findings += unused_modules(cb)
    findings += evaluation_rules(cb)
    findings += dangling_references(cb)
    findings += duplicate_entry_points(cb)
    unique = {(f.rule, f.path, f.line, f.column): f for f in findings}
    lines = {sf.rel: sf.lines for sf in cb.files}
    for rel, path in cb.text_files:  # findings in shell scripts, Makefiles, YAML
        if any(f.path == rel for f in unique.values()):
            lines[rel] = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for f in sorted(unique.values(), key=lambda f: f.sort_key):
        src = lines.get(f.path, [])
        text = src[f.line - 1] if 0 < f.line <= len(src) else ""
        out.append(replace(f, fingerprint=fingerprint(f.rule, f.path, text), suppressed=suppression(text, f)))
    return out


def fingerprint(rule: str, path: str, line_text: str) -> str:
    """Stable across edits elsewhere in the file: the rule, the file and the reported line's
    text with whitespace collapsed (not its number, not the message, which names other lines)."""
    norm = " ".join(line_text.split())
    return hashlib.sha256(f"{rule}\0{path}\0{norm}".encode()).hexdigest()[:20]


def suppression(line_text: str, f: Finding) -> str | None:
    """The reason of a `# cai: ignore[rule-id, ...] reason` comment on the line naming f's rule
    (or its category); None when the line does not suppress f."""
    m = SUPPRESSION.search(line_text)
    if m is None:
        return None
    named = {n.strip() for n in m.group(1).split(",")}
    return m.group(2).strip() if f.rule in named or f.category in named else None


def read_baseline(path: str | Path) -> list[str]:
    """Fingerprints listed by a baseline file: the JSON that `cai audit --format json` writes
    (its `findings[].fingerprint`)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"--baseline: no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"--baseline: {path} is not a `cai audit --format json` output: {e}") from None
    findings = doc.get("findings") if isinstance(doc, dict) else None
    if not isinstance(findings, list) or not all(
        isinstance(f, dict) and isinstance(f.get("fingerprint"), str) for f in findings
    ):
        raise BadInputError(
            f"--baseline: {path} is not a `cai audit --format json` output (needs findings[].fingerprint)"
        )
    return [f["fingerprint"] for f in findings]


# ---------------------------------------------------------------------- rendering
def render_text(result: AuditResult, show_fixes: bool = False, statistics: bool = False) -> str:
    """ruff/flake8 shape: `path:line:col: RULE message`, one line a finding; paths relative to
    the working directory when the audited root is below it (so editors can open them)."""
    lines = []
    for f in result.findings:
        lines.append(f"{shown_path(result.root, f.path)}:{f.line}:{f.column}: {f.rule} {f.short}")
        if show_fixes:
            rest = f.message[len(f.short) - 1 :].lstrip(". ")
            if rest:
                lines.append(f"    why: {rest}")
            lines.append(f"    fix: {f.fix}")
    if statistics:
        lines += render_statistics(result)
    s = result.summary()
    extra = "".join(
        f", {n} {what}" for n, what in ((s["suppressed"], "suppressed"), (s["baselined"], "in the baseline")) if n
    )
    if s["findings"]:
        lines.append(
            f"cai audit: {s['findings']} finding(s): {s['errors']} error(s), {s['warnings']} warning(s) "
            f"in {s['files']} file(s) under {s['root']}{extra}"
        )
    else:
        lines.append(f"cai audit: no findings in {s['files']} file(s) under {s['root']}{extra}")
    return "\n".join(lines)


def shown_path(root: Path, rel: str) -> str:
    try:
        return (root / rel).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return (root / rel).as_posix()


def render_statistics(result: AuditResult) -> list[str]:
    """Count, rule id, severity and summary per rule, most frequent first (ruff --statistics)."""
    counts = Counter(f.rule for f in result.findings)
    width = max((len(str(n)) for n in counts.values()), default=1)
    rwidth = max((len(r) for r in counts), default=1)
    return [
        f"{n:>{width}}  {rule:<{rwidth}}  {RULES[rule].severity:<7}  {RULES[rule].summary}"
        for rule, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def render_json(result: AuditResult) -> str:
    return json.dumps(
        {
            "findings": [f.to_dict() for f in result.findings],
            "suppressed": [f.to_dict() for f in result.suppressed],
            "summary": result.summary(),
        },
        indent=2,
    )


def sarif(result: AuditResult) -> dict:
    from cai import __version__

    rule_ids = list(RULES)
    rules = [
        {
            "id": r.id,
            "name": "".join(w.capitalize() for w in r.id.split("-")),
            "shortDescription": {"text": r.summary},
            "fullDescription": {"text": f"{r.summary}. {r.help}"},
            "help": {"text": r.help},
            "defaultConfiguration": {"level": r.severity},
            "properties": {"category": r.category, "tags": [r.category]},
        }
        for r in RULES.values()
    ]

    def one(f: Finding) -> dict:
        res = {
            "ruleId": f.rule,
            "ruleIndex": rule_ids.index(f.rule),
            "level": f.severity,
            "message": {"text": f.message},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": quote(f.path), "uriBaseId": "SRCROOT"},
                        "region": {"startLine": f.line, "startColumn": f.column},
                    }
                }
            ],
            "partialFingerprints": {"caiAudit/v1": f.fingerprint},
            "properties": {"category": f.category, "fix": f.fix},
        }
        if f.suppressed is not None:
            res["suppressions"] = [{"kind": "inSource", "justification": f.suppressed}]
        elif result.baseline:
            res["baselineState"] = "new"
        return res

    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL_NAME,
                        "version": __version__,
                        "semanticVersion": __version__,
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"SRCROOT": {"uri": result.root.as_uri().rstrip("/") + "/"}},
                "invocations": [{"executionSuccessful": True, "exitCode": result.exit_code}],
                "results": [one(f) for f in [*result.findings, *result.suppressed]],
            }
        ],
    }


def render(result: AuditResult, fmt: str = "text", *, show_fixes: bool = False, statistics: bool = False) -> str:
    if fmt == "json":
        return render_json(result)
    if fmt == "sarif":
        return json.dumps(sarif(result), indent=2)
    return render_text(result, show_fixes=show_fixes, statistics=statistics)
