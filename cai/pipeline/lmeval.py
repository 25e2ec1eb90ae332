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
* **An independent second opinion.** The generate task is scored by lm-eval's own IFEval
  `process_results`, unmodified, aggregated by its `agg_inst_level_acc` (`utils.py` beside
  the YAML imports both from `lm_eval.tasks.ifeval.utils`), on the response after lm-eval's
  `remove_whitespace` filter (cai stores responses stripped). `LmEvalScoreAgreement`
  rescores every logged sample's response text with cai's canonical `score_item` and
  requires the same verdicts item by item. Both sides use cai's shipped punkt_tab and the
  same langdetect seed (`cai.pipeline.evaluate`).
* The invariants live in `cai.invariants.lmeval`; this module runs them.

Importing this module is cheap: lm-eval, datasets and torch are imported on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from cai.errors import BadInputError
from cai.invariants.base import raise_on_failures
from cai.invariants.lmeval import (IFEVAL_METRICS, LMEVAL_IFEVAL_SCORER, ROLLING_REQUEST, EncodingProbe,
                                   LmEvalNoControlTokens, LmEvalPromptParity, LmEvalScoreAgreement, ParityProbe,
                                   ScoreAgreementProbe)
from cai.pipeline import formats

LMEVAL_DIR = Path(__file__).resolve().parent.parent / "data" / "lmeval"
DEFAULT_TASKS = ("cai_stage1_gen", "cai_mc")
DEFAULT_FORMAT = "instruction_response"
FORMAT_METADATA_KEY = "cai_format"
SCHEMAS = ("ifeval", "multiple_choice")
# What cai passes to lm-eval, and what LmEvalPromptParity checks was passed.
APPLY_CHAT_TEMPLATE = False
SYSTEM_INSTRUCTION = None
# cai's ScoreReport fields reported beside lm-eval's IFEval metrics.
CANONICAL_FIELDS = tuple(report_field for _, report_field in IFEVAL_METRICS.values())


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
            # what lm-eval's IFEval `process_results` reads (key, prompt, instruction_id_list,
            # kwargs), as its own IFEval task gets it: `datasets` unifies the kwargs dicts into
            # one schema padded with None, which lm-eval's checkers drop (LmEvalScoreAgreement
            # scores cai's side from the source file, so a value lost here shows up there).
            docs.append({
                "key": record_key(schema, rec),
                "prompt": rec["prompt"],
                "instruction": rec["instruction"],
                "format": format_name,
                "instruction_id_list": list(rec["instruction_id_list"]),
                "kwargs": [dict(kw) for kw in rec["kwargs"]],
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
    import pyarrow as pa

    format_name = metadata.get(FORMAT_METADATA_KEY) or DEFAULT_FORMAT
    formats.get_format(format_name)
    path = resolve_data_file(data_file, config_source)
    docs = _docs(read_records(path, schema), schema, format_name, path)
    try:
        return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise BadInputError(f"{path}: the records do not fit one table schema (an argument with two types?): "
                            f"{str(err).splitlines()[0]}") from err


# --------------------------------------------------------------------------- hooks


def doc_to_text(doc: dict) -> str:
    """lm-eval `doc_to_text` for both tasks: the training-format prompt, built by the one
    prompt builder."""
    return formats.render(doc["format"], doc["instruction"])


def doc_to_choice(doc: dict) -> list[str]:
    """lm-eval `doc_to_choice`: each option as the completion cai would append to the prompt."""
    return [formats.COMPLETION_PREFIX + c for c in doc["choices"]]


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
    import langdetect
    from lm_eval import simple_evaluate

    from cai.pipeline.evaluate import _pin_langdetect, score

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
    _pin_langdetect()  # lm-eval's process_results runs with the seed cai's score_item pins
    with recorder:
        out = simple_evaluate(model=lm, tasks=list(loaded.values()), samples=samples or None,
                              apply_chat_template=APPLY_CHAT_TEMPLATE, system_instruction=SYSTEM_INSTRUCTION,
                              fewshot_as_multiturn=False, log_samples=True, task_manager=tm)
    lm_seconds = time.perf_counter() - lm_started
    langdetect_seed = langdetect.DetectorFactory.seed
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
            resp_rows = [{"key": it["key"], "response": responses[name][str(it["key"])]} for it in items]
            post.append(LmEvalScoreAgreement().check(ScoreAgreementProbe(
                name, loaded[name].config.process_results, out["samples"][name], records[name], metrics,
                langdetect_seed)))
            report_tasks[name]["scorer"] = LMEVAL_IFEVAL_SCORER
            rep = score(items, resp_rows)
            canonical[name] = {"scorer": "cai.pipeline.evaluate.score (the responses lm-eval scored)",
                               **{f: getattr(rep, f) for f in CANONICAL_FIELDS},
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
    return {**{f: getattr(rep, f) for f in CANONICAL_FIELDS},
            "prompt_level_strict_correct": rep.prompt_level_strict_correct,
            "identical_responses": len(items) - len(differ), "n": len(items), "differing_keys": differ}
