"""Chat-template leakage: the layered sentinels of DESIGN.md (layer 4, the trainer's first
batch, lives in `cai.invariants.training`).

1. Tokenizer: the chat template is gone after load and `apply_chat_template` refuses.
2. Encoding: encoded text holds no special/control ids except those declared.
3. Text: no chat markers of any common family in prompts or responses.
5. Behaviour: decode(encode(p)) == p; sentinel instructions a true base model should not
   answer cleanly when fed raw.

The markers themselves (text families, control token ids) live in `cai.invariants.markers`.

Subjects: a tokenizer (or `TokenizerSubject` with provenance, texts and declared ids),
a `cai.invariants.records.RecordSet`, or a model (`ModelSlot`, `LoadedModel`, anything with
`.model`/`.tokenizer`, or a plain `generate(prompts) -> list[str]` callable).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cai.errors import ChatTemplateDisabledError
from cai.invariants.base import Invariant, Result, Severity, evaluate
from cai.invariants.markers import control_token_ids, find_chat_markers
from cai.invariants.records import RecordSet, as_record_set, detect_kind, record_id

# Texts the tokenizer-level sentinels encode: the project's own prompt shape plus the
# whitespace / unicode / code cases where a lossy tokenizer would change a prompt.
PROBE_TEXTS: tuple[str, ...] = (
    "Instruction: Describe the seasons.\nResponse:",
    "Instruction: List three prime numbers.\nResponse: 2, 3 and 5.",
    " A completion starts with one space and keeps  double  spaces.\n\nAnd paragraphs.",
    "Unicode: café, naïve, Straße, 東京, emoji 🙂 — dashes…",
    "def square(x):\n    return x ** 2\n",
    "\tTabs, trailing spaces   ",
    "Numbers 3.14159 and 1,000,000; punctuation?! (brackets) [x] {y} <z>",
)

_PROBE_MESSAGES = [{"role": "user", "content": "Describe the seasons."}]


def _short(text: str, n: int = 80) -> str:
    text = str(text)
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- subjects


@dataclass
class TokenizerSubject:
    """A tokenizer plus what the tokenizer-level sentinels need to judge it.

    `provenance`: the dict `load_tokenizer` returns (says whether the checkpoint shipped a
    template); `source_dir`: the checkpoint directory (its files are inspected too);
    `texts`: what to encode (probe texts, or a run's prompts); `allowed_ids`: special ids
    the format declares (e.g. EOS ending a training completion)."""

    tokenizer: Any
    provenance: dict[str, Any] | None = None
    source_dir: Path | None = None
    texts: Sequence[str] = PROBE_TEXTS
    labels: Sequence[str] | None = None  # per text (record ids); default "probe N"
    allowed_ids: frozenset[int] = frozenset()

    def label(self, i: int) -> str:
        return str(self.labels[i]) if self.labels is not None else f"text {i}"


def prompt_tokenizer_subject(records: RecordSet | Sequence[dict], tokenizer,
                             allowed_ids: Iterable[int] = ()) -> TokenizerSubject:
    """TokenizerSubject over a run's distinct prompts (each labelled by the first record that
    holds it) for the encoding and round-trip sentinels:
    `evaluate(encoding_invariants(), prompt_tokenizer_subject(rs, tok))`."""
    rs = as_record_set(records)
    first: dict[str, Any] = {}
    for i, r in enumerate(rs.records):
        if isinstance(r.get("prompt"), str):
            first.setdefault(r["prompt"], record_id(r, i))
    return TokenizerSubject(tokenizer, texts=list(first), labels=[f"record {rid!r}" for rid in first.values()],
                            allowed_ids=frozenset(allowed_ids))


def _tok_subject(subject, tokenizer=None) -> TokenizerSubject:
    """The subject as a TokenizerSubject; with `tokenizer`, `subject` is records whose prompts it encodes."""
    if isinstance(subject, TokenizerSubject):
        return subject
    return prompt_tokenizer_subject(subject, tokenizer) if tokenizer is not None else TokenizerSubject(subject)


def _live_template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)  # not every tokenizer class defines it
    if isinstance(t, dict):
        return json.dumps(t, sort_keys=True)
    return t


def shipped_template_files(directory: Path) -> dict[str, str]:
    """Chat templates a checkpoint directory ships on disk -> sha256 (file or config key)."""
    found = {}
    directory = Path(directory)
    for name in ("chat_template.jinja", "chat_template.json"):
        if (directory / name).is_file():
            found[name] = _sha((directory / name).read_text(encoding="utf-8"))
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = {}
        t = data.get("chat_template")
        if t:
            found["tokenizer_config.json:chat_template"] = _sha(t if isinstance(t, str) else json.dumps(t, sort_keys=True))
    templates_dir = directory / "additional_chat_templates"
    if templates_dir.is_dir():
        for p in sorted(templates_dir.glob("*.jinja")):
            found[f"additional_chat_templates/{p.name}"] = _sha(p.read_text(encoding="utf-8"))
    return found


# --------------------------------------------------------------------------- layer 1: tokenizer


class ChatTemplateShipped(Invariant):
    """Reports (warning, informational) that the checkpoint ships a chat template, with its
    sha256. Not a failure by itself: cai disables it at load. It is the hazard the other
    sentinels guard against, and a hint that the "base" model may be instruction-tuned."""

    name = "chat_template_shipped"
    severity = Severity.WARN

    def _check(self, subject):
        s = _tok_subject(subject)
        sources: dict[str, str] = {}
        if s.provenance and s.provenance.get("chat_template", {}).get("shipped"):
            sources["loader provenance"] = s.provenance["chat_template"].get("shipped_sha256") or "?"
        if s.source_dir is not None and Path(s.source_dir).is_dir():
            sources.update(shipped_template_files(Path(s.source_dir)))
        live = _live_template(s.tokenizer)
        if live:
            sources["live on the tokenizer"] = _sha(live)
        if not sources:
            return True, "the checkpoint ships no chat template"
        by_sha: dict[str, list[str]] = {}
        for where, sha in sources.items():
            by_sha.setdefault(sha, []).append(where)
        shown = "; ".join(f"sha256 {sha[:16]} from {', '.join(w)}" for sha, w in by_sha.items())
        return False, (f"the checkpoint ships a chat template ({shown}); cai's loader disables it. "
                       "A shipped template often means the checkpoint is instruction-tuned"), {"sources": sources}


class ChatTemplateDisabled(Invariant):
    """Layer 1. Prevents audit finding 1: a base model scored through the tokenizer's chat
    template (`tokenizer.chat_template` left set), inflating base scores and voiding the
    base-vs-trained comparison. The template must be None after load, whatever the
    checkpoint shipped (tokenizer_config.json, chat_template.jinja, GGUF metadata)."""

    name = "chat_template_disabled"

    def _check(self, subject):
        tok = _tok_subject(subject).tokenizer
        live = _live_template(tok)
        if live is None:
            return True, "tokenizer.chat_template is None"
        return False, (f"tokenizer.chat_template is set (sha256 {_sha(live)[:16]}, {len(live)} chars, "
                       f"starts {_short(live, 60)}): anything that renders chat turns with it feeds the base model "
                       "a chat-formatted prompt; load the tokenizer through cai.pipeline.models.load_tokenizer")


class ChatTemplateRefuses(Invariant):
    """Layer 1. Prevents the template coming back: with only `chat_template = None`, any
    later assignment (a library default, a copied config) re-enables rendering. cai's loader
    replaces `apply_chat_template` with a function that always raises
    `ChatTemplateDisabledError`; anything else fails."""

    name = "apply_chat_template_refuses"

    def _check(self, subject):
        tok = _tok_subject(subject).tokenizer
        try:
            out = tok.apply_chat_template(_PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
        except ChatTemplateDisabledError:
            return True, "apply_chat_template raises ChatTemplateDisabledError"
        except Exception as err:  # noqa: BLE001 - any other refusal is not cai's and can be undone
            return False, (f"apply_chat_template raised {type(err).__name__} ({str(err)[:80]}), not cai's refusal: "
                           "setting tokenizer.chat_template would make it render again; load through cai's loader")
        return False, f"apply_chat_template renders a chat prompt: {_short(out, 120)}"


# --------------------------------------------------------------------------- layer 2: encoding


class NoSpecialTokenIds(Invariant):
    """Layer 2. Prevents control tokens reaching the model unannounced: a BOS added by the
    tokenizer, or `<|im_start|>` & co. inside a prompt, put the base model in chat mode.
    Checked on ids (cai's `encode`, add_special_tokens=False): no id may be a special or
    control id unless the format declares it."""

    name = "no_special_token_ids"

    def __init__(self, allowed_ids: Iterable[int] = (), tokenizer=None):
        """tokenizer: check records' prompts through it (the subject is then the records)."""
        self.allowed_ids = frozenset(allowed_ids)
        self.tokenizer = tokenizer

    def _check(self, subject):
        from cai.pipeline.models import encode

        s = _tok_subject(subject, self.tokenizer)
        tok = s.tokenizer
        specials = set(control_token_ids(tok)) - self.allowed_ids - set(s.allowed_ids)
        offenders = []
        for i, text in enumerate(s.texts):
            bad = [t for t in encode(tok, text) if t in specials]
            if bad:
                offenders.append({"text": s.label(i), "ids": bad[:8], "tokens": tok.convert_ids_to_tokens(bad[:8])})
        n = len(s.texts)
        if not offenders:
            return True, f"{n} text(s) encoded without special ids ({len(specials)} special ids checked)"
        first = offenders[0]
        return False, (f"{len(offenders)}/{n} encoded text(s) hold special ids; first: {first['text']} -> "
                       f"ids {first['ids']} {first['tokens']}"), {"offenders": offenders[:20]}


class RoundTrip(Invariant):
    """Layer 5 (behavioural). Prevents a tokenizer that silently changes prompts (adds or
    drops a leading space, normalises unicode, injects markers): decode(encode(p)) must give
    p back byte for byte, for the probe texts or the run's prompts."""

    name = "decode_encode_roundtrip"

    def __init__(self, tokenizer=None):
        """tokenizer: check records' prompts through it (the subject is then the records)."""
        self.tokenizer = tokenizer

    def _check(self, subject):
        from cai.pipeline.models import encode

        s = _tok_subject(subject, self.tokenizer)
        tok = s.tokenizer
        bad = []
        for i, text in enumerate(s.texts):
            back = tok.decode(encode(tok, text), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if back != text:
                bad.append({"text": s.label(i), "original": text[:200], "decoded": back[:200]})
        if not bad:
            return True, f"decode(encode(x)) == x for {len(s.texts)} text(s)"
        b = bad[0]
        return False, (f"{len(bad)}/{len(s.texts)} text(s) change under decode(encode(x)); first: {b['text']}: "
                       f"{_short(b['original'], 60)} -> {_short(b['decoded'], 60)}"), {"mismatches": bad[:20]}


def tokenizer_invariants(allowed_ids: Iterable[int] = ()) -> list[Invariant]:
    """Model-level sentinels run by `cai check MODEL` and `check_tokenizer`."""
    return [ChatTemplateShipped(), ChatTemplateDisabled(), ChatTemplateRefuses(),
            NoSpecialTokenIds(allowed_ids), RoundTrip()]


def check_tokenizer(tokenizer, provenance: dict[str, Any] | None = None, *, source_dir: str | Path | None = None,
                    texts: Sequence[str] = PROBE_TEXTS, allowed_ids: Iterable[int] = ()) -> list[Result]:
    """Run the tokenizer sentinels. A tokenizer from cai's loader passes (the shipped-template
    row is a warning); `AutoTokenizer.from_pretrained` on a checkpoint with a template fails."""
    subject = TokenizerSubject(tokenizer, provenance, Path(source_dir) if source_dir else None, texts,
                               allowed_ids=frozenset(allowed_ids))
    return evaluate(tokenizer_invariants(), subject)


# --------------------------------------------------------------------------- layer 3: text


# Where each record kind holds text a chat marker must not be in: the prompt and every model
# output. "instructions": candidates and kept instructions (model-generated text too).
CHAT_MARKER_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "eval": ("prompt", "response"),  # an evaluation set has no response; evaluation outputs do
    "instructions": ("instruction",),
}


class NoChatMarkers(Invariant):
    """Layer 3. Prevents chat formatting leaking into the data or the outputs: a chat marker
    (any family of `cai.invariants.markers`) in a prompt trains or scores the model on chat
    structure the pipeline never declared, and one in a completion, chosen, rejected or
    evaluation response means the model produced (or will learn) chat turns. The fields
    checked follow the record kind (`CHAT_MARKER_FIELDS`). Names record id, field and marker."""

    name = "no_chat_markers"

    def __init__(self, kind: str | None = None):
        """kind: the record kind when the caller knows it (a stage's artifact: "instructions"
        for candidate/instruction records); default the RecordSet's kind, else the kind the
        fields show."""
        if kind is not None and kind not in CHAT_MARKER_FIELDS:
            raise ValueError(f"unknown record kind {kind!r}; known: {sorted(CHAT_MARKER_FIELDS)}")
        self.kind = kind

    def _records(self, subject) -> tuple[str, list[dict]]:
        if isinstance(subject, RecordSet):
            return self.kind or subject.kind, subject.records
        records = list(subject)
        if self.kind is not None:
            return self.kind, records
        if detect_kind(records) is None and records and "instruction" in records[0]:
            return "instructions", records
        rs = as_record_set(records)
        return rs.kind, rs.records

    def _check(self, subject):
        kind, records = self._records(subject)
        fields = CHAT_MARKER_FIELDS[kind]
        hits = []
        for i, rec in enumerate(records):
            for f in fields:
                value = rec.get(f)
                if isinstance(value, str) and (found := find_chat_markers(value)):
                    family, marker, pos = found[0]
                    hits.append({"record": record_id(rec, i), "field": f, "family": family, "marker": marker,
                                 "position": pos})
        if not hits:
            return True, f"no chat markers in {len(records)} {kind} record(s) (fields {', '.join(fields)})"
        n_records = len({str(h["record"]) for h in hits})
        h = hits[0]
        return False, (f"chat markers in {n_records} {kind} record(s); first: record {h['record']!r} {h['field']}: "
                       f"{h['family']} marker {h['marker']!r} at offset {h['position']}"), {"hits": hits[:50]}


# --------------------------------------------------------------------------- layer 5: behaviour


def _pig_latin(out: str) -> bool:
    low = out.lower()
    return "ellohay" in low and "orldway" in low


_PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97}


def _primes(out: str) -> bool:
    nums = {int(n) for n in re.findall(r"\b\d{1,2}\b", out[:300])}
    return len(nums & _PRIMES) >= 3


def _json_ab(out: str) -> bool:
    for m in re.finditer(r"\{[^{}]*\}", out):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and {"a", "b"} <= set(obj) and all(
                isinstance(obj[k], int) and not isinstance(obj[k], bool) for k in ("a", "b")):
            return True
    return False


def _seasons(out: str) -> bool:
    low = out.lower()
    return sum(any(w in low for w in ws) for ws in (("spring",), ("summer",), ("autumn", "fall"), ("winter",))) >= 3


SENTINELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("Translate to Pig Latin: hello world", _pig_latin),
    ("List three prime numbers", _primes),
    ("Write a JSON object with keys a and b holding integers", _json_ab),
    ("Describe the seasons", _seasons),
)


@dataclass
class ModelSubject:
    """A model to probe: `generate(prompts) -> list[str]` (raw continuations), and what is
    known about it (`source`, provenance)."""

    generate: Callable[[list[str]], list[str]]
    source: str = "?"
    provenance: dict[str, Any] = field(default_factory=dict)


def as_model_subject(subject, max_new_tokens: int = 48) -> ModelSubject:
    """Accept a ModelSubject, a `ModelSlot` / `LoadedModel` (anything with .model and
    .tokenizer), or a plain callable."""
    if isinstance(subject, ModelSubject):
        return subject
    if callable(subject) and not hasattr(subject, "tokenizer"):
        return ModelSubject(subject)
    from cai.pipeline.generation import HFGenerator  # lazy: torch

    gen = HFGenerator(subject.model, subject.tokenizer)
    prov = getattr(subject, "provenance", None) or {}

    def generate(prompts: list[str]) -> list[str]:
        return [g.text for g in gen.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=0.0)]

    return ModelSubject(generate, str(prov.get("source", "?")), prov)


def _known_instruction_tuned(s: ModelSubject) -> bool:
    prov = s.provenance or {}
    name = " ".join(str(v) for v in (s.source, prov.get("origin", {}).get("name", ""), prov.get("path", "")))
    return "instruct" in name.lower() or s.source == "embedded"


def _instruction_tuned_hint(s: ModelSubject) -> str:
    prov = s.provenance or {}
    shipped = prov.get("tokenizer", {}).get("chat_template", {}).get("shipped")
    if _known_instruction_tuned(s):
        return ("the checkpoint is instruction-tuned (the embedded SmolLM2-135M-Instruct is): "
                "clean answers are expected from it and do not by themselves mean a template leaked")
    if shipped:
        return "the checkpoint ships a chat template, a sign it is instruction-tuned; otherwise a template leaked"
    return "either a chat template leaked into generation or the 'base' checkpoint is instruction-tuned"


class SentinelBehaviour(Invariant):
    """Layer 5 (warning). A true base model fed a bare instruction ("Translate to Pig Latin:
    hello world") continues the text; it does not answer like an assistant. Clean answers
    mean a template leaked or the "base" checkpoint is already instruction-tuned: either
    way base-model scores are not a base-model measurement. Reported with the outputs."""

    name = "sentinel_instructions_unanswered"
    severity = Severity.WARN

    def __init__(self, max_new_tokens: int = 48, min_clean: int = 2):
        self.max_new_tokens = max_new_tokens
        self.min_clean = min_clean

    def _check(self, subject):
        s = as_model_subject(subject, self.max_new_tokens)
        prompts = [p for p, _ in SENTINELS]
        outputs = s.generate(prompts)
        rows = [{"instruction": p, "output": o, "clean_answer": bool(judge(o))}
                for (p, judge), o in zip(SENTINELS, outputs)]
        clean = [r for r in rows if r["clean_answer"]]
        shown = "; ".join(f"{r['instruction']!r} -> {_short(r['output'], 50)}" for r in rows)
        if len(clean) < self.min_clean:
            note = (" Note: the checkpoint is instruction-tuned (the embedded SmolLM2-135M-Instruct is), "
                    "so this is not a true base model." if _known_instruction_tuned(s) else "")
            return True, (f"{len(clean)}/{len(rows)} sentinel instructions answered cleanly when fed raw "
                          f"(warn at {self.min_clean}): {shown}.{note}"), {"outputs": rows}
        return False, (f"{len(clean)}/{len(rows)} sentinel instructions answered cleanly when fed raw; "
                       f"{_instruction_tuned_hint(s)}. Outputs: {shown}"), {"outputs": rows}
