"""Batched generation engine vs a one-prompt-at-a-time loop.

Same 16 prompts (training format, seed instructions), the embedded model, greedy, 48 new
tokens (rows may end earlier at EOS, as in real use). Both sides run through
`HFGenerator.generate` (batch_size 16 vs 1), after one warm-up call. Reports tokens/s for
both (fastest of the interleaved repeats), the speedup (target >= 5x), whether the outputs
are identical, and the same ratio in process CPU time (robust to other load on the machine).

    python -m benchmarks.generation [--repeats 2]
"""

from __future__ import annotations

import argparse

from benchmarks.common import offline, stopwatch, write_result

N_PROMPTS = 16
MAX_NEW_TOKENS = 48
TARGET_SPEEDUP = 5.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side; the fastest counts")
    args = parser.parse_args(argv)
    offline()
    import torch

    from cai.config import ModelConfig
    from cai.pipeline import formats
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.instructions import load_seeds
    from cai.pipeline.models import ModelSlot

    prompts = [formats.render("instruction_response", s["instruction"]) for s in load_seeds()[:N_PROMPTS]]
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        gen = HFGenerator(slot.model, slot.tokenizer, batch_size=N_PROMPTS)
        gen.generate(prompts[:2], max_new_tokens=4)  # warm-up (first-call allocations), not timed
        batched_runs, single_runs = [], []
        batched = single = None
        for _ in range(args.repeats):  # interleaved, so both sides see similar machine load
            with stopwatch() as t:
                batched = gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS)
            batched_runs.append(t)
            with stopwatch() as t:
                single = [gen.generate([p], max_new_tokens=MAX_NEW_TOKENS, batch_size=1)[0] for p in prompts]
            single_runs.append(t)
    tokens_batched = sum(g.n_new_tokens for g in batched)
    tokens_single = sum(g.n_new_tokens for g in single)
    tps_batched = tokens_batched / min(t["seconds"] for t in batched_runs)
    tps_single = tokens_single / min(t["seconds"] for t in single_runs)
    cpu_speedup = (tokens_batched / min(t["cpu_seconds"] for t in batched_runs)) / (
        tokens_single / min(t["cpu_seconds"] for t in single_runs))
    per_repeat = [round(s["seconds"] / b["seconds"], 2) for b, s in zip(batched_runs, single_runs)]
    identical = [a.text for a in batched] == [b.text for b in single]
    speedup = round(tps_batched / tps_single, 2)
    return write_result(
        "generation", value=speedup, unit="x tokens/s (batched / one at a time)", target=TARGET_SPEEDUP,
        passed=speedup >= TARGET_SPEEDUP and identical,
        measurements={
            "prompts": N_PROMPTS, "max_new_tokens": MAX_NEW_TOKENS, "greedy": True, "batch_size": N_PROMPTS,
            "tokens_per_s_batched": round(tps_batched, 2), "tokens_per_s_single": round(tps_single, 2),
            "seconds_batched": [round(t["seconds"], 3) for t in batched_runs],
            "seconds_single": [round(t["seconds"], 3) for t in single_runs],
            "cpu_seconds_batched": [round(t["cpu_seconds"], 3) for t in batched_runs],
            "cpu_seconds_single": [round(t["cpu_seconds"], 3) for t in single_runs],
            "speedup_per_repeat_wall": per_repeat, "speedup_cpu_time": round(cpu_speedup, 2),
            "new_tokens_batched": tokens_batched, "new_tokens_single": tokens_single,
            "stop_reasons": {r: sum(g.stop_reason == r for g in batched) for r in ("eos", "length", "stop")},
            "identical_outputs": identical, "torch_threads": torch.get_num_threads(),
        },
        notes="passed requires speedup >= target and identical batched/single outputs")


if __name__ == "__main__":
    main()
