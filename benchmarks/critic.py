"""Logprob A/B critic throughput and cost.

The embedded model judges 32 seed instructions against the anchor (instruction critic) and
16 (instruction, response, response) items (response critic), with and without position
swap. A forward pre-hook on the model counts the rows it actually scores, so "forward
passes per judgement" is measured, not assumed: the target is exactly 1 without swap and
2 with swap (one next-token pass per prompt); judgements/s are reported beside it.

    python -m benchmarks.critic
"""

from __future__ import annotations

import argparse

from benchmarks.common import offline, stopwatch, write_result

N_INSTRUCTIONS = 32
N_RESPONSE_ITEMS = 16


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    offline()
    from cai.config import ModelConfig
    from cai.pipeline import critic
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.instructions import load_seeds
    from cai.pipeline.models import ModelSlot
    from cai.pipeline.responses import load_fewshot_examples

    instructions = [s["instruction"] for s in load_seeds()[:N_INSTRUCTIONS]]
    examples = load_fewshot_examples()
    items = [(examples[i % len(examples)][0], examples[i % len(examples)][1], examples[(i + 1) % len(examples)][1])
             for i in range(N_RESPONSE_ITEMS)]
    rows = {"n": 0, "calls": 0}

    def count_rows(module, args_, kwargs):
        ids = kwargs.get("input_ids", args_[0] if args_ else None)
        rows["n"] += int(ids.shape[0])
        rows["calls"] += 1

    measurements = {}
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        gen = HFGenerator(slot.model, slot.tokenizer, batch_size=args.batch_size)
        critic.judge_instructions(gen, instructions[:2])  # warm-up, not timed
        handle = slot.model.register_forward_pre_hook(count_rows, with_kwargs=True)
        try:
            for kind, fn, payload in (("instruction", critic.judge_instructions, instructions),
                                      ("response", critic.judge_responses, items)):
                for swap in (False, True):
                    rows.update(n=0, calls=0)
                    with stopwatch() as t:
                        judgements = fn(gen, payload, swap=swap)
                    key = f"{kind}_{'swap' if swap else 'noswap'}"
                    measurements[key] = {
                        "judgements": len(judgements), "seconds": round(t["seconds"], 3),
                        "cpu_seconds": round(t["cpu_seconds"], 3),
                        "judgements_per_s": round(len(judgements) / t["seconds"], 2),
                        "judgements_per_cpu_s": round(len(judgements) / t["cpu_seconds"], 2),
                        "forward_passes_per_judgement": rows["n"] / len(judgements),
                        "forward_calls": rows["calls"],
                        "disagreement_rate": round(sum(j.disagree for j in judgements) / len(judgements), 3),
                        "mean_option_mass": round(sum(j.mass for j in judgements) / len(judgements), 3),
                    }
        finally:
            handle.remove()
    passes_ok = all(m["forward_passes_per_judgement"] == (2 if k.endswith("_swap") else 1) for k, m in measurements.items())
    measurements["batch_size"] = args.batch_size
    measurements["judgements_per_s"] = {k: m["judgements_per_s"] for k, m in measurements.items() if isinstance(m, dict)}
    return write_result(
        "critic", value=measurements["instruction_swap"]["forward_passes_per_judgement"],
        unit="forward passes per judgement (instruction critic, swap)", target=2.0, target_op="==", passed=passes_ok,
        measurements=measurements,
        notes="passed: forward passes per judgement == 1 without swap and == 2 with swap, in all four cells; "
              "throughput (judgements/s) is reported, not gated")

if __name__ == "__main__":
    main()
