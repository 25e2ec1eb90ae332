"""The lm-eval bridge (cai.pipeline.lmeval) and its invariants (cai.invariants.lmeval):
shipped YAML tasks over local data, contexts in the training format, no chat template, no
BOS/control ids, the generate task scored by lm-eval's own IFEval `process_results` and
compared item by item with cai's canonical scorer. Real components: lm-eval's HFLM,
evaluator and IFEval scorer, cai's loader and scorer; the tiny random model for mechanics,
the embedded model for one small real run."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.config import ModelConfig
from cai.errors import BadInputError, InvariantError
from cai.invariants.base import Status
from cai.invariants.lmeval import (IFEVAL_METRICS, LMEVAL_IFEVAL_SCORER, EncodingProbe, LmEvalNoControlTokens,
                                   LmEvalPromptParity, LmEvalScoreAgreement, ParityProbe, ScoreAgreementProbe)
from cai.pipeline import evaluate, formats
from cai.pipeline.evaluate import LANGDETECT_SEED, STAGE1_EVAL_SET
from cai.pipeline.lmeval import (DEFAULT_TASKS, LMEVAL_DIR, build_hflm, load_task_dataset, read_records,
                                 run_lm_eval, task_manager)
from cai.pipeline.models import ModelSlot

FMT = "instruction_response"
MC_FILE = LMEVAL_DIR / "cai_mc.jsonl"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """Two shared CPU cores: with two OpenMP threads per process, generation under load from
    other processes collapses (spin-waits; measured 13 min vs 1.8 min for this module at
    load average 6). One thread for this module, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny():
    with ModelSlot(ModelConfig(source="tiny-random")) as slot:
        yield slot


def _metrics_ok(report):
    for name, task in report["tasks"].items():
        assert task["metrics"], name
        for metric, value in task["metrics"].items():
            assert 0.0 <= value <= 1.0, (name, metric, value)


# --------------------------------------------------------------------------- shipped files


def test_shipped_yamls_are_cai_tasks_in_the_training_format():
    from lm_eval.tasks._yaml_loader import load_yaml

    from cai.pipeline import lmeval

    lm_eval_ifeval = evaluate._ifeval()[0]  # lm_eval.tasks.ifeval.utils, imported offline

    gen = load_yaml(LMEVAL_DIR / "cai_stage1_gen.yaml")
    mc = load_yaml(LMEVAL_DIR / "cai_mc.yaml")
    assert gen["output_type"] == "generate_until" and mc["output_type"] == "multiple_choice"
    # the YAML's copy of the stops has not drifted from the format (the bridge sets them anyway)
    assert gen["generation_kwargs"]["until"] == list(formats.stop_sequences(FMT))
    assert gen["generation_kwargs"]["do_sample"] is False and gen["generation_kwargs"]["temperature"] == 0.0
    for cfg in (gen, mc):
        assert cfg["num_fewshot"] == 0
        assert cfg["doc_to_text"] is lmeval.doc_to_text  # one prompt builder
        assert cfg["custom_dataset"] is lmeval.load_task_dataset
        assert "dataset_path" not in cfg  # no CWD-relative `data_files`
    # scored by lm-eval's own IFEval functions, the objects themselves (no copy, no wrapper)
    assert lm_eval_ifeval.__name__ == "lm_eval.tasks.ifeval.utils"
    assert gen["process_results"] is lm_eval_ifeval.process_results
    assert [m["metric"] for m in gen["metric_list"]] == list(IFEVAL_METRICS)
    inst_level = [m["aggregation"] for m in gen["metric_list"] if m["metric"].startswith("inst_level")]
    assert inst_level == [lm_eval_ifeval.agg_inst_level_acc] * 2
    assert gen["filter_list"] == [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                               {"function": "take_first"}]}]
    assert mc["doc_to_choice"] is lmeval.doc_to_choice and mc["target_delimiter"] == ""
    assert {m["metric"] for m in mc["metric_list"]} == {"acc", "acc_norm"}
    assert set(DEFAULT_TASKS) <= set(task_manager().all_subtasks)


def test_mc_data_is_the_documented_hand_written_set():
    rows = read_records(MC_FILE, "multiple_choice")
    assert len(rows) == 30
    assert all(len(r["choices"]) == 4 for r in rows)
    counts = [sum(r["answer"] == i for r in rows) for i in range(4)]
    assert counts == [8, 8, 7, 7]
    readme = (LMEVAL_DIR / "README.md").read_text()
    assert "hand-written for cai on 2026-11-25" in readme and "Apache-2.0" in readme
    assert hashlib.sha256(MC_FILE.read_bytes()).hexdigest() in readme


def test_tasks_load_from_any_directory_and_render_every_doc_through_formats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data must not resolve against the CWD
    tasks = task_manager(FMT).load(list(DEFAULT_TASKS))["tasks"]
    gen, mc = tasks["cai_stage1_gen"], tasks["cai_mc"]
    items = {str(r["key"]): r for r in read_records(STAGE1_EVAL_SET, "ifeval")}
    docs = list(gen.eval_docs)
    assert len(docs) == len(items) == 182
    for doc in docs:
        rec = items[doc["key"]]
        assert gen.doc_to_text(doc) == formats.render(FMT, rec["instruction"])
        # what lm-eval's process_results reads; the None padding `datasets` adds, its checkers drop
        assert (doc["prompt"], doc["instruction_id_list"]) == (rec["prompt"], rec["instruction_id_list"])
        assert [{k: v for k, v in kw.items() if v is not None} for kw in doc["kwargs"]] == rec["kwargs"]
    questions = {r["id"]: r for r in read_records(MC_FILE, "multiple_choice")}
    mc_docs = list(mc.eval_docs)
    assert len(mc_docs) == 30
    for doc in mc_docs:
        rec = questions[doc["key"]]
        assert mc.doc_to_text(doc) == formats.render(FMT, rec["question"])
        assert mc.doc_to_choice(doc) == [" " + c for c in rec["choices"]]
        assert mc.doc_to_target(doc) == rec["answer"]


def test_format_is_task_metadata():
    tasks = task_manager("raw").load(["cai_mc"])["tasks"]
    doc = next(iter(tasks["cai_mc"].eval_docs))
    assert tasks["cai_mc"].doc_to_text(doc) == formats.render("raw", doc["instruction"]) == doc["instruction"]


# --------------------------------------------------------------------------- tiny model: mechanics


def test_tiny_run_mechanics(tiny):
    tok = tiny.tokenizer
    calls = []

    def spy(*args, **kwargs):  # cai's refusal, counted: lm-eval must never reach it
        calls.append(args)
        raise AssertionError("apply_chat_template called")

    tok.apply_chat_template = spy
    random.seed(1234)
    state = random.getstate()
    report = run_lm_eval(tiny.model, tok, limit=4, max_gen_toks=8, cross_check=True)
    assert random.getstate() == state  # lm-eval's global seeding is undone
    assert calls == [] and tok.chat_template is None
    assert report["passed"] and all(r["status"] == "pass" for r in report["invariants"])
    assert {r["name"] for r in report["invariants"]} == {
        "lmeval_no_control_tokens", "lmeval_prompt_parity", "lmeval_score_agreement"}
    assert report["bos_invariant"]["status"] == "pass"
    evidence = report["bos_invariant"]["evidence"]
    assert "observed at run time: 4 generate_until input rows and 16 loglikelihood" in evidence
    _metrics_ok(report)
    gen = report["tasks"]["cai_stage1_gen"]
    assert set(gen["metrics"]) == {"prompt_level_strict_acc", "inst_level_strict_acc",
                                   "prompt_level_loose_acc", "inst_level_loose_acc"}
    assert set(report["tasks"]["cai_mc"]["metrics"]) == {"acc", "acc_norm"}
    assert gen["n"] == 4 and report["tasks"]["cai_mc"]["n"] == 4
    items = {str(r["key"]): r for r in read_records(STAGE1_EVAL_SET, "ifeval")}
    assert len({items[k]["instruction_id_list"][0] for k in gen["doc_keys"]}) == 4  # round-robin over types
    for key, ctx in gen["contexts"].items():
        assert ctx == formats.render(FMT, items[key]["instruction"])
    canon = report["canonical"]["cai_stage1_gen"]
    assert canon["prompt_level_strict"] == gen["metrics"]["prompt_level_strict_acc"]
    assert gen["scorer"] == LMEVAL_IFEVAL_SCORER
    agreement = next(r for r in report["invariants"] if r["name"] == "lmeval_score_agreement")
    assert agreement["details"]["n_items"] == 4 and agreement["details"]["n_disagreeing"] == 0
    assert agreement["details"]["scorer"] == LMEVAL_IFEVAL_SCORER
    assert agreement["details"]["langdetect_seed"] == LANGDETECT_SEED
    # cai's own generation path on the same prompts gives the same greedy responses
    assert canon["cai_generation"]["identical_responses"] == 4, canon["cai_generation"]
    assert report["settings"]["add_bos_token"] is False and report["settings"]["apply_chat_template"] is False
    assert report["settings"]["generation_kwargs"]["cai_stage1_gen"]["until"] == list(formats.stop_sequences(FMT))
    assert report["lm_eval_version"]
    assert report["task_yaml_sha256"]["cai_mc"] == hashlib.sha256((LMEVAL_DIR / "cai_mc.yaml").read_bytes()).hexdigest()
    assert report["tasks"]["cai_stage1_gen"]["data_file"] == str(STAGE1_EVAL_SET)


def test_add_bos_token_true_is_refused_before_any_compute(tiny):
    from lm_eval.models.huggingface import HFLM

    bad = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=8, add_bos_token=True)
    forward_calls = []
    handle = tiny.model.register_forward_hook(lambda *a: forward_calls.append(1))
    try:
        with pytest.raises(InvariantError, match=r"lmeval_no_control_tokens: HFLM add_bos_token=True"):
            run_lm_eval(tiny.model, tiny.tokenizer, lm=bad, limit=2, max_gen_toks=4)
    finally:
        handle.remove()
    assert forward_calls == []  # refused before the model ran


def test_bos_invariant_checks_token_ids(tiny):
    """A tokenizer that really prepends BOS (what `add_bos_token=True` does to a Llama-style
    tokenizer loaded by lm-eval): the ids carry <|im_start|> and differ from cai's encode."""
    from lm_eval.models.huggingface import HFLM

    tok = copy.deepcopy(tiny.tokenizer)
    tok.add_bos_token = True
    lm = HFLM(pretrained=tiny.model, tokenizer=tok, batch_size=8, add_bos_token=True)
    ctx = formats.render(FMT, "Name three colors.")
    requests = [("generate_until", (ctx, {"until": ["\nInstruction:"]})), ("loglikelihood", (ctx, " Red"))]
    result = LmEvalNoControlTokens().check(EncodingProbe(lm, requests))
    assert result.status == Status.FAIL
    assert "contain special/control ids" in result.evidence and "differ from cai's encode" in result.evidence
    assert result.details["examples"][0]["first_ids"][0] == 1
    assert "1 <|im_start|>" in result.details["examples"][0]["special"]

    good = build_hflm(tiny.model, tiny.tokenizer)
    assert LmEvalNoControlTokens().check(EncodingProbe(good, requests)).status == Status.PASS
    # a context smuggling chat markup is caught on ids even with the right settings
    chat = [("generate_until", ("<|im_start|>user\nhi<|im_end|>\n", {}))]
    assert LmEvalNoControlTokens().check(EncodingProbe(good, chat)).status == Status.FAIL
    # lm-eval's prefix_token_id path: empty contexts and rolling log-likelihood
    empty = LmEvalNoControlTokens().check(EncodingProbe(good, [("loglikelihood", ("", " Red"))]))
    assert empty.status == Status.FAIL and "prefix_token_id 1 (<|im_start|>)" in empty.evidence
    rolling = LmEvalNoControlTokens().check(EncodingProbe(good, [("loglikelihood_rolling", ("some text",))]))
    assert rolling.status == Status.FAIL
    # ids observed at run time are checked too
    observed = {"generate_until": [[1] + tiny.tokenizer(ctx, add_special_tokens=False)["input_ids"]],
                "loglikelihood": [], "loglikelihood_rolling": 0}
    seen = LmEvalNoControlTokens().check(EncodingProbe(good, requests, observed))
    assert seen.status == Status.FAIL and "reached the model with special/control ids" in seen.evidence


def test_prompt_parity_invariant_fails_on_raw_prompts_and_chat_settings(tiny):
    rec = read_records(STAGE1_EVAL_SET, "ifeval")[0]
    key = str(rec["key"])
    gk = {"until": list(formats.stop_sequences(FMT)), "do_sample": False, "temperature": 0.0}

    def probe(context, **kw):
        row = {"task": "cai_stage1_gen", "schema": "ifeval", "request_type": "generate_until", "key": key,
               "args": (context, gk)}
        return ParityProbe(FMT, tiny.tokenizer, [row], {"cai_stage1_gen": {key: rec}}, **kw)

    inv = LmEvalPromptParity()
    assert inv.check(probe(formats.render(FMT, rec["instruction"]))).status == Status.PASS
    raw = inv.check(probe(rec["instruction"]))  # the audit's finding 2
    assert raw.status == Status.FAIL and "differ from formats.render" in raw.evidence
    chat = inv.check(probe(formats.render(FMT, rec["instruction"]), apply_chat_template=True))
    assert chat.status == Status.FAIL and "apply_chat_template=True" in chat.evidence
    shots = inv.check(probe(formats.render(FMT, rec["instruction"]), num_fewshot={"cai_stage1_gen": 3}))
    assert shots.status == Status.FAIL


# --------------------------------------------------------------------------- score agreement


@pytest.fixture(scope="module")
def stage1_task():
    """The shipped generate task as lm-eval loads it: its docs (through `datasets`) and the
    scorer its YAML names."""
    return task_manager(FMT).load(["cai_stage1_gen"])["tasks"]["cai_stage1_gen"]


@pytest.fixture(scope="module")
def stage1_docs(stage1_task):
    return {doc["key"]: doc for doc in stage1_task.eval_docs}


@pytest.fixture(scope="module")
def stage1_records():
    return {str(r["key"]): r for r in read_records(STAGE1_EVAL_SET, "ifeval")}


def _probe(task, docs, records, responses: dict[str, str], **kw) -> ScoreAgreementProbe:
    """A probe as the bridge builds it: samples logged the way lm-eval logs them (its task's
    own `process_results` on the doc it built), aggregates by lm-eval's own aggregations."""
    samples = [{"doc": docs[k], "filtered_resps": [r], **task.process_results(docs[k], [r])}
               for k, r in responses.items()]
    agg = task.aggregation()
    metrics = {m: agg[m]([s[m] for s in samples]) for m in IFEVAL_METRICS} if samples else {}
    return ScoreAgreementProbe("cai_stage1_gen", kw.get("scorer", task.config.process_results), samples,
                               {k: records[k] for k in responses}, metrics,
                               kw.get("langdetect_seed", LANGDETECT_SEED))


def _key_of(records, instruction_id: str) -> str:
    return next(k for k, r in records.items() if r["instruction_id_list"] == [instruction_id])


FRAGMENTS = ["the rain falls softly.", "The Rain Falls.", "\n", "\n\n", "*", "**bold** ", "* a point\n",
             "<<A Title>>\n", "P.S. thanks", "SECTION 1\n", "```json\n{\"a\": 1}\n```", '"', ", ", "hello world",
             "Bonjour tout le monde, comment allez-vous aujourd'hui?", "END", "apple banana cherry ", "***\n"]
RESPONSES = st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join), st.text(max_size=120))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_cai_scorer_agrees_with_lm_evals_process_results_item_by_item(stage1_task, stage1_docs, stage1_records,
                                                                      data):
    """Property: on any response text, for any shipped item, cai's canonical scorer and
    lm-eval's own IFEval `process_results` give the same four verdicts."""
    keys = data.draw(st.lists(st.sampled_from(sorted(stage1_records)), min_size=1, max_size=4, unique=True))
    responses = {k: data.draw(RESPONSES) for k in keys}
    result = LmEvalScoreAgreement().check(_probe(stage1_task, stage1_docs, stage1_records, responses))
    assert result.status == Status.PASS, result.evidence
    assert result.details["n_items"] == len(keys) and result.details["n_disagreeing"] == 0


def test_score_agreement_fails_on_a_broken_cai_scorer_item_by_item(stage1_task, stage1_docs, stage1_records,
                                                                   monkeypatch):
    """A cai scorer that lowercases the response before checking (a plausible bug) disagrees
    with lm-eval on a capitalised answer to an all-lowercase instruction: the invariant fails
    and names that item, and only that one."""
    lower = _key_of(stage1_records, "change_case:english_lowercase")
    words = _key_of(stage1_records, "length_constraints:number_words")
    responses = {lower: "The Rain falls on the roof.", words: "just a few words here."}
    assert LmEvalScoreAgreement().check(_probe(stage1_task, stage1_docs, stage1_records, responses)).status \
        == Status.PASS
    real = evaluate.score_item
    monkeypatch.setattr(evaluate, "score_item", lambda item, response: real(item, response.lower()))
    result = LmEvalScoreAgreement().check(_probe(stage1_task, stage1_docs, stage1_records, responses))
    assert result.status == Status.FAIL
    assert f"1 of 2 item(s) scored differently on the same response: keys ['{lower}']" in result.evidence
    assert result.details["n_disagreeing"] == 1
    [bad] = result.details["disagreeing"]
    assert bad["key"] == lower and bad["response"] == responses[lower]
    assert bad["differs"]["prompt_level_strict_acc"] == {"lm_eval": False, "cai": True}
    assert bad["differs"]["inst_level_strict_acc"] == {"lm_eval": [False], "cai": [True]}
    assert "aggregate prompt_level_strict_acc" in result.evidence


def test_score_agreement_explains_items_whose_checker_draws_a_random_argument(stage1_task):
    """IFEval's own keys 1122 and 1129 ask `letter_frequency` for the "letter" "!", which the
    checker replaces by a random letter: lm-eval's process_results draws it from the global
    `random` as the run left it, cai from its fixed seed. Such a disagreement is listed as
    explained (with cai's note) and does not fail; the same disagreement without the random
    draw does (test above)."""
    import random

    iid = "keywords:letter_frequency"
    rec = {"key": "drawn", "prompt": "Use the letter ! at least 3 times.", "instruction_id_list": [iid],
           "kwargs": [{"letter": "!", "let_frequency": 3, "let_relation": "at least"}]}

    def letter_drawn(seed: int) -> str:
        checker = evaluate._ifeval()[1].INSTRUCTION_DICT[iid](iid)
        random.seed(seed)
        checker.build_description(**rec["kwargs"][0])
        return checker.get_instruction_args()["letter"].lower()

    cai_letter = letter_drawn(evaluate.CHECKER_RANDOM_SEED)
    other_seed = next(s for s in range(1, 100) if letter_drawn(s) != cai_letter)
    random.seed(other_seed)  # the state lm-eval's process_results happens to find
    probe = _probe(stage1_task, {"drawn": rec}, {"drawn": rec}, {"drawn": cai_letter * 10})
    result = LmEvalScoreAgreement().check(probe)
    assert result.status == Status.PASS, result.evidence
    assert result.details["n_disagreeing"] == 0
    [why] = result.details["explained"]
    assert why["key"] == "drawn" and why["differs"]["prompt_level_strict_acc"] == {"lm_eval": False, "cai": True}
    assert "replaced invalid letter='!'" in why["notes"][0]
    assert "1 item(s) differ where a checker drew a random argument" in result.evidence


def test_score_agreement_fails_when_cai_scores_the_lm_eval_pass(stage1_task, stage1_docs, stage1_records):
    """The hole this invariant closes: a task whose process_results is cai's own scorer
    agrees with cai on every item -- and is still no second opinion."""

    def cai_process_results(doc, results):  # the former cai.pipeline.lmeval.process_results_ifeval
        r = evaluate.score_item(stage1_records[doc["key"]], results[0])
        return {"prompt_level_strict_acc": r["prompt_level_strict"],
                "inst_level_strict_acc": r["follow_instruction_list_strict"],
                "prompt_level_loose_acc": r["prompt_level_loose"],
                "inst_level_loose_acc": r["follow_instruction_list_loose"]}

    task = copy.copy(stage1_task)
    task.process_results = cai_process_results
    responses = {_key_of(stage1_records, "change_case:english_lowercase"): "all lowercase here."}
    result = LmEvalScoreAgreement().check(_probe(task, stage1_docs, stage1_records, responses,
                                                 scorer=cai_process_results))
    assert result.status == Status.FAIL and result.details["n_disagreeing"] == 0
    assert f"not lm-eval's own {LMEVAL_IFEVAL_SCORER}" in result.evidence


def test_score_agreement_fails_on_another_langdetect_seed_or_no_items(stage1_task, stage1_docs, stage1_records):
    key = _key_of(stage1_records, "change_case:english_lowercase")
    unseeded = LmEvalScoreAgreement().check(_probe(stage1_task, stage1_docs, stage1_records, {key: "all lowercase."},
                                                   langdetect_seed=None))
    assert unseeded.status == Status.FAIL and "langdetect seed None in lm-eval's pass" in unseeded.evidence
    empty = LmEvalScoreAgreement().check(_probe(stage1_task, stage1_docs, stage1_records, {}))
    assert empty.status == Status.FAIL and "no scored items to compare" in empty.evidence


def test_run_with_a_broken_cai_scorer_is_not_passed(tiny, monkeypatch):
    """End to end: lm-eval's pass over the tiny model, cai's scorer inverted: every item
    disagrees, the report does not pass, and raising mode refuses the run."""
    real = evaluate.score_item

    def inverted(item, response):
        r = real(item, response)
        return {**r, "prompt_level_strict": not r["prompt_level_strict"]}

    monkeypatch.setattr(evaluate, "score_item", inverted)
    report = run_lm_eval(tiny.model, tiny.tokenizer, tasks=["cai_stage1_gen"], limit=3, max_gen_toks=4,
                         raise_on_failure=False)
    assert not report["passed"]
    agreement = next(r for r in report["invariants"] if r["name"] == "lmeval_score_agreement")
    assert agreement["status"] == "fail" and agreement["details"]["n_disagreeing"] == 3
    assert {d["key"] for d in agreement["details"]["disagreeing"]} == set(report["tasks"]["cai_stage1_gen"]["doc_keys"])


def test_ifeval_records_that_do_not_fit_one_table_are_bad_input(tmp_path):
    rows = [{"key": k, "prompt": "Answer in at least 5 words.", "instruction_id_list": ["length_constraints:number_words"],
             "kwargs": [{"num_words": n, "relation": "at least"}]} for k, n in ((1, 5), (2, "5"))]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BadInputError, match=r"mixed.jsonl: the records do not fit one table schema"):
        load_task_dataset(str(path), "ifeval")


def test_peft_model_with_adapters(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from cai.pipeline.models import build_tiny_model

    adapter_dir = tmp_path / "sft"
    get_peft_model(build_tiny_model(tiny.tokenizer, seed=1),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(adapter_dir)
    tiny.add_adapter("sft", adapter_dir)
    accs = {}
    for name in ("base", "sft"):  # one base model, adapters switched in place
        with tiny.use(name):
            report = run_lm_eval(tiny.model, tiny.tokenizer, tasks=["cai_mc"], limit=6)
        assert report["passed"]
        _metrics_ok(report)
        accs[name] = report["tasks"]["cai_mc"]["metrics"]
    assert type(tiny.model).__name__ == "PeftModel" and set(accs) == {"base", "sft"}


# --------------------------------------------------------------------------- embedded model: a real run


@pytest.fixture(scope="module")
def embedded_report():
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        started = time.perf_counter()
        # 64 new tokens (the YAML says 128) keeps this module under two minutes on 2 shared cores
        report = run_lm_eval(slot.model, slot.tokenizer, limit=8, max_gen_toks=64)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def test_embedded_model_small_real_run(embedded_report):
    report = embedded_report
    assert report["passed"]
    assert report["bos_invariant"]["status"] == "pass"
    assert report["settings"]["generation_kwargs"]["cai_stage1_gen"]["max_gen_toks"] == 64
    _metrics_ok(report)
    gen, mc = report["tasks"]["cai_stage1_gen"], report["tasks"]["cai_mc"]
    assert gen["n"] == 8 and mc["n"] == 8
    items = {str(r["key"]): r for r in read_records(STAGE1_EVAL_SET, "ifeval")}
    assert len(gen["contexts"]) == 8
    for key, ctx in gen["contexts"].items():
        assert ctx == formats.render(FMT, items[key]["instruction"])
    canon = report["canonical"]["cai_stage1_gen"]
    for ours, theirs in (("prompt_level_strict", "prompt_level_strict_acc"),
                         ("instruction_level_strict", "inst_level_strict_acc"),
                         ("prompt_level_loose", "prompt_level_loose_acc"),
                         ("instruction_level_loose", "inst_level_loose_acc")):
        assert canon[ours] == gen["metrics"][theirs]
    agreement = next(r for r in report["invariants"] if r["name"] == "lmeval_score_agreement")
    assert agreement["status"] == "pass" and agreement["details"]["n_items"] == 8
    assert agreement["details"]["n_disagreeing"] == 0
    # a real model answers: not all responses empty
    assert sum(bool(r) for r in canon["responses"].values()) >= 6
    print("\nlm-eval bridge, embedded model, limit 8:", json.dumps({
        "gen": gen["metrics"], "mc": mc["metrics"], "canonical_strict": canon["prompt_level_strict"],
        "seconds": report["seconds"], "wall": report["wall_seconds"]}))
