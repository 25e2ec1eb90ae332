"""`cai compare A B`: paired statistics and artifact diagnostics for per-item verdicts
produced anywhere, so a headline gain from another pipeline can be checked for the
artifacts cai's own reports look for (a length heuristic, truncation, empty answers).

A and B are JSONL files, one item a line, joined by `key`. A line carries either a verdict
(`passed`: true/false, plus `response`, `instruction`, `stop_reason` where available) or,
like cai's eval records, a `response` to score: such a file is scored first by the
canonical scorer (`cai score`'s code path) against the IFEval-schema prompts of `--items`
(default: the shipped stage1 set). The numbers come from the same functions as a run's
report (`cai.pipeline.compare`: `verdict_scores`, `paired_comparison`, `model_warnings`,
`comparison_warnings`); nothing here computes a statistic.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cai.errors import BadInputError

N_RESAMPLES = 10000
SEED = 0
NAMES = ("A", "B")


def add_arguments(parser) -> None:
    parser.add_argument("a", metavar="A", help="JSONL: key, passed (or response to score) [, response, instruction, stop_reason]")
    parser.add_argument("b", metavar="B", help="JSONL of the other system, same keys")
    parser.add_argument("--items", help="IFEval-schema prompts (JSONL): clusters for the bootstrap and the prompts "
                                        "to score responses against (default for scoring: the shipped stage1 set)")
    parser.add_argument("--format", choices=["text", "json", "md"], default="text")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when an artifact diagnostic fires or cannot run for lack of a field")


def _record_problem(obj: dict) -> str | None:
    if "key" not in obj:
        return "missing field 'key'"
    if not isinstance(obj["key"], (int, str)) or isinstance(obj["key"], bool):
        return "key must be an integer or a string"
    if "passed" in obj and not isinstance(obj["passed"], bool):
        return f"'passed' must be true or false, got {json.dumps(obj['passed'])}"
    if "passed" not in obj and "response" not in obj:
        return "needs 'passed' (a verdict) or 'response' (to score)"
    for field in ("response", "instruction"):
        if field in obj and not isinstance(obj[field], str):
            return f"'{field}' must be a string"
    if obj.get("stop_reason") is not None and not isinstance(obj["stop_reason"], str):
        return "'stop_reason' must be a string or null"
    return None


def read_records(path: str) -> dict[str, tuple[int, dict]]:
    """key -> (line, record) of one system's file, every line checked: a verdict file or a
    file of responses to score, never both; keys unique (one model per file)."""
    from cai.pipeline.store import numbered_jsonl

    rows = numbered_jsonl(path, error=BadInputError)
    if not rows:
        raise BadInputError(f"{path}: no records")
    out: dict[str, tuple[int, dict]] = {}
    for lineno, obj in rows:
        problem = _record_problem(obj)
        if problem:
            raise BadInputError(f"{path}:{lineno}: {problem}")
        if ("passed" in obj) != ("passed" in rows[0][1]):
            raise BadInputError(f"{path}:{lineno}: {'has' if 'passed' in obj else 'lacks'} 'passed', unlike line "
                                f"{rows[0][0]}: a file holds verdicts or responses to score, not both")
        key = str(obj["key"])
        if key in out:
            raise BadInputError(f"{path}:{lineno}: duplicate key {obj['key']!r} (first on line {out[key][0]}); "
                                "give one model's records per file")
        out[key] = (lineno, obj)
    return out


def _verdicts(path: str, records: dict[str, tuple[int, dict]], items: dict[str, dict] | None) -> dict[str, dict]:
    """key -> verdict. Responses are scored by the canonical scorer; clusters and
    instruction ids come from the items where given, else each item is its own cluster."""
    from cai.pipeline.compare import cluster_of
    from cai.pipeline.evaluate import score

    if items is not None:
        for key, (lineno, _) in records.items():
            if key not in items:
                raise BadInputError(f"{path}:{lineno}: key {records[key][1]['key']!r} is not among the items")
    scored = {}
    if "passed" not in next(iter(records.values()))[1]:
        report = score([items[k] for k in records], [{"key": items[k]["key"], "response": r["response"]}
                                                    for k, (_, r) in records.items()])
        scored = {str(it["key"]): it for it in report.items}
    out = {}
    for key, (_, r) in records.items():
        item = items[key] if items is not None else None
        v = {**scored.get(key, {}), "key": r["key"], "eval_set": r.get("eval_set"),
             "passed": r["passed"] if key not in scored else scored[key]["prompt_level_strict"],
             "cluster": cluster_of(item) if item else key,
             "instruction": r.get("instruction", item.get("instruction", item["prompt"]) if item else None)}
        if item and "instruction_id_list" not in v:
            v["instruction_id_list"] = list(item["instruction_id_list"])
        v.update({f: r[f] for f in ("response", "stop_reason") if isinstance(r.get(f), str)})
        out[key] = v
    return out


def _not_run(label: str, s: dict[str, Any]) -> list[str]:
    out = []
    if s["truncated_rate"] is None:
        out.append(f"truncation rate ({label}): no 'stop_reason' on every record")
    if s["length_rule"] is None:
        out.append(f"length rule, empty/refusal rule, length confound, empty rate ({label}): no 'response' on every record")
    return out


def compare_files(a: str, b: str, items_path: str | None) -> dict[str, Any]:
    """Everything `cai compare` reports, as one JSON-ready dict."""
    from cai.pipeline.compare import (CLUSTERING, comparison_warnings, eval_set_path, model_warnings,
                                      paired_comparison, sentence, verdict_scores)
    from cai.pipeline.evaluate import load_ifeval_prompts
    from cai.pipeline.stats import holm

    records = {name: read_records(path) for name, path in zip(NAMES, (a, b))}
    only = [sorted(set(records[x]) - set(records[y])) for x, y in (NAMES, NAMES[::-1])]
    if any(only):
        shown = "; ".join(f"{len(o)} only in {path} (e.g. {', '.join(o[:3])})" for o, path in zip(only, (a, b)) if o)
        raise BadInputError(f"{a} and {b} do not cover the same keys: {shown}")
    needs_scoring = any("passed" not in next(iter(r.values()))[1] for r in records.values())
    source = items_path or (str(eval_set_path("stage1")) if needs_scoring else None)
    items = {str(it["key"]): it for it in load_ifeval_prompts(source)} if source else None
    verdicts = {name: _verdicts(path, records[name], items) for name, path in zip(NAMES, (a, b))}
    scores = {name: verdict_scores(list(verdicts[name].values()), N_RESAMPLES, SEED) for name in NAMES}
    c = paired_comparison(verdicts["A"], verdicts["B"], NAMES, N_RESAMPLES, SEED)
    c["mcnemar_p_holm"] = holm([c["mcnemar_p"]])[0]
    c["sentence"] = sentence("B vs A:", "B", c["diff_b_minus_a"], *c["ci95"], c["mcnemar_p_holm"])
    warnings = model_warnings("A", scores["A"]) + model_warnings("B", scores["B"]) + comparison_warnings("A vs B", c)
    not_run = _not_run("A", scores["A"]) + _not_run("B", scores["B"])
    how = {name: ("verdicts as given ('passed')" if "passed" in next(iter(records[name].values()))[1]
                  else f"scored by the canonical scorer (IFEval checkers) against {source}") for name in NAMES}
    return {"a": a, "b": b, "how": how,
            "clustering": {"by": f"{CLUSTERING}, from {source}" if items else "none: every item is its own cluster "
                           "(--items gives the template clusters)", "n_clusters": c["n_clusters"]},
            "bootstrap": {"n_resamples": N_RESAMPLES, "seed": SEED},
            "multiplicity": "one McNemar test (Holm over one test is the raw p)",
            "scores": scores, "comparison": c, "warnings": warnings, "not_run": not_run}


def _acc(s: dict[str, Any]) -> str:
    lo, hi = s["prompt_level_strict_ci"]
    text = f"{s['prompt_level_strict']:.3f} [{lo:.3f}, {hi:.3f}] (N = {s['n']}, {s['n_clusters']} clusters)"
    if "instruction_level_strict" in s:
        ilo, ihi = s["instruction_level_strict_ci"]
        text += f"; instruction level {s['instruction_level_strict']:.3f} [{ilo:.3f}, {ihi:.3f}] (N = {s['n_instructions']})"
    return text


def _diagnostics(s: dict[str, Any]) -> str:
    parts = []
    for key, what in (("length_rule", "length rule"), ("refusal_rule", "empty/refusal rule")):
        r = s[key]
        if r is not None and r["accuracy"] is None:
            parts.append(f"{what}: inconclusive (one verdict class, one feature value or N < 10; N = {r['n']})")
        elif r is not None:
            parts.append(f"{what}: {r['rule']} matches {r['accuracy']} vs majority {r['majority']} (N = {r['n']})")
    if s["length_confound"] is not None:
        parts.append(f"corr(pass, chars) = {s['length_confound']['corr']}")
    for key in ("truncated", "empty"):
        if s[f"n_{key}"] is not None:
            parts.append(f"{key} {s[f'n_{key}']}/{s['n']}")
    return "; ".join(parts) or "none (no response or stop_reason fields)"


def render(result: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2, ensure_ascii=False, default=str)
    c = result["comparison"]
    lines = [f"A = {result['a']}: {result['how']['A']}", f"B = {result['b']}: {result['how']['B']}",
             f"clusters: {result['clustering']['by']} ({result['clustering']['n_clusters']})"]
    lines += [f"{name}: prompt level {_acc(result['scores'][name])}" for name in NAMES]
    lines += [c["sentence"], f"discordant: {c['a_only_pass']} pass only in A, {c['b_only_pass']} only in B; "
              f"{c['discordant_truncated_or_empty']} with the failing side truncated or empty"]
    lines += [f"diagnostics {name}: {_diagnostics(result['scores'][name])}" for name in NAMES]
    warnings = [f"warning: {w}" for w in result["warnings"]] + [f"not run: {w}" for w in result["not_run"]]
    if fmt == "text":
        return "\n".join(lines + (warnings or ["no artifact diagnostic fired"]))
    md = ["# cai compare", "", f"- A = `{result['a']}`: {result['how']['A']}", f"- B = `{result['b']}`: {result['how']['B']}",
          f"- clusters: {result['clustering']['by']} ({result['clustering']['n_clusters']})", "",
          "| system | N | clusters | prompt-level [95% CI] |", "|---|---|---|---|"]
    for name in NAMES:
        s = result["scores"][name]
        md.append(f"| {name} | {s['n']} | {s['n_clusters']} | {s['prompt_level_strict']:.3f} "
                  f"[{s['prompt_level_strict_ci'][0]:.3f}, {s['prompt_level_strict_ci'][1]:.3f}] |")
    md += ["", "| diff (B − A) | 95% cluster CI | McNemar p | Holm p | A only | B only | N |", "|---|---|---|---|---|---|---|",
           f"| {c['diff_b_minus_a']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['mcnemar_p']:.3g} | "
           f"{c['mcnemar_p_holm']:.3g} | {c['a_only_pass']} | {c['b_only_pass']} | {c['n']} |", "", c["sentence"], "",
           "## Diagnostics", ""] + [f"- {name}: {_diagnostics(result['scores'][name])}" for name in NAMES]
    md += ["", "## Warnings", ""] + ([f"- {w}" for w in warnings] or ["- none"])
    return "\n".join(md)


def cli_main(args) -> int:
    """Exit 0; 1 under --strict when an artifact diagnostic fired or could not run; bad
    input raises BadInputError (exit 2 at the CLI boundary)."""
    result = compare_files(args.a, args.b, args.items)
    sys.stdout.write(render(result, args.format) + "\n")
    return 1 if args.strict and (result["warnings"] or result["not_run"]) else 0
