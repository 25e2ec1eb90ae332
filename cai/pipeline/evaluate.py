"""Canonical scoring: IFEval-style verifiable checks, the one metric cai reports.

Why this module exists: an audited predecessor had four evaluation scripts with four
incomparable scoring methods, and one "improvement" that was really a length heuristic.
Here every score comes from lm-eval's own IFEval checkers (`lm_eval.tasks.ifeval`), reused
unchanged, so a cai number means what an IFEval number means. Three things make those
checkers fit for a canonical metric, and all are fixed here rather than left to luck:

* Determinism: `langdetect` (used by the language and case checkers) is random unless
  `DetectorFactory.seed` is set; unseeded, the same text can score differently from run
  to run (a prompt or two on IFEval). We pin it before every item.
* Some checkers replace a missing or invalid argument by a value drawn from Python's
  global `random` (IFEval's own keys 1122 and 1129 ask for the "letters" "#" and "!",
  which `keywords:letter_frequency` swaps for a random letter), so their verdict depended on
  whatever ran before. We seed `random` per item (and restore the caller's state), and
  list every such substitution in the report's notes.
* Offline: the checkers count sentences with NLTK's Punkt, whose `punkt_tab` data is
  normally fetched at import by `nltk.download`. cai ships a minimal English model in
  `cai/data/nltk` and puts it first on `nltk.data.path` before the checkers are imported,
  so lm-eval finds the data and never tries the network.

Importing this module is cheap; lm-eval and NLTK are imported on first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from cai.errors import BadInputError

# langdetect's documented way to get reproducible results is `DetectorFactory.seed = 0`
# (the example in its README). We take that value because it is the documented one, not
# because of the score it gives; any fixed seed would do, and changing it can move IFEval
# results by a prompt or two, so it is part of the metric's definition.
LANGDETECT_SEED = 0

# cai's shipped Stage-1 evaluation set (see cai/data/eval/README.md).
STAGE1_EVAL_SET = Path(__file__).resolve().parent.parent / "data" / "eval" / "stage1_eval.jsonl"

# The shipped Punkt data: cai/data/nltk/tokenizers/punkt_tab/english/<these files>,
# exactly the files `nltk.tokenize.punkt.load_punkt_params` opens.
NLTK_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "nltk"
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")

# Seed for Python's `random` around each checker call. 0 because lm-eval's
# `simple_evaluate(random_seed=0)` seeds `random` with 0 by default; what matters is that
# it is fixed and reseeded per item, so a verdict does not depend on item order.
CHECKER_RANDOM_SEED = 0

REQUIRED_PROMPT_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


# --------------------------------------------------------------------------- checkers


def _refuse_download(*args: Any, **kwargs: Any) -> bool:
    raise BadInputError(
        "cai's scorer never downloads NLTK data; the shipped punkt_tab was not found "
        f"under {NLTK_DATA_DIR} (reinstall cai)"
    )


def _use_shipped_punkt() -> None:
    """Make NLTK resolve `tokenizers/punkt_tab/english` to cai's shipped copy.

    It goes *first* on `nltk.data.path` (not last): a full `punkt_tab` in a user's
    `~/nltk_data` would otherwise win and count sentences differently, so the same
    responses would score differently on different machines."""
    import nltk

    lang_dir = NLTK_DATA_DIR / "tokenizers" / "punkt_tab" / "english"
    missing = [name for name in PUNKT_FILES if not (lang_dir / name).is_file()]
    if missing:
        raise BadInputError(
            f"cai's shipped NLTK punkt_tab data is incomplete: {lang_dir} lacks "
            f"{', '.join(missing)} (reinstall cai; it is package data, never downloaded)"
        )
    root = str(NLTK_DATA_DIR)
    if not nltk.data.path or nltk.data.path[0] != root:
        with contextlib.suppress(ValueError):
            nltk.data.path.remove(root)
        nltk.data.path.insert(0, root)
    try:
        found = Path(str(nltk.data.find("tokenizers/punkt_tab/english/")))
    except LookupError as err:  # pragma: no cover - only if nltk refuses the directory
        raise BadInputError(f"NLTK cannot read cai's punkt_tab data at {lang_dir}: {err}") from err
    if found.resolve() != lang_dir.resolve():  # pragma: no cover - defensive
        raise BadInputError(f"NLTK resolved punkt_tab to {found}, not cai's copy at {lang_dir}")


@lru_cache(maxsize=1)
def _ifeval():
    """Import lm-eval's IFEval modules offline; returns (utils, instructions_registry).

    While importing, `nltk.download` is replaced by a function that raises, so even if the
    data were not found the import cannot reach (or hang on) the network."""
    _use_shipped_punkt()
    import langdetect
    import nltk

    original = nltk.download
    nltk.download = _refuse_download
    try:
        from lm_eval.tasks.ifeval import instructions_registry, instructions_util, utils
    finally:
        nltk.download = original
    # Tokenizers loaded before our path was set (by other code) are cached: drop them.
    instructions_util._get_sentence_tokenizer.cache_clear()
    with contextlib.suppress(AttributeError):
        nltk.tokenize._get_punkt_tokenizer.cache_clear()
    langdetect.DetectorFactory.seed = LANGDETECT_SEED
    return utils, instructions_registry


def _pin_langdetect() -> None:
    # Re-pinned per item: another library in the process may have changed it.
    import langdetect

    langdetect.DetectorFactory.seed = LANGDETECT_SEED


def supported_instruction_ids() -> list[str]:
    """The instruction ids lm-eval's IFEval registry can check."""
    return sorted(_ifeval()[1].INSTRUCTION_DICT)


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, (list, tuple)):
        return sorted({_norm(v) for v in value})
    return value


def validate_item(item: dict) -> list[str]:
    """Refuse an item whose checkers are not fully specified; return the substitutions.

    lm-eval's checkers silently draw a *random* value for an argument that is missing or
    falsy (its kwargs filter drops falsy values) -- refused here, since nothing in the
    data would say what was checked. Unknown ids or arguments are refused too. An argument
    that is present but invalid for its checker (e.g. letter "!") is also replaced by a
    random value; real IFEval data has one, so it is scored (with `random` seeded) and
    returned as a note instead of refused."""
    _, registry = _ifeval()
    key = item.get("key")
    notes = []
    for iid, kwargs in zip(item["instruction_id_list"], item["kwargs"]):
        cls = registry.INSTRUCTION_DICT.get(iid)
        if cls is None:
            raise BadInputError(f"item {key}: unknown instruction id {iid!r}")
        given = {k: v for k, v in (kwargs or {}).items() if v}
        checker = cls(iid)
        state = random.getstate()
        try:
            random.seed(CHECKER_RANDOM_SEED)
            checker.build_description(**given)
        except (TypeError, ValueError) as err:
            raise BadInputError(f"item {key}: bad kwargs for {iid}: {err}") from err
        finally:
            random.setstate(state)
        absent = [k for k in checker.get_instruction_args_keys() if k not in given]
        if absent:
            raise BadInputError(
                f"item {key}: {iid} lacks {', '.join(absent)} (the checker would pick a random value)"
            )
        used = checker.get_instruction_args() or {}
        for k, v in given.items():
            if k in used and _norm(used[k]) != _norm(v):
                notes.append(f"item {key}: {iid} replaced invalid {k}={v!r} by {used[k]!r} (seeded)")
    return notes


def describe_constraint(instruction_id: str, seed: int) -> tuple[str, dict]:
    """(instruction text, kwargs) of one IFEval constraint, written by lm-eval's own checker:
    `build_description()` draws the arguments (a word count, keywords, an end phrase) from
    `random`, seeded here with `seed` and restored after, so the same seed gives the same
    constraint. The kwargs are complete: `validate_item` accepts them unchanged."""
    _, registry = _ifeval()
    checker = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    state = random.getstate()
    try:
        random.seed(seed)
        description = checker.build_description()
    finally:
        random.setstate(state)
    return " ".join(description.split()), dict(checker.get_instruction_args() or {})


# --------------------------------------------------------------------------- loading


def _read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a user's file: bad input if bad or empty."""
    from cai.pipeline.store import numbered_jsonl

    rows = numbered_jsonl(path, error=BadInputError)
    if not rows:
        raise BadInputError(f"{path}: no records")
    return rows


def _prompt_problem(obj: dict) -> str | None:
    missing = [f for f in REQUIRED_PROMPT_FIELDS if f not in obj]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(obj["key"], (int, str)) or isinstance(obj["key"], bool):
        return "key must be an integer or a string"
    if not isinstance(obj["prompt"], str):
        return "prompt must be a string"
    ids, kwargs = obj["instruction_id_list"], obj["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return "instruction_id_list must be a non-empty list of strings"
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        return "kwargs must be a list of objects"
    if len(kwargs) != len(ids):
        return f"{len(ids)} instruction ids but {len(kwargs)} kwargs"
    return None


def load_ifeval_prompts(path: str | Path) -> list[dict]:
    """Read IFEval-schema prompts (`key, prompt, instruction_id_list, kwargs`; extra fields
    kept). Checked line by line so a bad file fails with its name and line number, and keys
    must be unique because responses may be joined by key."""
    items, seen = [], {}
    for lineno, obj in _read_jsonl(path):
        problem = _prompt_problem(obj)
        if problem:
            raise BadInputError(f"{path}:{lineno}: {problem}")
        k = str(obj["key"])
        if k in seen:
            raise BadInputError(f"{path}:{lineno}: duplicate key {obj['key']!r} (first on line {seen[k]})")
        seen[k] = lineno
        items.append(obj)
    return items


def load_responses(path: str | Path) -> list[dict]:
    """Read responses: each line has a string `response` and a `key` or the `prompt` it
    answers (the IFEval response files carry only `prompt`). Extra fields are kept."""
    rows = []
    for lineno, obj in _read_jsonl(path):
        if not isinstance(obj.get("response"), str):
            raise BadInputError(f"{path}:{lineno}: missing or non-string field 'response'")
        if "key" not in obj and not isinstance(obj.get("prompt"), str):
            raise BadInputError(f"{path}:{lineno}: needs a 'key' or a string 'prompt' to join on")
        rows.append(obj)
    return rows


# --------------------------------------------------------------------------- joining


def join_responses(prompts: Sequence[dict], responses: Sequence[dict]) -> tuple[list[tuple[dict, dict]], list[str]]:
    """Pair every prompt with its response; returns (pairs in prompt order, notes).

    Order of preference, per prompt: the response with the same `key`; else the one
    whose `prompt` text is identical; else -- only when the response on the same line
    has no key and its prompt text matches no prompt at all -- that response (line
    order). The last case exists because the public IFEval response file's prompt for
    key 2785 differs from input_data.jsonl; it is reported in the notes, never silent.
    A prompt left without a response is a BadInputError; unused responses are noted."""
    by_key: dict[str, int] = {}
    by_text: dict[str, list[int]] = {}
    for j, r in enumerate(responses):
        if "key" in r:
            k = str(r["key"])
            if k in by_key:
                raise BadInputError(f"responses {by_key[k] + 1} and {j + 1} both have key {r['key']!r}")
            by_key[k] = j
        else:
            by_text.setdefault(r.get("prompt"), []).append(j)
    prompt_texts = {p["prompt"] for p in prompts}
    used: set[int] = set()
    pairs, how = [], {"key": 0, "prompt text": 0, "line order": 0}
    line_order_keys, missing = [], []
    for i, p in enumerate(prompts):
        j = by_key.get(str(p["key"]))
        method = "key"
        if j is None:
            method = "prompt text"
            j = next((c for c in by_text.get(p["prompt"], []) if c not in used), None)
        if j is None and i < len(responses):
            cand = responses[i]
            if "key" not in cand and cand.get("prompt") not in prompt_texts and i not in used:
                j, method = i, "line order"
                line_order_keys.append(p["key"])
        if j is None or j in used:
            missing.append(p["key"])
            continue
        used.add(j)
        how[method] += 1
        pairs.append((p, responses[j]))
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise BadInputError(f"{len(missing)} of {len(prompts)} prompts have no response (keys {shown})")
    notes = ["joined " + ", ".join(f"{n} by {m}" for m, n in how.items() if n)]
    if line_order_keys:
        notes.append(
            f"{len(line_order_keys)} joined by line order because the response's prompt text differs "
            f"from the prompt's (keys {', '.join(map(str, line_order_keys))})"
        )
    if len(used) < len(responses):
        notes.append(f"{len(responses) - len(used)} response(s) matched no prompt and were ignored")
    return pairs, notes


# --------------------------------------------------------------------------- scoring


def score_item(item: dict, response: str) -> dict:
    """Score one response with lm-eval's `test_instruction_following_strict` and `_loose`
    (loose also accepts the response without its first/last line or without `*`), so
    results agree item by item with lm-eval's IFEval `process_results`."""
    utils, _ = _ifeval()
    _pin_langdetect()
    inp = utils.InputExample(
        key=item["key"],
        instruction_id_list=item["instruction_id_list"],
        prompt=item["prompt"],
        kwargs=item["kwargs"],
    )
    state = random.getstate()
    try:
        # Reseeded before each pass so strict and loose check the same arguments.
        random.seed(CHECKER_RANDOM_SEED)
        strict = utils.test_instruction_following_strict(inp, response)
        random.seed(CHECKER_RANDOM_SEED)
        loose = utils.test_instruction_following_loose(inp, response)
    finally:
        random.setstate(state)
    return {
        "key": item["key"],
        "instruction_id_list": list(item["instruction_id_list"]),
        "follow_instruction_list_strict": [bool(x) for x in strict.follow_instruction_list],
        "follow_instruction_list_loose": [bool(x) for x in loose.follow_instruction_list],
        "prompt_level_strict": bool(strict.follow_all_instructions),
        "prompt_level_loose": bool(loose.follow_all_instructions),
    }


@dataclasses.dataclass
class ScoreReport:
    """IFEval's four accuracies plus the counts behind them, per-instruction accuracy
    (so a gain can be traced to instruction types) and every item's result (so paired
    statistics and discordant-item listings can be computed from the report alone)."""

    prompt_level_strict: float
    instruction_level_strict: float
    prompt_level_loose: float
    instruction_level_loose: float
    n_prompts: int
    n_instructions: int
    prompt_level_strict_correct: int
    instruction_level_strict_correct: int
    prompt_level_loose_correct: int
    instruction_level_loose_correct: int
    per_instruction: dict[str, dict[str, float]]
    items: list[dict]
    notes: list[str] = dataclasses.field(default_factory=list)
    langdetect_seed: int = LANGDETECT_SEED
    checker_random_seed: int = CHECKER_RANDOM_SEED
    scorer: str = "lm_eval.tasks.ifeval"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def _frac(num: int, den: int) -> float:
    return num / den if den else 0.0


def score(prompts: Sequence[dict], responses: Sequence[dict]) -> ScoreReport:
    """Join responses to prompts, check every item's kwargs, score each item and aggregate
    the way IFEval does: prompt level = all instructions of a prompt followed, instruction
    level = over all instructions pooled."""
    pairs, notes = join_responses(prompts, responses)
    for item, _ in pairs:
        notes.extend(validate_item(item))
    items = []
    for item, resp in pairs:
        result = score_item(item, resp["response"])
        result["response_chars"] = len(resp["response"])
        items.append(result)
    return _aggregate(items, notes)


def _aggregate(items: Iterable[dict], notes: list[str]) -> ScoreReport:
    items = list(items)
    per: dict[str, list[int]] = {}
    n_inst = s_inst = l_inst = 0
    for it in items:
        for iid, s, lo in zip(it["instruction_id_list"], it["follow_instruction_list_strict"], it["follow_instruction_list_loose"]):
            c = per.setdefault(iid, [0, 0, 0])
            c[0] += 1
            c[1] += s
            c[2] += lo
            n_inst += 1
            s_inst += s
            l_inst += lo
    s_prompt = sum(it["prompt_level_strict"] for it in items)
    l_prompt = sum(it["prompt_level_loose"] for it in items)
    n = len(items)
    return ScoreReport(
        prompt_level_strict=_frac(s_prompt, n),
        instruction_level_strict=_frac(s_inst, n_inst),
        prompt_level_loose=_frac(l_prompt, n),
        instruction_level_loose=_frac(l_inst, n_inst),
        n_prompts=n,
        n_instructions=n_inst,
        prompt_level_strict_correct=s_prompt,
        instruction_level_strict_correct=s_inst,
        prompt_level_loose_correct=l_prompt,
        instruction_level_loose_correct=l_inst,
        per_instruction={
            iid: {"n": c[0], "strict": _frac(c[1], c[0]), "loose": _frac(c[2], c[0])}
            for iid, c in sorted(per.items())
        },
        items=items,
        notes=notes,
    )


# --------------------------------------------------------------------------- CLI


def _print_text(report: ScoreReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False)
    table = Table(title=f"IFEval-style scores ({report.n_prompts} prompts, {report.n_instructions} instructions)")
    table.add_column("level")
    table.add_column("strict", justify="right")
    table.add_column("loose", justify="right")
    table.add_row(
        "prompt",
        f"{report.prompt_level_strict_correct}/{report.n_prompts} = {report.prompt_level_strict:.4f}",
        f"{report.prompt_level_loose_correct}/{report.n_prompts} = {report.prompt_level_loose:.4f}",
    )
    table.add_row(
        "instruction",
        f"{report.instruction_level_strict_correct}/{report.n_instructions} = {report.instruction_level_strict:.4f}",
        f"{report.instruction_level_loose_correct}/{report.n_instructions} = {report.instruction_level_loose:.4f}",
    )
    console.print(table)
    per = Table(title="per instruction")
    per.add_column("instruction id")
    per.add_column("n", justify="right")
    per.add_column("strict", justify="right")
    per.add_column("loose", justify="right")
    for iid, v in report.per_instruction.items():
        per.add_row(iid, str(v["n"]), f"{v['strict']:.3f}", f"{v['loose']:.3f}")
    console.print(per)
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(
        f"note: langdetect seed {report.langdetect_seed}, checker random seed "
        f"{report.checker_random_seed}; checkers from {report.scorer}"
    )


def cli_main(args) -> int:
    """`cai score --prompts P --responses R [--format text|json]`: score responses made
    anywhere with the canonical metric. Bad input raises BadInputError (exit 2)."""
    prompts = load_ifeval_prompts(args.prompts)
    responses = load_responses(args.responses)
    report = score(prompts, responses)
    if getattr(args, "format", "text") == "json":
        sys.stdout.write(report.to_json() + "\n")
    else:
        _print_text(report)
    return 0
