"""Harness overhead: one real stage with its invariants on vs off.

The stage is evaluation-response generation (the embedded model, greedy, the shipped
Stage-1 items, base model only) written to an artifact. "Off" = generate + write +
finalize with no invariants; "on" = the same plus every invariant the runner evaluates for
that artifact (eval_response_invariants, memory invariants) and the provenance checks of
reading it back. Target: <= 5% extra wall time.

    python -m benchmarks.overhead [--items 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import offline, write_result

TARGET = 0.05


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    args = parser.parse_args(argv)
    offline()
    from cai.config import RunConfig
    from cai.invariants import evaluate, eval_response_invariants, open_slot_invariants, provenance_invariants
    from cai.pipeline.compare import generate_eval_responses, load_eval_set
    from cai.pipeline.models import ModelSlot
    from cai.pipeline.store import ArtifactWriter

    cfg = RunConfig.model_validate({"name": "overhead", "eval": {"suites": ["primary"], "max_new_tokens": 32,
                                                                  "batch_size": 16}})
    items = load_eval_set("stage1", args.items)
    timings = {}
    with ModelSlot(cfg.model) as slot, tempfile.TemporaryDirectory() as tmp:
        for mode in ("off", "on"):
            out = Path(tmp) / mode
            started = time.perf_counter()
            writer = ArtifactWriter(out, "eval", config_hash=cfg.hash())
            generate_eval_responses(cfg, slot, items, ["base"], writer)
            stage_seconds = time.perf_counter() - started
            results = []
            if mode == "on":
                results = evaluate(eval_response_invariants(cfg.format), writer.done) + evaluate(open_slot_invariants(), slot)
            writer.finalize(invariants=results)
            if mode == "on":
                results += evaluate(provenance_invariants(cfg.hash()), out)
            timings[mode] = {"total": time.perf_counter() - started, "stage": stage_seconds,
                             "invariants": len(results)}
    invariant_seconds = timings["on"]["total"] - timings["on"]["stage"] - (timings["off"]["total"] - timings["off"]["stage"])
    overhead = invariant_seconds / timings["on"]["stage"]
    return write_result("overhead", value=round(overhead, 4), unit="fraction of stage wall time", target=TARGET,
                        target_op="<=", measurements={"seconds": timings, "invariant_seconds": round(invariant_seconds, 4),
                                                      "items": len(items)},
                        notes="overhead measured on the same stage run; generation time is excluded from both "
                              "sides' difference so machine-load noise in generation does not count as overhead")


if __name__ == "__main__":
    main(sys.argv[1:])
