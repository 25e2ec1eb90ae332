"""Chat-template leakage sentinels: each fails on the bug it exists for (a real tokenizer with
its template left on, a ChatML marker in a completion, ...) and passes on the cai way."""

import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.invariants.base import Status, all_passed
from cai.invariants.leakage import (
    CHAT_MARKER_FIELDS, PROBE_TEXTS, ChatTemplateDisabled, ChatTemplateRefuses, ModelSubject, NoChatMarkers,
    NoSpecialTokenIds, RoundTrip, SentinelBehaviour, TokenizerSubject, check_tokenizer, prompt_tokenizer_subject)
from cai.invariants.markers import control_token_ids, find_chat_markers
from cai.invariants.records import RecordSet
from cai.pipeline import formats
from cai.pipeline.models import encode, load_tokenizer


def by_name(results):
    return {r.name: r for r in results}


# --------------------------------------------------------------------------- layer 1


def test_loader_tokenizer_has_no_template_and_passes(smol_tokenizer, smol_tokenizer_provenance, embedded_model_dir):
    assert smol_tokenizer.chat_template is None
    results = by_name(check_tokenizer(smol_tokenizer, smol_tokenizer_provenance, source_dir=embedded_model_dir))
    assert all_passed(results.values())
    shipped = results["chat_template_shipped"]
    assert shipped.status == Status.WARN and shipped.severity.value == "warning"
    assert smol_tokenizer_provenance["chat_template"]["shipped_sha256"][:16] in shipped.evidence
    for name in ("chat_template_disabled", "apply_chat_template_refuses", "no_special_token_ids",
                 "decode_encode_roundtrip"):
        assert results[name].status == Status.PASS, results[name].evidence


def test_raw_transformers_tokenizer_fails(raw_smol_tokenizer):
    assert raw_smol_tokenizer.chat_template  # the hazard is real: the checkpoint ships ChatML
    results = by_name(check_tokenizer(raw_smol_tokenizer))
    assert not all_passed(results.values())
    assert results["chat_template_disabled"].status == Status.FAIL
    refuses = results["apply_chat_template_refuses"]
    assert refuses.status == Status.FAIL and "<|im_start|>" in refuses.evidence
    assert results["chat_template_shipped"].status == Status.WARN


@pytest.fixture(scope="module")
def template_dirs(raw_smol_tokenizer, tmp_path_factory):
    """Two tokenizer dirs from the embedded tokenizer: template in chat_template.jinja, and
    template moved into tokenizer_config.json."""
    jinja = tmp_path_factory.mktemp("tok_jinja")
    raw_smol_tokenizer.save_pretrained(jinja)
    assert (jinja / "chat_template.jinja").is_file()
    in_config = tmp_path_factory.mktemp("tok_config")
    for f in jinja.iterdir():
        shutil.copy(f, in_config / f.name)
    template = (in_config / "chat_template.jinja").read_text()
    (in_config / "chat_template.jinja").unlink()
    cfg = json.loads((in_config / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (in_config / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {"jinja": jinja, "config": in_config}


@pytest.mark.parametrize("where", ["jinja", "config"])
def test_shipped_template_anywhere_comes_out_clean(template_dirs, where):
    from transformers import AutoTokenizer

    d = template_dirs[where]
    assert AutoTokenizer.from_pretrained(d).chat_template  # plain transformers: template live
    tok, prov = load_tokenizer(d)
    assert tok.chat_template is None and prov["chat_template"]["shipped"]
    results = by_name(check_tokenizer(tok, prov, source_dir=d))
    assert all_passed(results.values())
    expect = "chat_template.jinja" if where == "jinja" else "tokenizer_config.json"
    assert expect in results["chat_template_shipped"].evidence


def test_template_set_to_none_is_not_enough(template_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(template_dirs["jinja"])
    tok.chat_template = None  # the "fix" that kept coming back
    results = by_name(check_tokenizer(tok))
    assert results["chat_template_disabled"].status == Status.PASS
    assert results["apply_chat_template_refuses"].status == Status.FAIL
    assert "not cai's refusal" in results["apply_chat_template_refuses"].evidence
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert ChatTemplateDisabled().check(tok).status == Status.FAIL
    assert ChatTemplateRefuses().check(tok).status == Status.FAIL


# --------------------------------------------------------------------------- layer 2


def test_probe_ids_hold_no_bos_or_special_ids(smol_tokenizer):
    specials = set(control_token_ids(smol_tokenizer))
    assert {0, 1, 2} <= specials and len(specials) == 17  # added tokens flagged special count too
    for text in PROBE_TEXTS:
        ids = encode(smol_tokenizer, text)
        assert ids[0] != smol_tokenizer.bos_token_id
        assert not set(ids) & specials


def test_special_ids_in_prompts_fail_unless_declared(smol_tokenizer):
    texts = ["Instruction: hi\nResponse:", "<|im_start|>user\nhi<|im_end|>"]
    subject = TokenizerSubject(smol_tokenizer, texts=texts, labels=["r1", "r2"])
    r = NoSpecialTokenIds().check(subject)
    assert r.status == Status.FAIL and "r2" in r.evidence and "<|im_start|>" in r.evidence
    assert NoSpecialTokenIds(allowed_ids=[1, 2]).check(subject).status == Status.PASS
    eos_completion = TokenizerSubject(smol_tokenizer, texts=[" done" + smol_tokenizer.eos_token],
                                      allowed_ids=frozenset([smol_tokenizer.eos_token_id]))
    assert NoSpecialTokenIds().check(eos_completion).status == Status.PASS


# --------------------------------------------------------------------------- layer 5: round trip


@pytest.fixture(scope="module")
def lossy_tokenizer():
    """A real (word-level, lower-casing) fast tokenizer: decode(encode(x)) != x."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "instruction": 1, ":": 2, "hello": 3, "world": 4, "response": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


def test_roundtrip_fails_on_unrepresentable_bytes(smol_tokenizer):
    r = RoundTrip().check(TokenizerSubject(smol_tokenizer, texts=["fine", "control \x06 and plane 4 \U00040000"]))
    assert r.status == Status.FAIL and "text 1" in r.evidence


def test_roundtrip_fails_on_lossy_tokenizer(lossy_tokenizer, smol_tokenizer):
    texts = ["Instruction: Hello  World\nResponse:"]
    r = RoundTrip().check(TokenizerSubject(lossy_tokenizer, texts=texts, labels=["record 'a1'"]))
    assert r.status == Status.FAIL and "record 'a1'" in r.evidence
    assert RoundTrip().check(TokenizerSubject(smol_tokenizer, texts=texts)).status == Status.PASS


@settings(max_examples=40, deadline=None)
@given(st.text(st.characters(max_codepoint=0x3FFFF, blacklist_categories=("Cc", "Cs", "Co", "Cn"))
               | st.sampled_from("\n\t "), min_size=1, max_size=60).filter(lambda s: not find_chat_markers(s)))
def test_smol_roundtrips_printable_text(smol_tokenizer, text):
    # Printable text in Unicode planes 0-3 survives. Some bytes do not (control characters
    # U+0004, U+0006, ..., and U+40000 and beyond: the GGUF vocabulary lacks those byte
    # tokens) - exactly what the round-trip sentinel is there to catch in a run's prompts.
    if any(t in text for t in smol_tokenizer.all_special_tokens):
        return
    assert RoundTrip().check(TokenizerSubject(smol_tokenizer, texts=[text])).status == Status.PASS


# --------------------------------------------------------------------------- layer 3: markers


def _sft(i, completion, instruction="Name a colour."):
    return {"id": f"s{i}", "instruction": instruction, "format": "instruction_response",
            "prompt": formats.render("instruction_response", instruction), "completion": completion}


def test_chatml_marker_in_completion_fails_naming_record_and_marker():
    rs = RecordSet("sft", [_sft(0, " Blue."), _sft(1, " Red.<|im_end|>\n<|im_start|>user"), _sft(2, " Green.")])
    r = NoChatMarkers().check(rs)
    assert r.status == Status.FAIL
    assert "'s1'" in r.evidence and "completion" in r.evidence and "<|im_end|>" in r.evidence and "ChatML" in r.evidence
    assert NoChatMarkers().check(RecordSet("sft", [_sft(0, " Blue."), _sft(2, " Green.")])).status == Status.PASS


def test_markers_in_preference_rejected_fail():
    rec = {"id": "p1", "instruction": "Hi", "format": "instruction_response",
           "prompt": formats.render("instruction_response", "Hi"), "chosen": " Hello.",
           "rejected": " [INST] Hello [/INST]", "margin": 1.0}
    r = NoChatMarkers().check(RecordSet("preference", [rec]))
    assert r.status == Status.FAIL and "rejected" in r.evidence and "[INST]" in r.evidence


def _eval_response(model, key, instruction, response):
    """A record as the eval stage writes it (compare.generate_eval_responses)."""
    prompt = formats.render("instruction_response", instruction)
    return {"id": f"primary/{model}/{key}", "suite": "primary", "model": model, "key": key, "eval_set": "stage1",
            "instruction": instruction, "format": "instruction_response", "prompt": prompt, "response": response,
            "stop_reason": "eos", "n_new_tokens": 5}


def test_chat_marker_in_an_eval_response_fails():
    clean = [_eval_response(m, 0, "Name a colour.", "Blue.") for m in ("base", "sft", "dpo")]
    assert NoChatMarkers().check(clean).status == Status.PASS
    leaked = clean[:2] + [_eval_response("dpo", 0, "Name a colour.", "Blue.<|im_end|>\n<|im_start|>assistant\nRed")]
    r = NoChatMarkers().check(leaked)
    assert r.status == Status.FAIL
    assert "'primary/dpo/0' response" in r.evidence and "ChatML" in r.evidence and "<|im_end|>" in r.evidence


def test_instruction_records_are_checked_on_their_instruction():
    cands = [{"id": "inst-1", "instruction": "Name a colour.", "type": "open", "source": "model"},
             {"id": "inst-2", "instruction": "<start_of_turn>user Name a fruit.", "type": "open", "source": "model"}]
    r = NoChatMarkers().check(cands)  # kind from the fields: no completion, chosen or key
    assert r.status == Status.FAIL and "'inst-2' instruction" in r.evidence and "Gemma" in r.evidence
    assert NoChatMarkers("instructions").check(cands[:1]).status == Status.PASS
    with pytest.raises(ValueError, match="unknown record kind"):
        NoChatMarkers("responses")


_KIND_RECORDS = {
    "sft": lambda: _sft(0, " Blue."),
    "preference": lambda: {"id": "p0", "instruction": "Hi", "format": "instruction_response",
                           "prompt": formats.render("instruction_response", "Hi"), "chosen": " Hello.",
                           "rejected": " Go away.", "margin": 1.0},
    "eval": lambda: _eval_response("base", 0, "Name a colour.", "Blue."),
    "instructions": lambda: {"id": "inst-0", "instruction": "Name a colour.", "source": "model"},
}
_KIND_FIELDS = [(k, f) for k, fields in CHAT_MARKER_FIELDS.items() for f in fields]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(_KIND_FIELDS), st.sampled_from(["<|im_start|>", "[/INST]", "<|eot_id|>", "<｜User｜>",
                                                       "<|CHATBOT_TOKEN|>", "\n### Response:", "\nASSISTANT:"]),
       st.integers(min_value=0))
def test_a_marker_in_any_model_output_field_fails(kind_field, marker, where):
    kind, field = kind_field
    rec = _KIND_RECORDS[kind]()
    assert NoChatMarkers(kind).check([rec]).status == Status.PASS
    text = rec[field]
    at = where % (len(text) + 1)
    rec[field] = text[:at] + marker + " " + text[at:]
    r = NoChatMarkers(kind).check([rec])
    assert r.status == Status.FAIL and f" {field}: " in r.evidence, r.evidence
    assert r.details["hits"][0]["marker"] == marker.strip()


def test_no_special_ids_on_records_given_the_tokenizer(smol_tokenizer):
    recs = [_eval_response(m, k, ins, "ok") for k, ins in enumerate(["Name a colour.", "Say <|im_start|> twice."])
            for m in ("base", "sft")]
    subject = prompt_tokenizer_subject(recs, smol_tokenizer)
    assert len(subject.texts) == 2  # one per distinct prompt, labelled by its first record
    assert subject.labels == ["record 'primary/base/0'", "record 'primary/base/1'"]
    r = NoSpecialTokenIds(tokenizer=smol_tokenizer).check(recs)
    assert r.status == Status.FAIL and "record 'primary/base/1' -> ids [1]" in r.evidence
    assert NoSpecialTokenIds(tokenizer=smol_tokenizer).check(recs[:2]).status == Status.PASS
    assert RoundTrip(tokenizer=smol_tokenizer).check(recs).status == Status.PASS

# --------------------------------------------------------------------------- layer 5: sentinels


def test_sentinel_warns_with_outputs_on_clean_answers():
    answers = {"Translate to Pig Latin: hello world": "Ellohay orldway!",
               "List three prime numbers": "1. 2\n2. 3\n3. 5",
               "Write a JSON object with keys a and b holding integers": '{"a": 1, "b": 2}',
               "Describe the seasons": "Spring is mild, summer hot, autumn cool and winter cold."}
    subject = ModelSubject(lambda prompts: [answers[p] for p in prompts], source="chat-model")
    r = SentinelBehaviour().check(subject)
    assert r.status == Status.WARN and r.severity.value == "warning"
    assert "4/4" in r.evidence and "Ellohay" in r.evidence
    assert all(row["clean_answer"] for row in r.details["outputs"])


def test_sentinel_passes_on_base_style_continuations():
    rambling = ModelSubject(lambda prompts: ["\n\nThis is an exercise from chapter 3 of the book."] * len(prompts))
    r = SentinelBehaviour().check(rambling)
    assert r.status == Status.PASS and "0/4" in r.evidence


def test_sentinel_runs_a_real_model_through_the_slot():
    """Mechanics with the tiny random model: raw prompts through HFGenerator, no template."""
    from cai.config import ModelConfig
    from cai.pipeline.models import ModelSlot

    with ModelSlot(ModelConfig(source="tiny-random")) as slot:
        r = SentinelBehaviour(max_new_tokens=8).check(slot)
    assert r.status == Status.PASS
    assert len(r.details["outputs"]) == 4


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CAI_SLOW_TESTS"), reason="generates with the 135M model (30-100 s on 2 busy cores); set CAI_SLOW_TESTS=1")
def test_sentinel_on_embedded_model_says_it_is_instruction_tuned():
    """The embedded SmolLM2-135M-Instruct is not a true base model: the evidence says so,
    with the raw outputs, whichever way the heuristic falls."""
    from cai.config import ModelConfig
    from cai.pipeline.models import ModelSlot

    with ModelSlot(ModelConfig(source="embedded")) as slot:
        r = SentinelBehaviour(max_new_tokens=24).check(slot)
    outputs = r.details["outputs"]
    assert len(outputs) == 4 and outputs[0]["instruction"] in r.evidence
    assert "instruction-tuned" in r.evidence


# --------------------------------------------------------------------------- module structure


def test_invariant_modules_import_each_other_without_a_cycle():
    """Every import between `cai.invariants` modules, module-level or inside a function (the
    old data <-> leakage <-> parity circle was dodged that way), forms an acyclic graph."""
    import ast
    from pathlib import Path

    import cai.invariants

    pkg = Path(cai.invariants.__file__).parent
    graph = {}
    for path in pkg.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cai.invariants."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps - {path.stem}
    assert {"records", "markers"} <= graph["leakage"] and "data" not in graph["leakage"] | graph["parity"]
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(trail + [m])}")
        if state.get(m) != 2:
            state[m] = 1
            for d in sorted(graph.get(m, ())):
                visit(d, trail + [m])
            state[m] = 2

    for m in sorted(graph):
        visit(m, [])
