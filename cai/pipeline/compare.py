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
            todo = [i for i, it in enumerate(items) if f"{suite}/{model_name}/{it['key']}" not in done]
            for start in range(0, len(todo), cfg.eval.batch_size):
                chunk = todo[start:start + cfg.eval.batch_size]
                with slot.use(model_name):
                    outs = gen.generate([rendered[i][1] for i in chunk], max_new_tokens=settings["max_new_tokens"],
                                        temperature=0.0, stop=settings["stop"])
                for i, out in zip(chunk, outs):
                    it = items[i]
                    writer.append({
                        "id": f"{suite}/{model_name}/{it['key']}", "suite": suite, "model": model_name,
                        "key": it["key"], "eval_set": it["eval_set"], "instruction": it["instruction"],
                        "format": rendered[i][0], "prompt": rendered[i][1], "response": out.text.strip(),
                        "stop_reason": out.stop_reason, "n_new_tokens": out.n_new_tokens,
                    })
                bar.update(len(chunk))
    bar.close()
    for suite in cfg.eval.suites:  # from the prompts each model was actually given, as written
        for model_name in (m for m in SUITE_MODELS[suite] if m in models):
            given = sorted((str(r["key"]), r["prompt"]) for r in writer.done if r["suite"] == suite and r["model"] == model_name)
            hashes.setdefault(suite, {})[model_name] = prompts_sha256([p for _, p in given])
    return {"prompt_sha256": hashes, "settings": {s: generation_settings(cfg, s) for s in cfg.eval.suites},
            "models": models, "n_items": len(items)}


# --------------------------------------------------------------------------- results

PAIRS = (("base", "sft"), ("base", "dpo"), ("sft", "dpo"))
CEILING = 0.9  # base prompt-level accuracy at or above this leaves training little to show
LENGTH_CONFOUND_CORR = 0.3
LENGTH_FAMILY = "length_constraints:"


def _bootstrap_mean_ci(values: list[int], resamples: int, seed: int) -> tuple[float, float]:
    import numpy as np

    if not values:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    arr = np.asarray(values, dtype=float)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _length_confound(scored: list[dict], responses: dict[Any, str]) -> dict[str, Any]:
    """Does pass/fail track response length where no instruction constrains length? A scorer
    that fails long answers produces exactly this pattern (the 81% -> 99.3% lesson)."""
    import numpy as np

    rows = [(int(it["prompt_level_strict"]), len(responses[it["key"]])) for it in scored
            if not any(i.startswith(LENGTH_FAMILY) for i in it["instruction_id_list"])]
    if len(rows) < 5 or len({r[0] for r in rows}) < 2 or len({r[1] for r in rows}) < 2:
        return {"n": len(rows), "corr": None, "warning": False}
    passed, length = np.array(rows, dtype=float).T
    corr = float(np.corrcoef(passed, length)[0, 1])
    return {"n": len(rows), "corr": round(corr, 3),
            "mean_chars_pass": round(float(length[passed == 1].mean()), 1),
            "mean_chars_fail": round(float(length[passed == 0].mean()), 1),
            "warning": abs(corr) >= LENGTH_CONFOUND_CORR}


def summarize(cfg: RunConfig, items: list[dict], responses: list[dict]) -> dict[str, Any]:
    """Canonical scores per (suite, model), paired statistics between models, and the
    diagnostics that make scoring artifacts visible: discordant items, length confound,
    base-model ceiling."""
    from cai.pipeline.evaluate import score
    from cai.pipeline.stats import mcnemar_exact, paired_bootstrap_ci

    by_key = {it["key"]: it for it in items}
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in responses:
        grouped[(r["suite"], r["model"])].append(r)
    scores: dict[str, dict[str, Any]] = defaultdict(dict)
    per_item: dict[tuple[str, str], dict[Any, dict]] = {}
    for (suite, model), rows in sorted(grouped.items()):
        report = score([by_key[r["key"]] for r in rows], [{"key": r["key"], "prompt": by_key[r["key"]]["prompt"],
                                                            "response": r["response"]} for r in rows])
        texts = {r["key"]: r["response"] for r in rows}
        strict = [int(it["prompt_level_strict"]) for it in report.items]
        lo, hi = _bootstrap_mean_ci(strict, cfg.eval.bootstrap_resamples, cfg.seed)
        scores[suite][model] = {
            "n": report.n_prompts,
            "prompt_level_strict": report.prompt_level_strict, "prompt_level_strict_ci": [lo, hi],
            "instruction_level_strict": report.instruction_level_strict,
            "prompt_level_loose": report.prompt_level_loose,
            "instruction_level_loose": report.instruction_level_loose,
            "per_instruction": report.per_instruction,
            "mean_response_chars": round(sum(map(len, texts.values())) / max(len(texts), 1), 1),
            "stop_reasons": dict(sorted(_count(r["stop_reason"] for r in rows).items())),
            "length_confound": _length_confound(report.items, texts),
        }
        per_item[(suite, model)] = {it["key"]: {**it, "response": texts[it["key"]]} for it in report.items}

    comparisons = []
    for suite in scores:
        for a, b in PAIRS:
            if (suite, a) not in per_item or (suite, b) not in per_item:
                continue
            keys = sorted(set(per_item[(suite, a)]) & set(per_item[(suite, b)]), key=str)
            xa = [int(per_item[(suite, a)][k]["prompt_level_strict"]) for k in keys]
            xb = [int(per_item[(suite, b)][k]["prompt_level_strict"]) for k in keys]
            diff, lo, hi = paired_bootstrap_ci(xb, xa, n_resamples=cfg.eval.bootstrap_resamples, seed=cfg.seed)
            b01, b10, p = mcnemar_exact(xa, xb)
            discordant = []
            for k, va, vb in zip(keys, xa, xb):
                if va != vb:
                    ia, ib = per_item[(suite, a)][k], per_item[(suite, b)][k]
                    deciding = [iid for iid, sa, sb in zip(ia["instruction_id_list"], ia["follow_instruction_list_strict"],
                                                           ib["follow_instruction_list_strict"]) if sa != sb]
                    discordant.append({"key": k, "instruction": by_key[k]["instruction"], "deciding_checks": deciding,
                                       f"{a}_pass": bool(va), f"{b}_pass": bool(vb),
                                       f"{a}_response": ia["response"], f"{b}_response": ib["response"]})
            comparisons.append({"suite": suite, "a": a, "b": b, "n": len(keys), "metric": "prompt_level_strict",
                                "diff_b_minus_a": diff, "ci95": [lo, hi], "mcnemar_p": p,
                                "a_only_pass": b10, "b_only_pass": b01, "discordant": discordant})

    warnings = []
    base_primary = scores.get("primary", {}).get("base")
    if base_primary and base_primary["prompt_level_strict"] >= CEILING:
        warnings.append(f"ceiling: the base model already scores {base_primary['prompt_level_strict']:.1%} under the "
                        "training format; training has little room to show an effect (compare raw_probe and fewshot_baseline)")
    for suite, models in scores.items():
        for model, s in models.items():
            if s["length_confound"]["warning"]:
                warnings.append(f"length confound ({suite}/{model}): pass/fail correlates with response length "
                                f"(r = {s['length_confound']['corr']}) on items with no length constraint")
    return {"metric": "prompt_level_strict (IFEval checkers, lm-eval)", "scores": scores,
            "comparisons": comparisons, "warnings": warnings, "n_items": len(items)}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return out
