"""The run report: the verdict line, results (or a VOID banner), warnings, discordant items,
plots, then the invariants (failures and warnings first) and provenance.

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
            ax.set_title(f"{suite} (95% cluster bootstrap CI, N = {next(iter(models.values()))['n']})")
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
            n_per = {i: next(s["per_instruction"][i]["n"] for s in primary.values() if i in s["per_instruction"]) for i in ids}
            ax.set_yticks([y + 0.4 - width / 2 for y in range(len(ids))], [f"{i} (N={n_per[i]})" for i in ids], fontsize=7)
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


ALPHA = 0.05


def established(comparison: dict) -> bool:
    """A difference the report may state: Holm-adjusted McNemar p below ALPHA and the
    cluster CI excluding 0 (a point estimate alone is never called a win)."""
    lo, hi = comparison["ci95"]
    return comparison["mcnemar_p_holm"] < ALPHA and (lo > 0 or hi < 0)


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _acc_ci(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _clip(text: Any, limit: int = 300) -> str:
    """One table cell: pipes escaped, newlines flattened, cut at a word boundary (never
    mid-word) with an ellipsis when longer than `limit`."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    if len(flat) <= limit:
        return flat
    cut = flat[:limit]
    return (cut[:cut.rfind(" ")] if " " in cut else cut).rstrip(",;:") + " …"


SUITE_LABEL = {"primary": "primary (training format)", "raw_probe": "raw-instruction probe",
               "fewshot_baseline": "few-shot base baseline"}


def _verdict_line(run_dir: Path, invariants: list[dict[str, Any]], results: dict[str, Any] | None) -> str:
    """The report's first line: VALID or VOID, and why, in one sentence."""
    failed = [r for r in invariants if r["status"] == "fail"]
    if failed:
        names = ", ".join(f"{r['name']} ({r['where']})" for r in failed[:5]) + (" …" if len(failed) > 5 else "")
        return (f"**VOID** — run `{run_dir.name}`: {len(failed)} error-severity invariant(s) failed "
                f"({names}); no result of this run counts.")
    warned = sum(r["status"] == "warn" for r in invariants)
    primary = (results or {}).get("scores", {}).get("primary", {})
    scored = ("primary prompt-level strict " + ", ".join(f"{m} {s['prompt_level_strict']:.3f}" for m, s in primary.items())
              + f" (N = {next(iter(primary.values()))['n']})") if primary else (
        "results below" if results else "no evaluation results yet")
    return (f"**VALID** — run `{run_dir.name}`: all {len(invariants)} invariant(s) passed or warned "
            f"({warned} warning(s)); {scored}.")


def _model_labels(invariants: list[dict[str, Any]], lm_eval: dict[str, Any]) -> list[str]:
    """Per invariant row, the model it is about. The eval stage records each model's lm-eval
    invariants in `extra.lm_eval` model by model and appends them to its manifest in that
    order, so the k-th identical row belongs to the k-th model that recorded it."""
    queue = [(model, f"{d['name']}[recorded]", str(d.get("evidence", "")))
             for model, rep in lm_eval.items() for d in rep.get("invariants", [])]
    labels = []
    for r in invariants:
        parts = r["where"].split("/", 1)
        label = parts[1] if len(parts) > 1 else ""
        if parts[0] == "eval" and not label:
            hit = next((q for q in queue if q[1:] == (r["name"], str(r["evidence"]))), None)
            if hit is not None:
                queue.remove(hit)
                label = hit[0]
        labels.append(label)
    return labels


def _manifest_warnings(run_dir: Path, invariants: list[dict[str, Any]]) -> list[str]:
    """Warnings the stages recorded in their manifests (e.g. DPO truncation) that the
    invariant list passed in does not already carry."""
    seen = {(r["where"].split("/")[0], r["name"].removesuffix("[recorded]")) for r in invariants}
    out = []
    for d in _stage_dirs(run_dir):
        for inv in _manifest_or_none(d).get("invariants", []):
            if isinstance(inv, dict) and inv.get("status") == "warn" and (d.name, inv.get("name")) not in seen:
                out.append(f"{d.name}: `{inv.get('name')}` — {_clip(inv.get('evidence', ''))}")
    return out


def _results_section(results: dict[str, Any]) -> list[str]:
    md = ["## Results", "",
          f"Metric: {results['metric']}; N = {results['n_items']} items in {results['clustering']['n_clusters']} "
          f"clusters. CIs are 95% percentile bootstraps resampling clusters ({results['clustering']['by']}).", "",
          "| suite | model | N | clusters | prompt strict [95% CI] | instr strict [95% CI] (N instr) | prompt loose "
          "| instr loose | hit token cap | empty | mean chars |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for suite, models in results["scores"].items():
        for model, s in models.items():
            md.append(f"| {SUITE_LABEL.get(suite, suite)} | {model} | {s['n']} | {s['n_clusters']} | "
                      f"{_acc_ci(s['prompt_level_strict'], s['prompt_level_strict_ci'])} | "
                      f"{_acc_ci(s['instruction_level_strict'], s['instruction_level_strict_ci'])} ({s['n_instructions']}) | "
                      f"{s['prompt_level_loose']:.3f} | {s['instruction_level_loose']:.3f} | "
                      f"{s['n_truncated']} ({s['truncated_rate']:.0%}) | {s['n_empty']} ({s['empty_rate']:.0%}) | "
                      f"{s['mean_response_chars']} |")
    md += ["", "### Paired comparisons (prompt-level strict)", "",
           f"{results['multiplicity']}: the adjusted p is shown beside the raw one; read the adjusted p.", "",
           "| comparison | a → b | diff (b − a) | 95% cluster CI | McNemar p | Holm p | a only | b only | N |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        md.append(f"| {c['suite']} | {c['a']} → {c['b']} | {c['diff_b_minus_a']:+.3f} | {_fmt_ci(c['ci95'])} | "
                  f"{c['mcnemar_p']:.3g} | {c['mcnemar_p_holm']:.3g} | {c['a_only_pass']} | {c['b_only_pass']} | {c['n']} |")
    md += [""] + [f"- {c['sentence']}" for c in results["comparisons"] if c["kind"] == "training"] + [""]
    prompting = [c for c in results["comparisons"] if c["kind"] == "prompting"]
    md += ["### Did training beat prompting?", ""]
    if prompting:
        md += [f"- {c['sentence']}" for c in prompting]
        beaten = [c["b"] for c in prompting if c["diff_b_minus_a"] < 0 and established(c)]
        below = [c["b"] for c in prompting if c["diff_b_minus_a"] < 0 and not established(c)]
        if beaten:
            md += ["", f"**Few-shot base beats {' and '.join(beaten)}** (Holm-adjusted p < {ALPHA}, cluster CI "
                       "excluding 0): prompting alone did better than training."]
        if below:
            md += ["", f"Few-shot base scores above {' and '.join(below)}, but no difference is established at this N: "
                       "training has not been shown to beat prompting, nor prompting training."]
        if not beaten and not below:
            md += ["", "No trained model scores below the few-shot base."]
    else:
        md.append("Not measured: the run has no few-shot baseline suite next to the primary suite.")
    md.append("")
    primary = results["scores"].get("primary", {})
    if primary:
        ids = sorted({i for s in primary.values() for i in s["per_instruction"]})
        names = list(primary)
        md += ["### Per instruction type (primary, instruction-level strict, 95% CI)", "",
               "Each type's CI resamples the clusters of the items carrying it; a type drawn from one cluster "
               "(marked †) resamples its items, which holds its template fixed.", "",
               "| instruction | N | clusters | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for iid in ids:
            cells = [primary[m]["per_instruction"].get(iid) for m in names]
            first = next(c for c in cells if c)
            mark = " †" if first["n_clusters"] < 2 else ""
            md.append(f"| {iid} | {first['n']} | {first['n_clusters']}{mark} | "
                      + " | ".join(_acc_ci(c["strict"], c["strict_ci"]) if c else "-" for c in cells) + " |")
        md.append("")
    return md


def _lm_eval_section(lm_eval: dict[str, Any], results: dict[str, Any]) -> list[str]:
    md = ["### lm-eval second opinion (HFLM, cai's YAML tasks, no chat template)", "",
          "| model | task | N | metric | value |", "|---|---|---|---|---|"]
    for model, rep in lm_eval.items():
        for task, t in rep["tasks"].items():
            for metric, value in sorted(t["metrics"].items()):
                if isinstance(value, (int, float)):
                    md.append(f"| {model} | {task} | {t.get('n', '-')} | {metric} | {value:.3f} |")
    lm = {m: rep["tasks"].get("cai_stage1_gen", {}) for m, rep in lm_eval.items()}
    primary = results["scores"].get("primary", {})
    pairs = [(a, b) for a, b in (("base", "sft"), ("base", "dpo"))
             if all("prompt_level_strict_acc" in lm.get(m, {}).get("metrics", {}) and m in primary for m in (a, b))]
    notes = []
    for a, b in pairs:
        lm_diff = lm[b]["metrics"]["prompt_level_strict_acc"] - lm[a]["metrics"]["prompt_level_strict_acc"]
        cai_diff = primary[b]["prompt_level_strict"] - primary[a]["prompt_level_strict"]
        signs = (lm_diff > 0) - (lm_diff < 0), (cai_diff > 0) - (cai_diff < 0)
        how = "same direction" if signs[0] == signs[1] else ("OPPOSITE direction" if signs[0] * signs[1] < 0
                                                             else "different direction")
        notes.append(f"{a} → {b}: lm-eval {lm_diff:+.3f} on {lm[a].get('n', '?')} items, cai {cai_diff:+.3f} "
                     f"on {primary[a]['n']} ({how})")
    if notes:
        md += ["", "Against the canonical metric (prompt-level strict, primary suite): " + "; ".join(notes) + ". "
               "lm-eval scores a smaller slice, so it is a check on the pipeline, not a second estimate."]
    return md + [""]


def _invariants_section(invariants: list[dict[str, Any]], lm_eval: dict[str, Any]) -> list[str]:
    """Failures and warnings first; then passes grouped by artifact (stage), each row
    labelled with the suite/model it is about."""
    labels = _model_labels(invariants, lm_eval)
    rows = list(zip(invariants, labels))

    def line(r, label):
        return f"| {r['where'].split('/')[0]} | {label or '-'} | `{r['name']}` | {r['severity']} | **{r['status']}** | {_clip(r['evidence'])} |"

    head = ["| artifact | suite/model | invariant | severity | status | evidence |", "|---|---|---|---|---|---|"]
    md = ["## Invariants", ""]
    flagged = [(r, lab) for r, lab in rows if r["status"] != "pass"]
    md += ["### Failures and warnings", ""] + ((head + [line(r, lab) for r, lab in flagged]) if flagged else ["- none"]) + [""]
    groups: dict[str, list] = {}
    for r, lab in rows:
        if r["status"] == "pass":
            groups.setdefault(r["where"].split("/")[0], []).append((r, lab))
    order = {name: i for i, name in enumerate(("run",) + STAGE_ORDER)}
    for group in sorted(groups, key=lambda g: (order.get(g, len(order)), g)):
        md += [f"### {group}: {len(groups[group])} passed", ""] + head + [line(r, lab) for r, lab in groups[group]] + [""]
    return md


def _data_and_time_section(run_dir: Path) -> list[str]:
    """What the training data is made of and where the wall time went, from the manifests:
    a reviewer's first questions after the headline number."""
    rows, notes = [], []
    for d in _stage_dirs(run_dir):
        m = _manifest_or_none(d)
        if not m:
            continue
        seconds = (m.get("timings") or {}).get("wall_seconds")
        rows.append(f"| {d.name} | {(m.get('outputs') or {}).get('records', '-')} | "
                    f"{'-' if seconds is None else f'{seconds:.0f}'} |")
        extra = m.get("extra") or {}
        if d.name == "instructions":
            critic, added = extra.get("critic") or {}, (extra.get("constraints") or {}).get("added", 0)
            if critic.get("enabled"):
                notes.append(f"instructions: the critic kept {critic.get('n_kept')} of {critic.get('n_candidates')} "
                             f"candidates (margin >= {critic.get('threshold')}); {added} were given a verifiable "
                             "IFEval constraint")
        if d.name == "responses":
            v = (extra.get("responses") or {}).get("verifier") or {}
            if v.get("gated"):
                notes.append(f"responses: {v['gated']} chosen answers gated by their constraint's checker; "
                             f"{v['chosen_passes']} pass it, {v['none_passes']} had no passing candidate "
                             "(kept for SFT, no preference pair)")
    if not rows:
        return []
    total = sum(float(r.split("|")[3]) for r in rows if r.split("|")[3].strip() != "-")
    return (["## Data and time", "", "| stage | records | wall seconds |", "|---|---|---|"] + rows
            + [f"| **total** | | **{total:.0f}** |", ""] + [f"- {n}" for n in notes] + ([""] if notes else []))


def build_report(run_dir: str | Path, invariants: list[dict[str, Any]], results: dict[str, Any] | None) -> Path:
    """Write reports/report.md, report.html and results.json for a run from `invariants`
    (result dicts with `where`) and `results` (None: no scores this invocation; a stale
    results.json is removed, never shown). The report leads with the verdict and the
    results; the invariants that decide the verdict follow. Return the markdown path."""
    import os

    from cai.pipeline.compare import RESULTS_WARNING_ROWS
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
    lm_eval = _manifest_or_none(run_dir / "eval").get("extra", {}).get("lm_eval") or {}

    md = [_verdict_line(run_dir, invariants, results), "", f"# cai run report: {run_dir.name}", ""]
    if void:
        md += ["> **VOID** — error-severity invariants failed; no result of this run counts:", ""]
        md += [f"> - `{r['name']}` ({r['where']}): {_clip(r['evidence'], 500)}" for r in failed] + [""]
    elif results:
        md += _results_section(results)
        if lm_eval:
            md += _lm_eval_section(lm_eval, results)
    else:
        md += ["## Results", "", "No evaluation results yet (run `pytest suites/ --cai-run RUN_DIR`).", ""]
    shown = bool(results) and not void
    warnings = list(results["warnings"]) if shown else []
    warnings += [f"{r['where']}: `{r['name']}` — {_clip(r['evidence'])}" for r in invariants if r["status"] == "warn"
                 and not (shown and r["name"].removesuffix("[recorded]") in RESULTS_WARNING_ROWS)]
    warnings += _manifest_warnings(run_dir, invariants)
    md += ["## Warnings", ""] + ([f"- {w}" for w in warnings] or ["- none"]) + [""]
    if results and not void:
        md += ["## Discordant items", "", "Every item where two compared models disagree (primary suite and "
               "training vs prompting), with the check that decided; `[cut]` marks a response that hit the "
               "token cap or is empty:", ""]
        sets = {d["eval_set"] for c in results["comparisons"] for d in c["discordant"]}
        for c in results["comparisons"]:
            if c["b_suite"] != "primary" or not c["discordant"]:
                continue
            md += [f"### {c['suite']}: {c['a']} vs {c['b']} ({len(c['discordant'])} items, "
                   f"{c['discordant_truncated_or_empty']} with the failing side cut)", ""]
            for d in c["discordant"]:
                cut = " [cut]" if d["loser_truncated_or_empty"] else ""
                item = d["key"] if len(sets) == 1 else f"{d['eval_set']}:{d['key']}"
                md += [f"- **{item}** {_clip(d['instruction'], 200)!r} — deciding: {', '.join(d['deciding_checks'])}{cut}; "
                       f"{c['a']} {'pass' if d[c['a'] + '_pass'] else 'fail'}: {_clip(d[c['a'] + '_response'], 160)!r}; "
                       f"{c['b']} {'pass' if d[c['b'] + '_pass'] else 'fail'}: {_clip(d[c['b'] + '_response'], 160)!r}"]
            md.append("")
    md += _data_and_time_section(run_dir)
    md += ["## Plots", ""] + [f"![{name}]({Path(os.path.relpath(p, report_dir)).as_posix()})" for name, p in plots.items()] + [""]
    md += _invariants_section(invariants, lm_eval)
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
    _write_html(report_dir / "report.html", md, plots, void)
    return md_path


def _write_html(path: Path, md: list[str], plots: dict[str, Path], void: bool) -> None:
    """A self-contained HTML page: the markdown as preformatted text with the passing
    invariants collapsed, and the plots inline (so nothing depends on relative paths)."""
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, p in plots.items())
    text = "\n".join(md)
    head, _, rest = text.partition("\n## Invariants\n")
    inv, _, tail = rest.partition("\n## Provenance\n")
    blocks = inv.split("\n### ")
    body = f"<pre style='white-space:pre-wrap'>{html.escape(head)}</pre>{images}<h2>Invariants</h2>"
    for block in blocks[1:]:
        title, _, table = block.partition("\n")
        open_ = "" if title.endswith("passed") else " open"
        body += (f"<details{open_}><summary>{html.escape(title)}</summary>"
                 f"<pre style='white-space:pre-wrap'>{html.escape(table)}</pre></details>")
    body += f"<h2>Provenance</h2><pre style='white-space:pre-wrap'>{html.escape(tail)}</pre>"
    banner = '<p style="background:#c00;color:#fff;padding:1em;font-size:1.5em">VOID — invariants failed</p>' if void else ""
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>cai report</title>{banner}{body}")


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
        recorded = read_json_object(stored)
        tests = [r for r in recorded.get("results", []) if r.get("source") != "run"]
        if not tests:
            raise ValueError("it holds no result of the evaluation tests")
        if recorded.get("artifacts") != session.artifact_hashes():
            raise ValueError("the run's manifests changed since `pytest suites/` recorded it; run it again")
        for r in tests:
            session.record(Result(r["name"], Status(r["status"]), Severity(r["severity"]), str(r["evidence"])),
                           subject=r.get("subject", ""), source=r["source"])
    except (CaiError, KeyError, TypeError, ValueError, AttributeError) as err:
        why = "missing: run `pytest suites/ --cai-run RUN` first" if not stored.is_file() else \
            f"not usable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
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
