"""Leakage layers 1 and 5 on a loaded slot, for every run (not only `cai check`): the
tokenizer the stages use has no chat template and refuses to render one, and the model,
fed the behaviour sentinels raw, is judged for assistant-style answers (a warning, with the
outputs)."""

from __future__ import annotations

from cai.invariants.base import Result
from cai.invariants.leakage import SentinelBehaviour, check_tokenizer


def slot_leakage_results(slot) -> list[Result]:
    """Tokenizer sentinels (template shipped / disabled / refusing, special ids and
    round trip on the probe texts) with the template state observed now and the checkpoint
    directory inspected, then the behaviour sentinel on the slot's model. Subject: an open
    `ModelSlot`; the runner records the results in the first artifact the slot writes."""
    prov = slot.provenance
    results = check_tokenizer(slot.tokenizer, prov["tokenizer"], source_dir=prov["path"])
    return results + [SentinelBehaviour().check(slot)]
