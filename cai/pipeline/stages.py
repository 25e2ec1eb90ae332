"""The stage graph of a run: which stages exist, what each consumes, what its records are.

One place, read by the runner (what to build, what to redo after a damaged input), the
verifier (which artifacts a run must have, which inputs each must name) and the report.
"""

from __future__ import annotations

STAGES = ("candidates", "instructions", "responses", "pairs", "sft", "dpo", "eval")

# stage -> the stages whose artifacts it reads (its manifest names exactly these)
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "candidates": (),
    "instructions": ("candidates",),
    "responses": ("instructions",),
    "pairs": ("responses",),
    "sft": ("responses",),
    "dpo": ("pairs", "sft"),
    "eval": ("sft", "dpo"),
}

# stage -> the kind of its records (cai.invariants.data kinds, or this module's own)
RECORD_KIND = {"candidates": "candidates", "instructions": "instructions", "responses": "sft",
               "pairs": "preference", "sft": "training", "dpo": "training", "eval": "eval_responses"}


def downstream(stage: str) -> list[str]:
    """`stage` and every stage that consumes it, directly or not, in run order."""
    hit = {stage}
    for s in STAGES:
        if hit & set(STAGE_INPUTS[s]):
            hit.add(s)
    return [s for s in STAGES if s in hit]
