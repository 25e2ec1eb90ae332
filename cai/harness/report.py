"""The run report: invariants first, then results (or a VOID banner), plots, provenance.

Built from invariant results and evaluation results computed in the same invocation:
`pytest suites/` passes its session's; `cai report RUN_DIR` verifies the run again (hashes,
manifest chain, content checks), keeps the evaluation tests' results recorded in
`reports/invariants.json`, and recomputes the scores from the verified eval artifact. No
stored result is trusted: `reports/results.json` is an output only.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from cai.pipeline.store import MANIFEST, read_manifest

REPORT_DIR = "reports"
STAGE_ORDER = ("candidates", "instructions", "responses", "pairs", "sft", "dpo", "eval")


def _stage_dirs(run_dir: Path) -> list[Path]:
    found = [run_dir / s for s in STAGE_ORDER if (run_dir / s / MANIFEST).is_file()]
    return found


def _manifest_or_none(directory: Path) -> dict[str, Any]:
    """The manifest for display, or {} when it is missing or unreadable (the verification
    reports why; the report must still be written)."""
    from cai.errors import CaiError

    try:
        return read_manifest(directory)
    except CaiError:
        return {}


def compute_results(run_dir: str | Path) -> dict[str, Any]:
    """Canonical scores and paired comparisons from the run's eval artifact, read through
    `read_artifact` (complete, hashes verified, certified), computed now."""
    from cai.errors import ConfigError
    from cai.invariants.check import run_info
    from cai.pipeline.compare import load_eval_set, summarize
    from cai.pipeline.store import read_artifact

    run_dir = Path(run_dir)
    cfg = run_info(run_dir)["config"]
    if cfg is None:
        raise ConfigError(f"{run_dir}: the run carries no config: its results cannot be scored")
    records = list(read_artifact(run_dir / "eval").records())
    wanted = {(r["eval_set"], r["key"]) for r in records}
    items = [it for name in cfg.eval.sets for it in load_eval_set(name) if (name, it["key"]) in wanted]
    return summarize(cfg, items, records)


def _plots(run_dir: Path, results: dict[str, Any] | None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / REPORT_DIR / "plots"
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    if results:
        for suite, models in results["scores"].items():
            names = list(models)
            acc = [models[m]["prompt_level_strict"] for m in names]
            err = [[a - models[m]["prompt_level_strict_ci"][0] for m, a in zip(names, acc)],
                   [models[m]["prompt_level_strict_ci"][1] - a for m, a in zip(names, acc)]]
            fig, ax = plt.subplots(figsize=(4, 3))
            ax.bar(names, acc, yerr=err, capsize=4, color="#4c72b0")
            ax.set_ylim(0, 1)
            ax.set_ylabel("prompt-level strict accuracy")
            ax.set_title(f"{suite} (95% bootstrap CI)")
            fig.tight_layout()
            made[f"accuracy_{suite}"] = out / f"accuracy_{suite}.png"
            fig.savefig(made[f"accuracy_{suite}"], dpi=100)
            plt.close(fig)
        primary = results["scores"].get("primary", {})
        if primary:
            ids = sorted({i for m in primary.values() for i in m["per_instruction"]})
            fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(ids))))
            width = 0.8 / max(len(primary), 1)
            for k, (model, s) in enumerate(primary.items()):
                vals = [s["per_instruction"].get(i, {}).get("strict", 0.0) for i in ids]
                ax.barh([y + k * width for y in range(len(ids))], vals, height=width, label=model)
            ax.set_yticks([y + 0.4 - width / 2 for y in range(len(ids))], ids, fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_xlabel("instruction-level strict accuracy")
            ax.legend(fontsize=7)
            fig.tight_layout()
            made["per_instruction"] = out / "per_instruction.png"
            fig.savefig(made["per_instruction"], dpi=100)
            plt.close(fig)
    margins = []
    for stage in ("instructions", "responses"):
        margins += _manifest_or_none(run_dir / stage).get("extra", {}).get("critic_margins", [])
    if margins:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.hist(margins, bins=20, color="#55a868")
        ax.set_xlabel("critic margin log p(A) - log p(B)")
        ax.set_ylabel("count")
        fig.tight_layout()
        made["critic_margins"] = out / "critic_margins.png"
        fig.savefig(made["critic_margins"], dpi=100)
        plt.close(fig)
    for stage in ("sft", "dpo"):
        curve = run_dir / stage / "loss_curve.png"
        if curve.is_file():
            made[f"loss_{stage}"] = curve
    return made


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def build_report(run_dir: str | Path, invariants: list[dict[str, Any]], results: dict[str, Any] | None) -> Path:
    """Write reports/report.md, report.html and results.json for a run from `invariants`
    (result dicts with `where`) and `results` (None: no scores this invocation; a stale
    results.json is removed, never shown). Return the markdown path."""
    from cai.pipeline.store import write_json_atomic

    run_dir = Path(run_dir)
    report_dir = run_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    failed = [r for r in invariants if r["status"] == "fail"]
    void = bool(failed)
    results_path = report_dir / "results.json"
    if results is not None and not void:
        write_json_atomic(results_path, results)
    else:
        results_path.unlink(missing_ok=True)
    plots = _plots(run_dir, None if void else results)

    md = [f"# cai run report: {run_dir.name}", ""]
    if void:
        md += ["> **VOID** — error-severity invariants failed; no result of this run counts:", ""]
        md += [f"> - `{r['name']}` ({r['where']}): {r['evidence']}" for r in failed] + [""]
    md += ["## Invariants", "", "| where | invariant | severity | status | evidence |", "|---|---|---|---|---|"]
    for r in invariants:
        evidence = str(r["evidence"]).replace("|", "\\|").replace("\n", " ")[:200]
        md.append(f"| {r['where']} | `{r['name']}` | {r['severity']} | **{r['status']}** | {evidence} |")
    md.append("")
    if not void and results:
        md += ["## Results", "", f"Metric: {results['metric']}; N = {results['n_items']} items.", "",
               "| suite | model | prompt strict | 95% CI | instr strict | prompt loose | instr loose | mean chars |",
               "|---|---|---|---|---|---|---|---|"]
        for suite, models in results["scores"].items():
            label = {"primary": "primary (training format)", "raw_probe": "raw-instruction probe",
                     "fewshot_baseline": "few-shot base baseline"}.get(suite, suite)
            for model, s in models.items():
                lo, hi = s["prompt_level_strict_ci"]
                md.append(f"| {label} | {model} | {s['prompt_level_strict']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                          f"{s['instruction_level_strict']:.3f} | {s['prompt_level_loose']:.3f} | "
                          f"{s['instruction_level_loose']:.3f} | {s['mean_response_chars']} |")
        md += ["", "### Paired comparisons (prompt-level strict)", "",
               "| suite | a → b | diff (b − a) | 95% paired bootstrap CI | McNemar exact p | a only | b only | N |",
               "|---|---|---|---|---|---|---|---|"]
        for c in results["comparisons"]:
            md.append(f"| {c['suite']} | {c['a']} → {c['b']} | {c['diff_b_minus_a']:+.3f} | {_fmt_ci(c['ci95'])} | "
                      f"{c['mcnemar_p']:.3g} | {c['a_only_pass']} | {c['b_only_pass']} | {c['n']} |")
        lm_eval = (read_manifest(run_dir / "eval").get("extra", {}).get("lm_eval")
                   if (run_dir / "eval" / MANIFEST).is_file() else None)
        if lm_eval:
            md += ["", "### lm-eval second opinion (HFLM, cai's YAML tasks, no chat template)", "",
                   "| model | task | metric | value |", "|---|---|---|---|"]
            for model, rep in lm_eval.items():
                for task, t in rep["tasks"].items():
                    for metric, value in sorted(t["metrics"].items()):
                        if isinstance(value, (int, float)):
                            md.append(f"| {model} | {task} | {metric} | {value:.3f} |")
        md += ["", "### Warnings", ""] + ([f"- {w}" for w in results["warnings"]] or ["- none"]) + [""]
        md += ["### Discordant items", "", "Every item where two models disagree, with the check that decided:", ""]
        for c in results["comparisons"]:
            if c["suite"] != "primary" or not c["discordant"]:
                continue
            md += [f"#### {c['a']} vs {c['b']} ({len(c['discordant'])} items)", ""]
            for d in c["discordant"]:
                md += [f"- **{d['key']}** {d['instruction']!r} — deciding: {', '.join(d['deciding_checks'])}; "
                       f"{c['a']} {'pass' if d[c['a'] + '_pass'] else 'fail'}: {d[c['a'] + '_response'][:160]!r}; "
                       f"{c['b']} {'pass' if d[c['b'] + '_pass'] else 'fail'}: {d[c['b'] + '_response'][:160]!r}"]
            md.append("")
    elif not void:
        md += ["## Results", "", "No evaluation results yet (run `pytest suites/ --cai-run RUN_DIR`).", ""]
    md += ["## Plots", ""] + [f"![{name}]({p.relative_to(run_dir / REPORT_DIR) if p.is_relative_to(run_dir / REPORT_DIR) else p})"
                              for name, p in plots.items()] + [""]
    md += ["## Provenance", ""]
    for d in _stage_dirs(run_dir):
        m = _manifest_or_none(d)
        if not m:
            md.append(f"- `{d.name}`: manifest unreadable")
            continue
        model = m.get("model") or {}
        md.append(f"- `{d.name}`: certified={m.get('certified')}, records={(m.get('outputs') or {}).get('records', '-')}, "
                  f"config {str(m.get('config_hash', ''))[:12]}, model {model.get('source', '-')} "
                  f"({model.get('quantization', '-')}), git {(m.get('environment') or {}).get('git_commit') or '-'}")
    md.append("")
    md_path = report_dir / "report.md"
    md_path.write_text("\n".join(md))
    _write_html(report_dir / "report.html", "\n".join(md), plots)
    return md_path


def _write_html(path: Path, markdown: str, plots: dict[str, Path]) -> None:
    """A self-contained HTML page: the markdown as preformatted text and the plots inline."""
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, p in plots.items())
    void = "VOID" in markdown.split("## Invariants")[0]
    banner = '<p style="background:#c00;color:#fff;padding:1em;font-size:1.5em">VOID — invariants failed</p>' if void else ""
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>cai report</title>{banner}"
                    f"<pre style='white-space:pre-wrap'>{html.escape(markdown)}</pre>{images}")


def rebuild(run_dir: str | Path) -> tuple[Path, bool]:
    """`cai report`: verify the run now, keep the evaluation tests' recorded results, score
    the verified eval artifact, and write invariants.json and the report. Returns (report
    path, void)."""
    from cai.errors import CaiError
    from cai.harness.session import REPORT_NAME, CaiSession
    from cai.invariants.base import Result, Severity, Status
    from cai.invariants.check import require_run_dir
    from cai.pipeline.store import read_json_object

    run_dir = require_run_dir(run_dir)
    session = CaiSession(run_dir)
    session.run_results()
    stored = run_dir / REPORT_DIR / REPORT_NAME
    try:
        tests = [r for r in read_json_object(stored).get("results", []) if r.get("source") != "run"]
        for r in tests:
            session.record(Result(r["name"], Status(r["status"]), Severity(r["severity"]), str(r["evidence"])),
                           subject=r.get("subject", ""), source=r["source"])
    except (CaiError, KeyError, TypeError, ValueError, AttributeError) as err:
        why = "missing: run `pytest suites/ --cai-run RUN` first" if not stored.is_file() else \
            f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        session.record(Result("evaluation_recorded", Status.FAIL, Severity.ERROR, f"{stored}: {why}"))
    results = None
    if not session.void:
        try:
            results = compute_results(run_dir)
        except CaiError as err:
            session.record(Result("results_computed", Status.FAIL, Severity.ERROR, str(err).splitlines()[0]))
    session.write_report(None)
    path = build_report(run_dir, [e.to_json() for e in session.entries], results)
    return path, session.void


def cli_main(args) -> int:
    path, void = rebuild(args.run_dir)
    print(f"report ({'VOID' if void else 'VALID'}): {path}")
    return 1 if void else 0
