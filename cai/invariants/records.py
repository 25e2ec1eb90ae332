"""Records and record sets: the subject of the data, leakage and parity invariants, kept
apart from the invariants themselves so every invariant module imports it one way.

Record schemas follow DESIGN.md "Records"; extra fields are allowed and kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cai.errors import BadInputError
from cai.pipeline.store import read_jsonl

KINDS = ("sft", "preference", "eval")


@dataclass
class RecordSet:
    """The subject of data invariants: records of one kind, and where they came from."""

    kind: str
    records: list[dict[str, Any]]
    path: str | Path | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown record kind {self.kind!r}; known: {KINDS}")

    def __len__(self) -> int:
        return len(self.records)


def detect_kind(records: Sequence[dict]) -> str | None:
    """Record kind from the fields of the first record: chosen+rejected -> preference,
    completion -> sft, instruction_id_list (or key + prompt: evaluation responses) -> eval;
    None when none fits."""
    if not records:
        return None
    keys = set(records[0])
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "completion" in keys:
        return "sft"
    if "instruction_id_list" in keys or {"key", "kwargs"} <= keys or {"key", "prompt"} <= keys:
        return "eval"
    return None


def is_eval_responses(records: Sequence[dict]) -> bool:
    """Evaluation outputs (one record per suite x model x item), not an evaluation set."""
    return bool(records) and {"model", "prompt", "key"} <= set(records[0])


def as_record_set(subject) -> RecordSet:
    if isinstance(subject, RecordSet):
        return subject
    records = list(subject)
    kind = detect_kind(records)
    if kind is None:
        raise BadInputError(f"cannot tell the record kind from fields {sorted(records[0]) if records else '[]'}")
    return RecordSet(kind, records)


def load_records(path: str | Path, kind: str | None = None) -> RecordSet:
    """Read a JSONL file into a RecordSet, detecting the kind from the fields."""
    records = read_jsonl(path)
    if not records:
        raise BadInputError(f"{path}: no records")
    kind = kind or detect_kind(records)
    if kind is None:
        raise BadInputError(f"{path}: cannot tell the record kind from fields {sorted(records[0])} "
                            "(sft needs completion, preference chosen+rejected, eval instruction_id_list)")
    return RecordSet(kind, records, path)


def record_id(rec: dict, index: int) -> Any:
    """How evidence names a record: its id (or eval key), else its position."""
    if "id" in rec:
        return rec["id"]
    if "key" in rec:
        return rec["key"]
    return f"#{index + 1}"


def _fmt_offenders(offenders: list[str], n: int, what: str, limit: int = 3) -> str:
    shown = "; ".join(offenders[:limit])
    more = f" (+{len(offenders) - limit} more)" if len(offenders) > limit else ""
    return f"{len(offenders)}/{n} record(s) {what}: {shown}{more}"
