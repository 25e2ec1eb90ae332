"""`cai audit PATH... [--format text|json|sarif]`: static audit of a training / evaluation
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
    audit                  parse-error                   warning (file reported and skipped)

How each analysis works and what it deliberately does not report: `cai.audit.flow`
(chat-template, special-tokens, memory-sequencing), `cai.audit.parity` (format-parity),
`cai.audit.rules` (the rest). Test modules are exempt from the methodology rules (they build
raw tokenizers and extra tiny models on purpose, as negative controls) but not from remote-code.

All PATHs are audited together as one codebase (calls and imports resolve across them); paths in
findings are relative to the deepest directory containing every PATH. Directories named in
`cai.audit.codebase.DEFAULT_EXCLUDED_DIRS` (.git, venv, build, dist, __pycache__, ...) and
`tests/fixtures` are skipped below a given PATH; pass such a directory explicitly to audit it.

Exit codes: 1 when any error-severity finding, 0 otherwise, 2 on bad input (a missing path, no
Python file).
"""

from __future__ import annotations

import gc
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cai.audit.codebase import Codebase
from cai.audit.findings import CATEGORIES, RULES, Finding
from cai.audit.flow import FlowAnalyzer
from cai.audit.parity import ParityAnalyzer
from cai.audit.rules import config_drift, remote_code, unused_modules

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
TOOL_NAME = "cai-audit"

__all__ = ["AuditResult", "Finding", "RULES", "audit", "cli_main", "render"]


@dataclass
class AuditResult:
    root: Path
    files: int
    unparsed: int
    findings: list[Finding]

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
            "by_category": {c: n for c in CATEGORIES if (n := sum(f.category == c for f in self.findings))},
            "by_rule": dict(sorted(Counter(f.rule for f in self.findings).items())),
            "exit_code": self.exit_code,
        }


def audit(paths: list[str] | str) -> AuditResult:
    """Audit the given files/directories as one codebase. Raises BadInputError on bad input."""
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    # Syntax trees hold millions of small objects and no reference cycles: the cyclic GC would
    # rescan them over and over (a 3,000-file codebase audits 3x slower with it on).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    # the analysis recurses along the syntax tree, whose depth ast.parse bounds by the recursion
    # limit itself: leave headroom for the analysis on top of the deepest parsable file.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        return _audit([str(p) for p in paths])
    finally:
        sys.setrecursionlimit(limit)
        if gc_was_enabled:
            gc.enable()


def _audit(paths: list[str]) -> AuditResult:
    cb = Codebase(paths)
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
                    "complete). Fix the syntax error so the audit covers it.",
                    col,
                )
            )
    findings += FlowAnalyzer(cb).run()
    findings += ParityAnalyzer(cb).run()
    findings += remote_code(cb)
    findings += config_drift(cb)
    findings += unused_modules(cb)
    unique = {(f.rule, f.path, f.line, f.column): f for f in findings}
    ordered = sorted(unique.values(), key=lambda f: f.sort_key)
    return AuditResult(cb.root, len(cb.files), sum(f.error is not None for f in cb.files), ordered)


# ---------------------------------------------------------------------- rendering
def render_text(result: AuditResult) -> str:
    lines = [
        f"{f.path}:{f.line}:{f.column}: {f.severity} [{f.category}/{f.rule}] {f.message}" for f in result.findings
    ]
    s = result.summary()
    if s["findings"]:
        lines.append(
            f"cai audit: {s['findings']} finding(s): {s['errors']} error(s), {s['warnings']} warning(s) "
            f"in {s['files']} file(s) under {s['root']}"
        )
    else:
        lines.append(f"cai audit: no findings in {s['files']} file(s) under {s['root']}")
    return "\n".join(lines)


def render_json(result: AuditResult) -> str:
    return json.dumps({"findings": [f.to_dict() for f in result.findings], "summary": result.summary()}, indent=2)


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
    results = [
        {
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
            "properties": {"category": f.category},
        }
        for f in result.findings
    ]
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
                "results": results,
            }
        ],
    }


def render(result: AuditResult, fmt: str = "text") -> str:
    if fmt == "json":
        return render_json(result)
    if fmt == "sarif":
        return json.dumps(sarif(result), indent=2)
    return render_text(result)


def cli_main(args) -> int:
    result = audit(list(args.paths))
    sys.stdout.write(render(result, getattr(args, "format", "text") or "text") + "\n")
    return result.exit_code
