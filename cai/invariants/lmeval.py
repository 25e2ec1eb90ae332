"""Invariants of the lm-eval second opinion (`cai.pipeline.lmeval` runs it): what lm-eval
feeds cai's model, the prompts it builds, and whether its own IFEval scorer agrees with
cai's canonical scorer item by item.

- `LmEvalNoControlTokens` on an `EncodingProbe` (the HFLM, its requests, the ids observed)
- `LmEvalPromptParity` on a `ParityProbe` (the requests lm-eval built or logged, the source records)
- `LmEvalScoreAgreement` on a `ScoreAgreementProbe` (lm-eval's logged samples, the source records)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from cai.invariants.base import Invariant, Severity
from cai.invariants.markers import control_token_ids
from cai.pipeline import formats

# lm-eval request types whose encoding prepends `prefix_token_id` regardless of the context.
ROLLING_REQUEST = "loglikelihood_rolling"
# lm-eval's IFEval metric (a per-sample value in its logged samples) -> cai's per-item
# `score_item` field and `ScoreReport` aggregate.
IFEVAL_METRICS = {
    "prompt_level_strict_acc": ("prompt_level_strict", "prompt_level_strict"),
    "inst_level_strict_acc": ("follow_instruction_list_strict", "instruction_level_strict"),
    "prompt_level_loose_acc": ("prompt_level_loose", "prompt_level_loose"),
    "inst_level_loose_acc": ("follow_instruction_list_loose", "instruction_level_loose"),
}
LMEVAL_IFEVAL_SCORER = "lm_eval.tasks.ifeval.utils.process_results"


@dataclass
class EncodingProbe:
    """Subject of `LmEvalNoControlTokens`: the HFLM, the requests built for the run
    (`(request_type, args)`), and -- after a run -- the token ids lm-eval fed the model."""

    lm: Any
    requests: list[tuple[str, tuple]]
    observed: dict[str, list] | None = None


class LmEvalNoControlTokens(Invariant):
    """The ids lm-eval feeds cai's model carry no BOS or other special/control token.

    Prevents the base-model evaluation being scored on `<|im_start|>`-prefixed (chat
    control) or BOS-prefixed inputs the model never saw in training: an HFLM built with
    `add_bos_token=True`, a tokenizer that adds BOS, a context that smuggles chat markup,
    and lm-eval's `prefix_token_id` (the BOS, `<|im_start|>` here), which it prepends to
    empty contexts and rolling log-likelihood requests. Checked on token ids: every
    context encoded with HFLM's own encoders must hold no special id and equal cai's
    `encode`; after a run, the ids actually passed to the model are checked too."""

    name = "lmeval_no_control_tokens"
    severity = Severity.ERROR

    def _check(self, probe: EncodingProbe):
        from cai.pipeline.generation import encode_pair
        from cai.pipeline.models import encode

        lm = probe.lm
        tok = lm.tokenizer
        special = control_token_ids(tok)
        problems: list[str] = []
        examples: list[dict] = []

        def offend(kind: str, text: str, ids: list[int]) -> bool:
            bad = [i for i in ids if i in special]
            if bad:
                if len(examples) < 5:
                    examples.append({"request": kind, "context": text[:80], "first_ids": ids[:6],
                                     "special": sorted({f"{i} {special[i]}" for i in bad})})
                return True
            return False

        add_bos = getattr(lm, "add_bos_token", None)
        if add_bos is not False:
            problems.append(f"HFLM add_bos_token={add_bos!r} (must be False: the encoding must not depend on the "
                            "tokenizer's default)")
        prefix = getattr(lm, "prefix_token_id", None)
        types = defaultdict(int)
        for rtype, _ in probe.requests:
            types[rtype] += 1
        if types.get(ROLLING_REQUEST):
            problems.append(f"{types[ROLLING_REQUEST]} {ROLLING_REQUEST} request(s): lm-eval prepends prefix_token_id "
                            f"{prefix} ({special.get(prefix, '?')}) to every one")
        empty = sum(1 for rtype, args in probe.requests if rtype != ROLLING_REQUEST and args[0] == "")
        if empty:
            problems.append(f"{empty} request(s) with an empty context: lm-eval encodes them as [prefix_token_id "
                            f"{prefix} ({special.get(prefix, '?')})]")

        n_bad = n_mismatch = 0
        gen_contexts = sorted({args[0] for rtype, args in probe.requests if rtype == "generate_until" and args[0]})
        for ctx in gen_contexts:
            ids = list(lm.tok_encode(ctx))
            n_bad += offend("generate_until", ctx, ids)
            n_mismatch += ids != encode(tok, ctx)
        for start in range(0, len(gen_contexts), 8):  # the batched path generate_until really uses
            batch = gen_contexts[start:start + 8]
            input_ids, mask = lm.tok_batch_encode(batch)
            for ctx, row, m in zip(batch, input_ids.tolist(), mask.tolist()):
                ids = [i for i, keep in zip(row, m) if keep]
                n_bad += offend("generate_until (batched)", ctx, ids)
                n_mismatch += ids != encode(tok, ctx)
        pairs = sorted({args[:2] for rtype, args in probe.requests if rtype == "loglikelihood" and args[0]})
        for ctx, cont in pairs:
            c_ids, k_ids = (list(x) for x in lm._encode_pair(ctx, cont))
            n_bad += offend("loglikelihood", ctx + cont, c_ids + k_ids)
            n_mismatch += (c_ids, k_ids) != encode_pair(tok, ctx, cont)
        if n_bad:
            problems.append(f"{n_bad} encoding(s) of requests contain special/control ids")
        if n_mismatch:
            problems.append(f"{n_mismatch} encoding(s) of requests differ from cai's encode (add_special_tokens=False)")

        observed_note = "not yet run"
        if probe.observed is not None:
            obs_bad = 0
            ll = probe.observed.get("loglikelihood", [])
            gen = probe.observed.get("generate_until", [])
            for c_ids, k_ids in ll:
                if not c_ids:
                    obs_bad += 1
                    problems.append("a loglikelihood request reached the model with an empty context")
                obs_bad += offend("observed loglikelihood", tok.decode(c_ids + k_ids), list(c_ids) + list(k_ids))
            for ids in gen:
                obs_bad += offend("observed generate_until", tok.decode(ids), list(ids))
            if probe.observed.get(ROLLING_REQUEST):
                problems.append(f"{probe.observed[ROLLING_REQUEST]} rolling log-likelihood request(s) reached "
                                "the model")
            if obs_bad:
                problems.append(f"{obs_bad} request(s) reached the model with special/control ids")
            observed_note = (f"observed at run time: {len(gen)} generate_until input rows and {len(ll)} loglikelihood "
                             f"requests, {obs_bad} with special ids")

        summary = (f"add_bos_token={add_bos!r}, prefix_token_id={prefix}; {len(gen_contexts)} generate_until contexts "
                   f"and {len(pairs)} loglikelihood (context, option) pairs encoded by HFLM; special ids checked: "
                   f"{sorted(special)}; {observed_note}")
        details = {"add_bos_token": add_bos, "prefix_token_id": prefix, "request_types": dict(types),
                   "examples": examples}
        if problems:
            return False, "; ".join(problems) + f" ({summary})", details
        return True, f"no BOS/special ids, no empty contexts, identical to cai's encode: {summary}", details


@dataclass
class ParityProbe:
    """Subject of `LmEvalPromptParity`: what lm-eval built (one row per request) and the
    source records of each task, read by cai independently of lm-eval."""

    format_name: str
    tokenizer: Any
    rows: list[dict]  # task, schema, request_type, key, args
    records: dict[str, dict[str, dict]]  # task -> key -> source record
    apply_chat_template: Any = False
    system_instruction: Any = None
    num_fewshot: dict[str, Any] = field(default_factory=dict)
    stage: str = "built"


class LmEvalPromptParity(Invariant):
    """Every context lm-eval builds equals `formats.render(format, instruction)` of the
    source record; MC options equal `COMPLETION_PREFIX + option`; generation stops are the
    format's; no chat template, system prompt or few-shot examples.

    Prevents the audit's finding 2 (trained on "Instruction: x\\nResponse:", evaluated on
    raw instructions) from returning through a second evaluation harness, and finding 1
    (a chat template applied to a base model) through lm-eval's own options."""

    name = "lmeval_prompt_parity"
    severity = Severity.ERROR

    def _check(self, probe: ParityProbe):
        problems: list[str] = []
        bad_examples: list[dict] = []
        stops = list(formats.stop_sequences(probe.format_name))
        if probe.apply_chat_template:
            problems.append(f"apply_chat_template={probe.apply_chat_template!r}")
        if probe.system_instruction:
            problems.append("a system instruction is set")
        if getattr(probe.tokenizer, "chat_template", None) is not None:
            problems.append("the tokenizer carries a chat template (load it through cai.pipeline.models)")
        shots = {t: n for t, n in probe.num_fewshot.items() if n not in (0, None)}
        if shots:
            problems.append(f"few-shot examples configured: {shots}")
        mismatched = 0
        per_doc: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for row in probe.rows:
            per_doc[(row["task"], row["key"])].append(row)
        for (task, key), rows in per_doc.items():
            rec = probe.records.get(task, {}).get(key)
            if rec is None:
                problems.append(f"{task}: lm-eval built a request for key {key!r}, which is not in the source data")
                continue
            schema = rows[0]["schema"]
            instruction = rec.get("instruction", rec.get("prompt")) if schema == "ifeval" else rec["question"]
            expected = formats.render(probe.format_name, instruction)
            ok = all(r["args"][0] == expected for r in rows)
            if schema == "ifeval":
                ok &= len(rows) == 1 and rows[0]["request_type"] == "generate_until"
                gk = rows[0]["args"][1] if len(rows[0]["args"]) > 1 else {}
                if list(gk.get("until", [])) != stops or gk.get("do_sample") not in (False, None) \
                        or gk.get("temperature", 0.0) not in (0, 0.0):
                    ok = False
                    problems.append(f"{task} key {key}: generation settings {gk!r} are not greedy with the "
                                    f"format's stops {stops!r}")
            else:
                conts = [r["args"][1] for r in rows]
                ok &= all(r["request_type"] == "loglikelihood" for r in rows)
                ok &= conts == [formats.COMPLETION_PREFIX + c for c in rec["choices"]]
            if not ok:
                mismatched += 1
                if len(bad_examples) < 3:
                    bad_examples.append({"task": task, "key": key, "expected": expected,
                                         "got": [r["args"][:2] for r in rows][:4]})
        if mismatched:
            problems.append(f"{mismatched} doc(s) whose lm-eval requests differ from formats.render / the options")
        n_docs = len(per_doc)
        summary = (f"{probe.stage}: {n_docs} docs / {len(probe.rows)} requests in format {probe.format_name!r}; "
                   f"stops {stops!r}; apply_chat_template={probe.apply_chat_template!r}, no system prompt, 0-shot")
        if n_docs == 0:
            problems.append("no requests to check")
        if problems:
            return False, "; ".join(problems) + f" ({summary})", {"examples": bad_examples}
        return True, f"every context == formats.render(...), every option == ' ' + option: {summary}"


@dataclass
class ScoreAgreementProbe:
    """Subject of `LmEvalScoreAgreement`: one IFEval-schema task of an lm-eval run."""

    task: str
    scorer: Callable  # the `process_results` the task ran with (its config's)
    samples: list[dict]  # lm-eval's logged samples (`simple_evaluate(log_samples=True)`)
    records: dict[str, dict]  # key -> source record, read by cai independently of lm-eval
    lm_eval_metrics: dict[str, float]  # lm-eval's aggregates, by metric name
    langdetect_seed: Any  # `langdetect.DetectorFactory.seed` as lm-eval's pass left it


def _verdict(value: Any) -> bool | list[bool]:
    return [bool(x) for x in value] if isinstance(value, (list, tuple)) else bool(value)


class LmEvalScoreAgreement(Invariant):
    """lm-eval's own IFEval `process_results` and cai's canonical `score_item` give the same
    verdicts on the same response text, item by item (prompt and instruction level, strict
    and loose), and the same aggregates.

    Prevents a second opinion that is not one: the task scoring with cai's own scorer (cai
    compared with cai), or either side drifting -- a wrapper that strips or lowercases, another
    punkt_tab or langdetect seed, kwargs mangled on their way through `datasets` -- while the
    report shows the two numbers as if they measured the same thing. Both sides run lm-eval's
    IFEval checkers on identical text, so a disagreement means one of them is wrong: error
    severity. One documented exception (tests/test_scoring.py): an item whose checker
    replaces an invalid argument by a random draw (cai's "replaced invalid" notes, e.g.
    `letter_frequency` asked for "!"). lm-eval's `process_results` draws from the global
    `random` as the run left it, once for strict and again for loose; cai reseeds per pass.
    A disagreement on such an item is listed as explained, with the note, and does not fail."""

    name = "lmeval_score_agreement"
    severity = Severity.ERROR

    def _check(self, probe: ScoreAgreementProbe):
        from cai.pipeline.evaluate import LANGDETECT_SEED, _ifeval, score

        utils, _ = _ifeval()
        problems: list[str] = []
        used = f"{getattr(probe.scorer, '__module__', '?')}.{getattr(probe.scorer, '__qualname__', probe.scorer)}"
        if probe.scorer is not utils.process_results:
            problems.append(f"the task scored with {used}, not lm-eval's own {LMEVAL_IFEVAL_SCORER}")
        if probe.langdetect_seed != LANGDETECT_SEED:
            problems.append(f"langdetect seed {probe.langdetect_seed!r} in lm-eval's pass, {LANGDETECT_SEED} in cai's")

        samples: dict[str, dict] = {}
        for s in probe.samples:
            key = str(s["doc"]["key"])
            missing = [m for m in IFEVAL_METRICS if m not in s]
            if key not in probe.records:
                problems.append(f"lm-eval scored key {key!r}, which is not in the source data")
            elif key in samples:
                problems.append(f"lm-eval scored key {key!r} more than once")
            elif missing:
                problems.append(f"lm-eval's sample {key!r} lacks {', '.join(missing)}")
            else:
                samples[key] = s
        if not samples:
            problems.append("no scored items to compare")
            return False, f"{probe.task}: " + "; ".join(problems)

        rep = score([probe.records[k] for k in samples],
                    [{"key": probe.records[k]["key"], "response": s["filtered_resps"][0]} for k, s in samples.items()])
        ours = {str(it["key"]): it for it in rep.items}
        disagreeing, explained = [], []
        for key, s in samples.items():
            differs = {metric: {"lm_eval": _verdict(s[metric]), "cai": ours[key][item_field]}
                       for metric, (item_field, _) in IFEVAL_METRICS.items()
                       if _verdict(s[metric]) != ours[key][item_field]}
            if differs:
                drawn = [n for n in rep.notes if n.startswith(f"item {key}:") and "replaced invalid" in n]
                (explained if drawn else disagreeing).append(
                    {"key": key, "response": s["filtered_resps"][0][:200], "differs": differs, "notes": drawn})
        if disagreeing:
            problems.append(f"{len(disagreeing)} of {len(samples)} item(s) scored differently on the same response: "
                            f"keys {[d['key'] for d in disagreeing]}")
        aggregates = []
        for metric, (_, report_field) in IFEVAL_METRICS.items():
            theirs, mine = probe.lm_eval_metrics.get(metric), getattr(rep, report_field)
            aggregates.append(f"{metric} {theirs} vs {mine}")
            if theirs is None or (abs(float(theirs) - float(mine)) > 1e-12 and not explained):
                # explained items move the aggregates too: only then may they differ
                problems.append(f"aggregate {metric}: lm-eval {theirs} != cai {mine}")

        details = {"n_items": len(samples), "n_disagreeing": len(disagreeing), "disagreeing": disagreeing,
                   "explained": explained, "scorer": used, "langdetect_seed": probe.langdetect_seed}
        summary = (f"{probe.task}: {len(samples)} item(s), lm-eval's {used} vs cai's score_item on the same response "
                   f"text, langdetect seed {probe.langdetect_seed!r}")
        if explained:
            summary += (f"; {len(explained)} item(s) differ where a checker drew a random argument (explained: "
                        f"keys {[d['key'] for d in explained]})")
        if problems:
            return False, f"{summary}: " + "; ".join(problems), details
        agree = "every other item agrees" if explained else "every item agrees"
        return True, (f"{summary}: {agree} (prompt and instruction level, strict and loose); aggregates: "
                      + ", ".join(aggregates)), details
