"""Responses of base, SFT and DPO on identical prompts, for the evaluation suites.

One base model is resident; the SFT and DPO adapters attach to it and are switched in
place ("base" = adapters disabled). Every model of a suite gets the same prompt bytes,
rendered by `formats.py`, and the same generation settings; the manifest records both.

Suites:
- `primary`: the run's training format (the comparison that counts).
- `raw_probe`: the bare instruction, a labelled generalisation probe.
- `fewshot_baseline`: the base model with a few solved examples in the training format
  (URIAL-style): did training beat prompting?
"""

from __future__ import annotations

from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from cai.config import RunConfig
from cai.errors import BadInputError
from cai.invariants.parity import prompts_sha256
from cai.pipeline import formats
from cai.pipeline.store import ArtifactWriter, read_jsonl

SUITE_MODELS = {"primary": ("base", "sft", "dpo"), "raw_probe": ("base", "sft", "dpo"), "fewshot_baseline": ("base",)}
FEWSHOT_EXAMPLES = 3


def load_eval_set(name: str, limit: int | None = None) -> list[dict[str, Any]]:
    """`stage1` (shipped with cai) or a JSONL path in the IFEval schema. `limit` takes a
    deterministic round-robin over instruction types, so a small slice still covers them."""
    if name == "stage1":
        path = Path(str(resources.files("cai") / "data" / "eval" / "stage1_eval.jsonl"))
    else:
        path = Path(name)
    items = read_jsonl(path)
    for lineno, item in enumerate(items, start=1):
        missing = {"key", "prompt", "instruction_id_list", "kwargs"} - item.keys()
        if missing:
            raise BadInputError(f"{path}:{lineno}: eval record lacks {sorted(missing)} (IFEval schema)")
        item.setdefault("instruction", item["prompt"])
        item["eval_set"] = name
    if limit is None or limit >= len(items):
        return items
    by_type: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_type[item["instruction_id_list"][0]].append(item)
    queues = [by_type[t] for t in sorted(by_type)]
    picked: list[dict] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda it: items.index(it))


def item_id(record: dict) -> tuple[str, str]:
    """An evaluation item's identity: (eval set, key). Keys are unique only within a set,
    so two sets that share keys (IFEval's and a user's) must never be joined by key alone."""
    return str(record["eval_set"]), str(record["key"])


def record_id(suite: str, model: str, item: dict) -> str:
    return f"{suite}/{model}/{item['eval_set']}/{item['key']}"


def fewshot_examples(k: int = FEWSHOT_EXAMPLES) -> list[tuple[str, str]]:
    path = Path(str(resources.files("cai") / "data" / "seeds" / "fewshot_examples.jsonl"))
    return [(r["instruction"], r["response"]) for r in read_jsonl(path)[:k]]


def suite_prompt(cfg: RunConfig, suite: str, instruction: str) -> tuple[str, str]:
    """(format name, prompt) of one item in one suite. The only place suites choose prompts."""
    train_format = cfg.eval.format or cfg.format
    if suite == "primary":
        return train_format, formats.render(train_format, instruction)
    if suite == "raw_probe":
        return "raw", formats.render("raw", instruction)
    if suite == "fewshot_baseline":
        return train_format, formats.render_fewshot(train_format, fewshot_examples(), instruction)
    raise BadInputError(f"unknown suite {suite!r}; known: {sorted(SUITE_MODELS)}")


def generation_settings(cfg: RunConfig, suite: str) -> dict[str, Any]:
    fmt = cfg.eval.format or cfg.format
    stop = list(formats.stop_sequences(fmt)) if suite != "raw_probe" else [formats.EXAMPLE_SEPARATOR + formats.EXAMPLE_SEPARATOR]
    return {"temperature": 0.0, "max_new_tokens": cfg.eval.max_new_tokens, "stop": stop}


def generate_eval_responses(cfg: RunConfig, slot, items: list[dict], models: list[str], writer: ArtifactWriter) -> dict:
    """Generate every (suite, model, item) response not yet in `writer.done`, appending one
    batch at a time (a crash redoes at most one batch). Returns per-suite prompt hashes per model."""
    from cai.pipeline.generation import HFGenerator

    from tqdm.auto import tqdm

    gen = HFGenerator(slot.model, slot.tokenizer, batch_size=cfg.eval.batch_size)
    done = {r["id"] for r in writer.done}
    total = sum(len(items) for suite in cfg.eval.suites for m in SUITE_MODELS[suite] if m in models)
    bar = tqdm(total=total, initial=len(done), desc="evaluation responses", unit="resp", mininterval=1.0)
    hashes: dict[str, dict[str, str]] = {}
    for suite in cfg.eval.suites:
        settings = generation_settings(cfg, suite)
        rendered = [suite_prompt(cfg, suite, it["instruction"]) for it in items]
        for model_name in SUITE_MODELS[suite]:
            if model_name not in models:
                continue
            todo = [i for i, it in enumerate(items) if record_id(suite, model_name, it) not in done]
            for start in range(0, len(todo), cfg.eval.batch_size):
                chunk = todo[start:start + cfg.eval.batch_size]
                with slot.use(model_name):
                    outs = gen.generate([rendered[i][1] for i in chunk], max_new_tokens=settings["max_new_tokens"],
                                        temperature=0.0, stop=settings["stop"])
                for i, out in zip(chunk, outs):
                    it = items[i]
                    writer.append({
                        "id": record_id(suite, model_name, it), "suite": suite, "model": model_name,
                        "key": it["key"], "eval_set": it["eval_set"], "instruction": it["instruction"],
                        "format": rendered[i][0], "prompt": rendered[i][1], "response": out.text.strip(),
                        "stop_reason": out.stop_reason, "n_new_tokens": out.n_new_tokens,
                    })
                bar.update(len(chunk))
    bar.close()
    for suite in cfg.eval.suites:  # from the prompts each model was actually given, as written
        for model_name in (m for m in SUITE_MODELS[suite] if m in models):
            given = sorted((item_id(r), r["prompt"]) for r in writer.done if r["suite"] == suite and r["model"] == model_name)
            hashes.setdefault(suite, {})[model_name] = prompts_sha256([p for _, p in given])
    return {"prompt_sha256": hashes, "settings": {s: generation_settings(cfg, s) for s in cfg.eval.suites},
            "models": models, "n_items": len(items)}


# --------------------------------------------------------------------------- results

PAIRS = (("base", "sft"), ("base", "dpo"), ("sft", "dpo"))
# Training vs prompting: the trained models in the training format against the base model
# given few-shot examples in the same format, on the same items ((suite, model) pairs).
PROMPTING_PAIRS = ((("fewshot_baseline", "base"), ("primary", "sft")), (("fewshot_baseline", "base"), ("primary", "dpo")))
CEILING = 0.9  # base prompt-level accuracy at or above this leaves training little to show
LENGTH_CONFOUND_CORR = 0.3
LENGTH_FAMILY = "length_constraints:"
ARTIFACT_RATE = 0.10  # truncated or empty responses above this share of a (suite, model) are warned
CLUSTERING = ("the item's `cluster` field, else its instruction-id list joined with '+' "
              "(the template family: the shipped Stage-1 set writes each family from one or two templates)")


# The suite's warning rows (suites/test_stage1.py) that restate a warning of `_warnings`
# from the same scores and thresholds: where results are shown, the report lists it once.
RESULTS_WARNING_ROWS = frozenset({"base_below_ceiling", "training_beats_prompting", "responses_not_cut",
                                  "length_does_not_decide", "no_length_confound"})


def cluster_of(item: dict) -> str:
    """The unit the bootstrap resamples: items of one template are near-duplicates and
    pass or fail together, so they count as one draw, not as independent evidence."""
    return str(item.get("cluster") or "+".join(item["instruction_id_list"]))


def _length_confound(scored: list[dict], responses: dict[Any, str]) -> dict[str, Any]:
    """Does pass/fail track response length where no instruction constrains length? A scorer
    that fails long answers produces exactly this pattern (the 81% -> 99.3% lesson)."""
    import numpy as np

    rows = [(int(it["prompt_level_strict"]), len(responses[item_id(it)])) for it in scored
            if not any(i.startswith(LENGTH_FAMILY) for i in it["instruction_id_list"])]
    if len(rows) < 5 or len({r[0] for r in rows}) < 2 or len({r[1] for r in rows}) < 2:
        return {"n": len(rows), "corr": None, "warning": False}
    passed, length = np.array(rows, dtype=float).T
    corr = float(np.corrcoef(passed, length)[0, 1])
    return {"n": len(rows), "corr": round(corr, 3),
            "mean_chars_pass": round(float(length[passed == 1].mean()), 1),
            "mean_chars_fail": round(float(length[passed == 0].mean()), 1),
            "warning": abs(corr) >= LENGTH_CONFOUND_CORR}


LENGTH_RULE_MIN_N = 10
LENGTH_RULE_LIFT = 0.25  # a length threshold that beats always-guess-the-majority by this much is warned


def _length_rule(passed: list[int], chars: list[int]) -> dict[str, Any]:
    """How well the best single threshold on response length predicts the verdicts (pass
    iff shorter than t, or iff at least t), against guessing the majority verdict. A
    scorer that fails every long answer, or verdicts decided by truncation, make length
    alone a near-perfect predictor."""
    import numpy as np

    y, x = np.asarray(passed, dtype=int), np.asarray(chars, dtype=float)
    n = y.size
    majority = max(int(y.sum()), n - int(y.sum())) / n if n else 0.0
    if n < LENGTH_RULE_MIN_N or len(set(passed)) < 2:
        return {"n": n, "accuracy": None, "majority": round(majority, 3), "warning": False}
    thresholds = np.unique(x)
    shorter = (x[None, :] < thresholds[:, None]).astype(int)  # rule: pass iff len < t
    acc_short = (shorter == y).mean(axis=1)
    acc_long = (1 - shorter == y).mean(axis=1)
    best = int(np.argmax(np.maximum(acc_short, acc_long)))
    accuracy = float(max(acc_short[best], acc_long[best]))
    rule = ("none beats the majority" if accuracy <= majority else
            f"pass iff < {int(thresholds[best])} chars" if acc_short[best] >= acc_long[best]
            else f"pass iff >= {int(thresholds[best])} chars")
    return {"n": n, "accuracy": round(accuracy, 3), "rule": rule, "majority": round(majority, 3),
            "warning": accuracy - majority >= LENGTH_RULE_LIFT}


def _is_artifact(row: dict) -> bool:
    """A response that hit the token cap or is empty: a fail it earned by being cut, not by
    ignoring the instruction."""
    return row["stop_reason"] == "length" or not row["response"].strip()


def _model_scores(cfg: RunConfig, by_id: dict, rows: list[dict]) -> tuple[dict[str, Any], dict[tuple, dict]]:
    """One (suite, model): IFEval accuracies with cluster-bootstrap CIs and their N, per
    instruction type with N and CI, and the truncation / empty-response rates."""
    from cai.pipeline.evaluate import score
    from cai.pipeline.stats import bootstrap_mean_ci

    # The scorer joins by key: it is given "set:key" (what its messages name), mapped back below.
    ids = [item_id(r) for r in rows]
    label = {f"{u[0]}:{u[1]}": u for u in ids}
    report = score([{**by_id[u], "key": f"{u[0]}:{u[1]}"} for u in ids],
                   [{"key": f"{u[0]}:{u[1]}", "response": r["response"]} for u, r in zip(ids, rows)])
    report.items = [{**it, "eval_set": label[it["key"]][0], "key": by_id[label[it["key"]]]["key"]} for it in report.items]
    texts = {u: r["response"] for u, r in zip(ids, rows)}
    boot = {"n_resamples": cfg.eval.bootstrap_resamples, "seed": cfg.seed}
    clusters = [cluster_of(by_id[item_id(it)]) for it in report.items]
    strict = [int(it["prompt_level_strict"]) for it in report.items]
    _, lo, hi = bootstrap_mean_ci(strict, clusters=clusters, **boot)
    inst = [(int(ok), c, iid) for it, c in zip(report.items, clusters)
            for iid, ok in zip(it["instruction_id_list"], it["follow_instruction_list_strict"])]
    _, ilo, ihi = bootstrap_mean_ci([v for v, _, _ in inst], clusters=[c for _, c, _ in inst], **boot)
    per_instruction = {}
    for iid, p in report.per_instruction.items():
        # Within one type the template is (nearly) constant, so its items are resampled.
        _, tlo, thi = bootstrap_mean_ci([v for v, _, t in inst if t == iid], **boot)
        per_instruction[iid] = {**p, "strict_ci": [tlo, thi]}
    n = len(rows)
    truncated = sum(r["stop_reason"] == "length" for r in rows)
    empty = sum(not r["response"].strip() for r in rows)
    out = {
        "n": report.n_prompts, "n_clusters": len(set(clusters)),
        "prompt_level_strict": report.prompt_level_strict, "prompt_level_strict_ci": [lo, hi],
        "n_instructions": report.n_instructions,
        "instruction_level_strict": report.instruction_level_strict, "instruction_level_strict_ci": [ilo, ihi],
        "prompt_level_loose": report.prompt_level_loose,
        "instruction_level_loose": report.instruction_level_loose,
        "per_instruction": per_instruction,
        "mean_response_chars": round(sum(map(len, texts.values())) / max(len(texts), 1), 1),
        "stop_reasons": dict(sorted(_count(r["stop_reason"] for r in rows).items())),
        "n_truncated": truncated, "truncated_rate": truncated / n if n else 0.0,
        "n_empty": empty, "empty_rate": empty / n if n else 0.0,
        "length_confound": _length_confound(report.items, texts),
        "length_rule": _length_rule(strict, [len(texts[item_id(it)]) for it in report.items]),
    }
    raw = dict(zip(ids, rows))
    return out, {item_id(it): {**it, "response": texts[item_id(it)], "artifact": _is_artifact(raw[item_id(it)])}
                 for it in report.items}


def _sentence(a: tuple[str, str], b: tuple[str, str], diff: float, lo: float, hi: float, p_holm: float) -> str:
    """What one comparison means, in one sentence."""
    what = (f"{b[1]} ({b[0]}) vs {a[1]} ({a[0]})" if a[0] != b[0] else f"{b[1]} vs {a[1]} ({a[0]})")
    if lo > 0 and p_holm < 0.05:
        verdict = f"{b[1]} is better"
    elif hi < 0 and p_holm < 0.05:
        verdict = f"{b[1]} is worse"
    else:
        verdict = "no difference is established"
    question = " — did training beat prompting?" if a[0] == "fewshot_baseline" else ""
    return (f"{what}{question} {verdict}: {diff:+.3f} (95% cluster CI [{lo:+.3f}, {hi:+.3f}], "
            f"Holm-adjusted McNemar p = {p_holm:.3g}).")


def _compare(cfg: RunConfig, by_id: dict, per_item: dict, a: tuple[str, str], b: tuple[str, str]) -> dict[str, Any]:
    from cai.pipeline.stats import mcnemar_exact, paired_bootstrap_ci

    ia_all, ib_all = per_item[a], per_item[b]
    keys = sorted(set(ia_all) & set(ib_all))
    xa = [int(ia_all[k]["prompt_level_strict"]) for k in keys]
    xb = [int(ib_all[k]["prompt_level_strict"]) for k in keys]
    clusters = [cluster_of(by_id[k]) for k in keys]
    diff, lo, hi = paired_bootstrap_ci(xb, xa, n_resamples=cfg.eval.bootstrap_resamples, seed=cfg.seed,
                                       clusters=clusters)
    b01, b10, p = mcnemar_exact(xa, xb)
    discordant = []
    for k, va, vb in zip(keys, xa, xb):
        if va != vb:
            ia, ib = ia_all[k], ib_all[k]
            deciding = [iid for iid, sa, sb in zip(ia["instruction_id_list"], ia["follow_instruction_list_strict"],
                                                   ib["follow_instruction_list_strict"]) if sa != sb]
            loser = ia if vb else ib
            discordant.append({"eval_set": k[0], "key": by_id[k]["key"], "instruction": by_id[k]["instruction"], "deciding_checks": deciding,
                               f"{a[1]}_pass": bool(va), f"{b[1]}_pass": bool(vb),
                               f"{a[1]}_response": ia["response"], f"{b[1]}_response": ib["response"],
                               "loser_truncated_or_empty": loser["artifact"]})
    return {"suite": a[0] if a[0] == b[0] else f"{a[0]}→{b[0]}", "a_suite": a[0], "b_suite": b[0],
            "a": a[1], "b": b[1], "kind": "prompting" if a[0] != b[0] else "training",
            "n": len(keys), "n_clusters": len(set(clusters)), "metric": "prompt_level_strict",
            "diff_b_minus_a": diff, "ci95": [lo, hi], "mcnemar_p": p,
            "a_only_pass": b10, "b_only_pass": b01,
            "discordant_truncated_or_empty": sum(d["loser_truncated_or_empty"] for d in discordant),
            "discordant": discordant}


def summarize(cfg: RunConfig, items: list[dict], responses: list[dict]) -> dict[str, Any]:
    """Canonical scores per (suite, model) with cluster-bootstrap CIs, paired comparisons
    (within each suite, and trained models against the few-shot base: training vs
    prompting) with Holm-adjusted McNemar p-values over all of them, and the diagnostics
    that make scoring artifacts visible: discordant items, length confound, ceiling,
    truncated and empty responses."""
    from cai.pipeline.stats import holm

    by_id = {item_id(it): it for it in items}
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in responses:
        grouped[(r["suite"], r["model"])].append(r)
    scores: dict[str, dict[str, Any]] = defaultdict(dict)
    per_item: dict[tuple[str, str], dict[Any, dict]] = {}
    for (suite, model), rows in sorted(grouped.items()):
        scores[suite][model], per_item[(suite, model)] = _model_scores(cfg, by_id, rows)

    specs = [((suite, a), (suite, b)) for suite in scores for a, b in PAIRS]
    comparisons = [_compare(cfg, by_id, per_item, a, b) for a, b in specs + list(PROMPTING_PAIRS)
                   if a in per_item and b in per_item]
    for c, p_holm in zip(comparisons, holm([c["mcnemar_p"] for c in comparisons])):
        c["mcnemar_p_holm"] = p_holm
        c["sentence"] = _sentence((c["a_suite"], c["a"]), (c["b_suite"], c["b"]), c["diff_b_minus_a"],
                                  *c["ci95"], p_holm)
    return {"metric": "prompt_level_strict (IFEval checkers, lm-eval)", "scores": scores,
            "comparisons": comparisons, "warnings": _warnings(scores, comparisons), "n_items": len(items),
            "clustering": {"by": CLUSTERING, "n_clusters": len({cluster_of(it) for it in items})},
            "multiplicity": f"Holm step-down over all {len(comparisons)} McNemar tests of this report"}


def _warnings(scores: dict[str, dict[str, Any]], comparisons: list[dict]) -> list[str]:
    warnings = []
    for suite, models in scores.items():
        base = models.get("base")
        if base and base["prompt_level_strict"] >= CEILING:
            warnings.append(f"ceiling ({suite}): the base model already scores {base['prompt_level_strict']:.1%}; "
                            "training has little room to show an effect")
    for suite, models in scores.items():
        for model, s in models.items():
            if s["length_confound"]["warning"]:
                warnings.append(f"length confound ({suite}/{model}): pass/fail correlates with response length "
                                f"(r = {s['length_confound']['corr']}) on items with no length constraint")
            lr = s["length_rule"]
            if lr["warning"]:
                warnings.append(f"length predicts the verdict ({suite}/{model}): the rule '{lr['rule']}' matches "
                                f"{lr['accuracy']:.0%} of {lr['n']} verdicts, guessing the majority {lr['majority']:.0%}")
            for key, what in (("truncated", "hit max_new_tokens (a cut answer fails most checks)"),
                              ("empty", "are empty (each scores as a fail)")):
                if s[f"{key}_rate"] > ARTIFACT_RATE:
                    warnings.append(f"{key} ({suite}/{model}): {s[f'n_{key}']} of {s['n']} responses {what}; "
                                    f"{s[f'{key}_rate']:.0%} > {ARTIFACT_RATE:.0%}")
    for c in comparisons:
        n_disc = len(c["discordant"])
        if n_disc and c["discordant_truncated_or_empty"] * 2 > n_disc:
            warnings.append(f"truncation-driven ({c['suite']} {c['a']} vs {c['b']}): in {c['discordant_truncated_or_empty']} "
                            f"of {n_disc} discordant items the failing response was truncated or empty")
        if c["kind"] == "prompting" and c["diff_b_minus_a"] < 0:
            warnings.append(f"prompting beats training: few-shot base ({c['a_suite']}) scores {-c['diff_b_minus_a']:.3f} "
                            f"above {c['b']} ({c['b_suite']}) on the same {c['n']} items")
    return warnings


def _count(values) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return out
