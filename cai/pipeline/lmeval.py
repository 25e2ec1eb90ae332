"""lm-eval as the standard second opinion: cai's resident model, run through EleutherAI's
lm-evaluation-harness on tasks shipped with cai, under cai's invariants.

    report = run_lm_eval(slot.model, slot.tokenizer, limit=8)
    report["tasks"]["cai_mc"]["metrics"]["acc"]            # lm-eval's number
    report["canonical"]["cai_stage1_gen"]                    # cai's canonical metric, same responses

What is fixed here, and why:

* **Tasks are YAML files shipped in `cai/data/lmeval/`** (`cai_stage1_gen`: `generate_until`
  over cai's Stage-1 set; `cai_mc`: a hand-written `multiple_choice` log-likelihood set).
  They reference the hooks below with `!function cai.pipeline.lmeval.<name>`.
* **Data paths never depend on the current directory.** lm-eval's `dataset_path: json`
  resolves `data_files` against the CWD (STACK.md); our YAMLs use a `custom_dataset` hook
  (`load_task_dataset`) that resolves a relative `data_file` against the YAML's own folder
  and hands lm-eval an in-memory dataset. Nothing is generated into temp folders, and the
  YAML that ran is the file whose sha256 is reported.
* **One prompt builder.** `doc_to_text` is `formats.render(format, instruction)` -- the
  training format -- for both tasks; MC options are `formats.COMPLETION_PREFIX + option`.
  The format is passed as task metadata (`cai_format`). `LmEvalPromptParity` re-checks every
  context lm-eval built (before the run and again on the logged samples) against
  `formats.render` of the source record, read independently of lm-eval.
* **No chat template, no system prompt, no few-shot.** `apply_chat_template=False`; cai's
  tokenizer has no template and its `apply_chat_template` raises, so a call would abort.
* **No BOS or control token ids** (`LmEvalNoControlTokens`): the HFLM must say
  `add_bos_token=False`; no request may have an empty context or be a rolling
  log-likelihood (lm-eval prepends `prefix_token_id`, here `<|im_start|>`, to those); every
  context is encoded with HFLM's own `tok_encode` / `tok_batch_encode` / `_encode_pair` and
  must hold no special ids and equal cai's `encode`; and the ids lm-eval actually feeds the
  model are recorded during the run and checked again.
* **Comparable scores.** `process_results` calls cai's canonical `score_item` on the
  stripped response (as cai stores responses); `LmEvalScoreAgreement` recomputes the
  canonical `score()` from lm-eval's logged responses and requires identical numbers.

Importing this module is cheap: lm-eval, datasets and torch are imported on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cai.errors import BadInputError
from cai.invariants.base import Invariant, Severity, raise_on_failures
from cai.invariants.markers import control_token_ids
from cai.pipeline import formats

LMEVAL_DIR = Path(__file__).resolve().parent.parent / "data" / "lmeval"
DEFAULT_TASKS = ("cai_stage1_gen", "cai_mc")
DEFAULT_FORMAT = "instruction_response"
FORMAT_METADATA_KEY = "cai_format"
SCHEMAS = ("ifeval", "multiple_choice")
# What cai passes to lm-eval, and what LmEvalPromptParity checks was passed.
APPLY_CHAT_TEMPLATE = False
SYSTEM_INSTRUCTION = None
# lm-eval request types whose encoding prepends `prefix_token_id` regardless of the context.
ROLLING_REQUEST = "loglikelihood_rolling"
IFEVAL_METRICS = {  # lm-eval metric name -> cai ScoreReport field
    "prompt_level_strict_acc": "prompt_level_strict",
    "inst_level_strict_acc": "instruction_level_strict",
    "prompt_level_loose_acc": "prompt_level_loose",
    "inst_level_loose_acc": "instruction_level_loose",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


# --------------------------------------------------------------------------- data


def resolve_data_file(data_file: str | Path, config_source: str | None = None) -> Path:
    """An absolute `data_file` is used as is; a relative one resolves against the folder of
    the YAML that names it (lm-eval passes its path as metadata `config_source`), else
    against cai's shipped task folder -- never against the current directory."""
    path = Path(data_file).expanduser()
    if not path.is_absolute():
        base = LMEVAL_DIR
        if config_source and config_source != "inline" and Path(config_source).is_file():
            base = Path(config_source).resolve().parent
        path = base / path
    path = path.resolve()
    if not path.is_file():
        raise BadInputError(f"lm-eval task data {data_file!r} not found (resolved to {path})")
    return path


def _mc_problem(obj: dict) -> str | None:
    q, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
        return "id must be a string or an integer"
    if not isinstance(q, str) or not q.strip():
        return "question must be a non-empty string"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        return "choices must be a list of at least two non-empty strings"
    if len({c.strip() for c in choices}) != len(choices):
        return "choices must be distinct"
    if any(c != c.strip() for c in choices):
        return "choices must not carry leading/trailing whitespace (the format adds the separating space)"
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"answer must be an index into choices (0..{len(choices) - 1 if isinstance(choices, list) else '?'})"
    return None


def read_records(path: str | Path, schema: str) -> list[dict]:
    """The source records of a task's data file, validated line by line (a bad file fails
    with its name and line). `ifeval`: cai's eval schema (key, prompt, instruction_id_list,
    kwargs; `instruction` defaults to `prompt`). `multiple_choice`: id, question, choices,
    answer (index)."""
    from cai.pipeline.evaluate import _read_jsonl, load_ifeval_prompts

    if schema == "ifeval":
        items = load_ifeval_prompts(path)
        for it in items:
            it.setdefault("instruction", it["prompt"])
        return items
    if schema == "multiple_choice":
        rows, seen = [], set()
        for lineno, obj in _read_jsonl(path):
            problem = _mc_problem(obj)
            if problem:
                raise BadInputError(f"{path}:{lineno}: {problem}")
            if str(obj["id"]) in seen:
                raise BadInputError(f"{path}:{lineno}: duplicate id {obj['id']!r}")
            seen.add(str(obj["id"]))
            rows.append(obj)
        return rows
    raise BadInputError(f"unknown lm-eval task data schema {schema!r}; known: {list(SCHEMAS)}")


def record_key(schema: str, record: dict) -> str:
    return str(record["key"] if schema == "ifeval" else record["id"])


def _docs(records: list[dict], schema: str, format_name: str, path: Path) -> list[dict]:
    docs = []
    for rec in records:
        if rec.get("format") not in (None, format_name):
            raise BadInputError(
                f"{path}: record {record_key(schema, rec)!r} declares format {rec['format']!r} but the run "
                f"renders {format_name!r}")
        if schema == "ifeval":
            docs.append({
                "key": record_key(schema, rec),
                "instruction": rec["instruction"],
                "format": format_name,
                "instruction_id_list": list(rec["instruction_id_list"]),
                # the whole record, byte-faithful: `datasets` would otherwise unify the
                # heterogeneous `kwargs` dicts into one schema padded with None values.
                "cai_item": json.dumps(rec, ensure_ascii=False, sort_keys=True),
            })
        else:
            docs.append({
                "key": record_key(schema, rec),
                "instruction": rec["question"],
                "format": format_name,
                "choices": list(rec["choices"]),
                "answer": rec["answer"],
            })
        formats.render(format_name, docs[-1]["instruction"])  # refuse what cannot be rendered
    return docs


def load_task_dataset(data_file: str, schema: str, config_source: str | None = None,
                      split: str = "test", **metadata: Any):
    """lm-eval `custom_dataset` hook: the task's data as a `DatasetDict` with one split.

    Called by lm-eval with the task's metadata and `dataset_kwargs` as keyword arguments;
    `cai_format` (metadata) names the prompt format, default `instruction_response`."""
    import datasets

    format_name = metadata.get(FORMAT_METADATA_KEY) or DEFAULT_FORMAT
    formats.get_format(format_name)
    path = resolve_data_file(data_file, config_source)
    docs = _docs(read_records(path, schema), schema, format_name, path)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


# --------------------------------------------------------------------------- hooks


def doc_to_text(doc: dict) -> str:
    """lm-eval `doc_to_text` for both tasks: the training-format prompt, built by the one
    prompt builder."""
    return formats.render(doc["format"], doc["instruction"])


def doc_to_choice(doc: dict) -> list[str]:
    """lm-eval `doc_to_choice`: each option as the completion cai would append to the prompt."""
    return [formats.COMPLETION_PREFIX + c for c in doc["choices"]]


def process_results_ifeval(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` for the generate task: cai's canonical `score_item` on the
    stripped response (cai stores responses stripped), so lm-eval's numbers are cai's."""
    from cai.pipeline.evaluate import score_item

    r = score_item(json.loads(doc["cai_item"]), results[0].strip())
    return {
        "prompt_level_strict_acc": r["prompt_level_strict"],
        "inst_level_strict_acc": r["follow_instruction_list_strict"],
        "prompt_level_loose_acc": r["prompt_level_loose"],
        "inst_level_loose_acc": r["follow_instruction_list_loose"],
    }


def agg_inst_level_acc(items: Sequence[Sequence[bool]]) -> float:
    """Instruction-level accuracy: every instruction of every prompt pooled (IFEval's rule)."""
    flat = [x for sub in items for x in sub]
    return sum(flat) / len(flat) if flat else 0.0


# --------------------------------------------------------------------------- invariants


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
    task: str
    lm_eval_metrics: dict[str, float]
    canonical: Any  # ScoreReport


class LmEvalScoreAgreement(Invariant):
    """lm-eval's aggregated IFEval-style metrics equal cai's canonical `score()` recomputed
    from lm-eval's logged responses. Prevents two evaluation paths reporting different
    numbers for the same responses (the audit's "four incomparable scoring methods")."""

    name = "lmeval_score_agreement"
    severity = Severity.ERROR

    def _check(self, probe: ScoreAgreementProbe):
        diffs = []
        pairs = []
        for metric, fieldname in IFEVAL_METRICS.items():
            ours = getattr(probe.canonical, fieldname)
            theirs = probe.lm_eval_metrics.get(metric)
            pairs.append(f"{metric} {theirs} vs {ours}")
            if theirs is None or abs(float(theirs) - float(ours)) > 1e-12:
                diffs.append(f"{metric}: lm-eval {theirs} != canonical {ours}")
        if diffs:
            return False, f"{probe.task}: " + "; ".join(diffs)
        return True, f"{probe.task} over {probe.canonical.n_prompts} prompts, lm-eval == canonical: " + ", ".join(pairs)


# --------------------------------------------------------------------------- bridge


def build_hflm(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
    """Wrap the resident model (plain or PeftModel, adapters switched by the caller) in
    lm-eval's HFLM: the tokenizer as given (cai's, template disabled), `add_bos_token=False`
    explicitly, the model's device, no reloading."""
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size,
                              "add_bos_token": False}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(**kwargs)


def task_manager(format_name: str = DEFAULT_FORMAT, include_path: str | Path = LMEVAL_DIR):
    """A TaskManager that indexes only cai's task folder (not lm-eval's 10k built-in
    YAMLs) and tells every task which prompt format to render."""
    from lm_eval.tasks import TaskManager

    formats.get_format(format_name)
    return TaskManager(include_path=str(include_path), include_defaults=False,
                       metadata={FORMAT_METADATA_KEY: format_name})


def _round_robin(docs: list[dict], limit: int) -> list[int]:
    """Indices of `limit` docs taken in turn from each first instruction type (the rule of
    `compare.load_eval_set`), so a small slice still covers every type. File order kept."""
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(docs):
        by_type[d["instruction_id_list"][0]].append(i)
    queues = [by_type[t] for t in sorted(by_type)]
    picked: list[int] = []
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return sorted(picked)


class _IdRecorder:
    """Records the token ids HFLM passes to the model, by wrapping (on this instance only)
    `_loglikelihood_tokens` (receives the exact (context ids, continuation ids)) and
    `_model_generate` (receives the padded batch and its attention mask)."""

    def __init__(self, lm):
        self.lm = lm
        self.observed: dict[str, list] = {"loglikelihood": [], "generate_until": [], ROLLING_REQUEST: 0}

    def __enter__(self):
        lm, obs = self.lm, self.observed
        orig_ll, orig_gen, orig_roll = lm._loglikelihood_tokens, lm._model_generate, lm.loglikelihood_rolling

        def loglikelihood_tokens(requests, *args, **kwargs):
            for _, c_ids, k_ids in requests:
                obs["loglikelihood"].append((list(c_ids), list(k_ids)))
            return orig_ll(requests, *args, **kwargs)

        def model_generate(context, *args, **kwargs):
            mask = kwargs.get("attention_mask")
            rows = context.tolist()
            masks = mask.tolist() if mask is not None else [[1] * len(r) for r in rows]
            for row, m in zip(rows, masks):
                obs["generate_until"].append([i for i, keep in zip(row, m) if keep])
            return orig_gen(context, *args, **kwargs)

        def rolling(requests, *args, **kwargs):
            obs[ROLLING_REQUEST] += len(requests)
            return orig_roll(requests, *args, **kwargs)

        lm._loglikelihood_tokens = loglikelihood_tokens
        lm._model_generate = model_generate
        lm.loglikelihood_rolling = rolling
        return self

    def __exit__(self, *exc):
        for name in ("_loglikelihood_tokens", "_model_generate", "loglikelihood_rolling"):
            self.lm.__dict__.pop(name, None)


class _DropCustomDatasetNote(logging.Filter):
    """lm-eval logs a generic WARNING for every task with a `custom_dataset` hook ("Custom
    kwargs can be passed to `--metadata`..."); for cai's tasks it is expected, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _quiet_custom_dataset_note():
    logger = logging.getLogger("lm_eval.api.task")
    note = _DropCustomDatasetNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


@contextlib.contextmanager
def _preserve_rng():
    """simple_evaluate seeds Python, NumPy and torch globally; give the caller its state back."""
    import numpy as np
    import torch

    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def _task_info(task) -> dict[str, Any]:
    cfg = task.config
    meta = cfg.metadata or {}
    yaml_path = Path(meta["config_source"]) if meta.get("config_source") not in (None, "inline") else None
    dk = cfg.dataset_kwargs or {}
    if "data_file" not in dk or "schema" not in dk:
        raise BadInputError(f"lm-eval task {cfg.task!r} is not a cai task: it must load its data with "
                            "cai.pipeline.lmeval.load_task_dataset (dataset_kwargs data_file + schema)")
    data_path = resolve_data_file(dk["data_file"], str(yaml_path) if yaml_path else None)
    return {"output_type": cfg.output_type, "schema": dk["schema"],
            "yaml": str(yaml_path) if yaml_path else None,
            "yaml_sha256": _sha256(yaml_path) if yaml_path else None,
            "data_file": str(data_path), "data_sha256": _sha256(data_path)}


def _requests_of(task, schema: str, name: str) -> list[dict]:
    return [{"task": name, "schema": schema, "request_type": inst.request_type, "key": str(inst.doc["key"]),
             "args": tuple(inst.args)} for inst in task.instances]


def run_lm_eval(model, tokenizer, *, tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = None,
                batch_size: int = 8, format_name: str = DEFAULT_FORMAT, lm=None,
                max_gen_toks: int | None = None, cross_check: bool = False,
                raise_on_failure: bool = True) -> dict[str, Any]:
    """Run cai's lm-eval tasks on the resident model; return lm-eval's metrics beside the
    canonical metric, with provenance and invariant results.

    `limit`: docs per task (generate task: round-robin over instruction types; MC: the
    first `limit`); None = all. `lm`: an HFLM to use instead of `build_hflm(model,
    tokenizer)` -- it is checked like ours. `max_gen_toks`: override the YAML's 128.
    `cross_check`: also generate with cai's own `HFGenerator` (same prompts, stops, greedy)
    and score canonically, reporting how many responses are identical.

    Error-severity invariants are checked before any compute (prompts, encodings) and after
    the run (observed ids, logged contexts, score agreement); a failure raises
    `InvariantError` unless `raise_on_failure=False`, in which case the report carries it."""
    with _preserve_rng():  # lm-eval seeds (and its tasks draw from) the global RNGs
        return _run(model, tokenizer, tasks=tasks, limit=limit, batch_size=batch_size, format_name=format_name,
                    lm=lm, max_gen_toks=max_gen_toks, cross_check=cross_check, raise_on_failure=raise_on_failure)


def _run(model, tokenizer, *, tasks, limit, batch_size, format_name, lm, max_gen_toks, cross_check,
         raise_on_failure) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    from cai.pipeline.evaluate import score

    started = time.perf_counter()
    formats.get_format(format_name)
    tasks = list(tasks)
    if not tasks:
        raise BadInputError("no lm-eval tasks given")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadInputError(f"limit must be a positive integer or None, got {limit!r}")
    if lm is None:
        lm = build_hflm(model, tokenizer, batch_size=batch_size)
    tm = task_manager(format_name)
    unknown = [t for t in tasks if t not in tm.all_subtasks]
    if unknown:
        raise BadInputError(f"unknown lm-eval task(s) {unknown}; cai ships {tm.all_subtasks} in {LMEVAL_DIR}")
    with _quiet_custom_dataset_note():
        loaded = tm.load(tasks)["tasks"]
    stops = list(formats.stop_sequences(format_name))

    info, records, samples = {}, {}, {}
    for name, task in loaded.items():
        info[name] = _task_info(task)
        schema = info[name]["schema"]
        records[name] = {record_key(schema, r): r for r in read_records(info[name]["data_file"], schema)}
        if task.config.output_type == "generate_until":
            gk = {"until": stops, "do_sample": False, "temperature": 0.0}
            if max_gen_toks is not None:
                gk["max_gen_toks"] = int(max_gen_toks)
            task.set_config(key="generation_kwargs", value=gk, update=True)
        docs = list(task.eval_docs)
        if limit is not None and limit < len(docs):
            samples[name] = _round_robin(docs, limit) if schema == "ifeval" else list(range(limit))

    # ---- before any compute: build the requests lm-eval will run and check them
    built: list[dict] = []
    for name, task in loaded.items():
        task.build_all_requests(samples=samples.get(name), apply_chat_template=APPLY_CHAT_TEMPLATE,
                                system_instruction=SYSTEM_INSTRUCTION)
        built += _requests_of(task, info[name]["schema"], name)
    fewshot = {name: task.config.num_fewshot for name, task in loaded.items()}
    enc_inv, par_inv = LmEvalNoControlTokens(), LmEvalPromptParity()
    pre = [
        enc_inv.check(EncodingProbe(lm, [(r["request_type"], r["args"]) for r in built])),
        par_inv.check(ParityProbe(format_name, lm.tokenizer, built, records, APPLY_CHAT_TEMPLATE,
                                  SYSTEM_INSTRUCTION, fewshot, "built")),
    ]
    if raise_on_failure:
        raise_on_failures(pre)

    # ---- the run
    recorder = _IdRecorder(lm)
    lm_started = time.perf_counter()
    with recorder:
        out = simple_evaluate(model=lm, tasks=list(loaded.values()), samples=samples or None,
                              apply_chat_template=APPLY_CHAT_TEMPLATE, system_instruction=SYSTEM_INSTRUCTION,
                              fewshot_as_multiturn=False, log_samples=True, task_manager=tm)
    lm_seconds = time.perf_counter() - lm_started
    fewshot_run = {name: out.get("n-shot", {}).get(name, fewshot[name]) for name in loaded}

    # ---- after: what really ran
    logged: list[dict] = []
    responses: dict[str, dict[str, str]] = defaultdict(dict)
    contexts: dict[str, dict[str, str]] = defaultdict(dict)
    for name in loaded:
        schema = info[name]["schema"]
        for s in out["samples"][name]:
            key = str(s["doc"]["key"])
            for args in s["arguments"]:
                rtype = "generate_until" if info[name]["output_type"] == "generate_until" else "loglikelihood"
                logged.append({"task": name, "schema": schema, "request_type": rtype, "key": key, "args": tuple(args)})
            if schema == "ifeval":
                responses[name][key] = s["filtered_resps"][0]
                contexts[name][key] = s["arguments"][0][0]
    post = [
        enc_inv.check(EncodingProbe(lm, [(r["request_type"], r["args"]) for r in logged], recorder.observed)),
        par_inv.check(ParityProbe(format_name, lm.tokenizer, logged, records, APPLY_CHAT_TEMPLATE,
                                  SYSTEM_INSTRUCTION, fewshot_run, "logged")),
    ]

    report_tasks: dict[str, Any] = {}
    canonical: dict[str, Any] = {}
    for name in loaded:
        res = out["results"][name]
        metrics = {k.split(",")[0]: v for k, v in res.items()
                   if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        stderr = {k.split(",")[0][:-len("_stderr")]: v for k, v in res.items()
                  if k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        report_tasks[name] = {**info[name], "metrics": metrics, "stderr": stderr,
                              "n": len(out["samples"][name]),
                              "doc_keys": [str(s["doc"]["key"]) for s in out["samples"][name]]}
        if info[name]["schema"] == "ifeval":
            report_tasks[name]["contexts"] = dict(contexts[name])
            items = [records[name][k] for k in responses[name]]
            resp_rows = [{"key": it["key"], "response": responses[name][str(it["key"])].strip()} for it in items]
            rep = score(items, resp_rows)
            post.append(LmEvalScoreAgreement().check(ScoreAgreementProbe(name, metrics, rep)))
            canonical[name] = {"scorer": "cai.pipeline.evaluate.score (lm-eval responses, stripped)",
                               **{f: getattr(rep, f) for f in IFEVAL_METRICS.values()},
                               "n_prompts": rep.n_prompts, "n_instructions": rep.n_instructions,
                               "prompt_level_strict_correct": rep.prompt_level_strict_correct,
                               "responses": {str(it["key"]): r["response"] for it, r in zip(items, resp_rows)}}
            if cross_check:
                canonical[name]["cai_generation"] = _cross_check(
                    model, tokenizer, items, resp_rows, format_name,
                    loaded[name].config.generation_kwargs.get("max_gen_toks", 128), batch_size)

    invariants = pre + post
    if raise_on_failure:
        raise_on_failures(post)
    return {
        "lm_eval_version": lm_eval_version(),
        "format": format_name,
        "settings": {"apply_chat_template": APPLY_CHAT_TEMPLATE, "system_instruction": SYSTEM_INSTRUCTION,
                     "num_fewshot": fewshot_run,
                     "limit": limit, "batch_size": getattr(lm, "batch_size", batch_size),
                     "add_bos_token": getattr(lm, "add_bos_token", None),
                     "prefix_token_id": getattr(lm, "prefix_token_id", None),
                     "max_length": getattr(lm, "max_length", None), "stop": stops,
                     "generation_kwargs": {n: dict(t.config.generation_kwargs or {}) for n, t in loaded.items()
                                           if t.config.output_type == "generate_until"}},
        "tasks": report_tasks,
        "task_yaml_sha256": {n: i["yaml_sha256"] for n, i in info.items()},
        "canonical": canonical,
        "bos_invariant": post[0].to_json(),
        "invariants": [r.to_json() for r in invariants],
        "passed": not any(r.blocking for r in invariants),
        "seconds": {"lm_eval": round(lm_seconds, 2), "total": round(time.perf_counter() - started, 2)},
    }


def _cross_check(model, tokenizer, items: list[dict], lm_rows: list[dict], format_name: str,
                 max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """The same prompts through cai's own generation path, scored canonically."""
    from cai.pipeline.evaluate import score
    from cai.pipeline.generation import HFGenerator

    gen = HFGenerator(model, tokenizer, batch_size=batch_size)
    prompts = [formats.render(format_name, it.get("instruction", it["prompt"])) for it in items]
    outs = gen.generate(prompts, max_new_tokens=int(max_new_tokens), temperature=0.0,
                        stop=formats.stop_sequences(format_name))
    rows = [{"key": it["key"], "response": o.text.strip()} for it, o in zip(items, outs)]
    rep = score(items, rows)
    differ = [str(it["key"]) for it, a, b in zip(items, rows, lm_rows) if a["response"] != b["response"]]
    return {**{f: getattr(rep, f) for f in IFEVAL_METRICS.values()},
            "prompt_level_strict_correct": rep.prompt_level_strict_correct,
            "identical_responses": len(items) - len(differ), "n": len(items), "differing_keys": differ}
