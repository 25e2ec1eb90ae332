"""cai's evaluation generation against lm-eval's HFLM `generate_until`, side by side.

Same process, same resident model (the embedded SmolLM2-135M), same prompts (the shipped
Stage-1 eval items in the training format), greedy, the format's stop strings, the same
`max_new_tokens` and the same batch size (cai's eval default). Each engine runs `--repeats`
times after a warm-up; the fastest counts. Tokens are counted the same way for both
(the tokenizer's encoding of each returned text), so the ratio is like for like. Target:
cai >= 1.0x lm-eval's tokens/s, with identical outputs.

    python -m benchmarks.eval_engines [--repeats 2] [--prompts 64]
"""

from __future__ import annotations

import argparse

from benchmarks.common import offline, stopwatch, write_result

MAX_NEW_TOKENS = 96
TARGET = 1.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args(argv)
    offline()
    from lm_eval.api.instance import Instance

    from cai.config import EvalConfig, ModelConfig
    from cai.pipeline import formats
    from cai.pipeline.compare import load_eval_set
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.lmeval import build_hflm
    from cai.pipeline.models import ModelSlot, encode

    fmt = "instruction_response"
    stop = list(formats.stop_sequences(fmt))
    prompts = [formats.render(fmt, it["instruction"]) for it in load_eval_set("stage1")[:args.prompts]]
    batch = EvalConfig().batch_size
    gen_kwargs = {"until": stop, "max_gen_toks": MAX_NEW_TOKENS, "do_sample": False, "temperature": 0.0}
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        gen = HFGenerator(slot.model, slot.tokenizer, batch_size=batch)
        lm = build_hflm(slot.model, slot.tokenizer, batch_size=batch)

        def run_cai() -> list[str]:
            return [g.text for g in gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop=stop)]

        def run_lmeval() -> list[str]:
            requests = [Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen_kwargs)), idx=i)
                        for i, p in enumerate(prompts)]
            return list(lm.generate_until(requests, disable_tqdm=True))

        run_cai(), run_lmeval()  # warm-up
        timings: dict[str, list[dict]] = {"cai": [], "lm_eval": []}
        outputs: dict[str, list[str]] = {}
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            for name, run in (("cai", run_cai), ("lm_eval", run_lmeval)):
                with stopwatch() as t:
                    outputs[name] = run()
                timings[name].append(t)
        tokens = {name: sum(len(encode(slot.tokenizer, text)) for text in out) for name, out in outputs.items()}
    rates = {name: tokens[name] / min(t["seconds"] for t in runs) for name, runs in timings.items()}
    ratio = round(rates["cai"] / rates["lm_eval"], 2)
    differing = [i for i, (a, b) in enumerate(zip(outputs["cai"], outputs["lm_eval"])) if a.strip() != b.strip()]
    return write_result(
        "eval_engines", value=ratio, unit="x lm-eval HFLM generate_until tokens/s (cai eval generation)",
        target=TARGET, passed=ratio >= TARGET and not differing,
        measurements={
            "prompts": len(prompts), "batch_size": batch, "max_new_tokens": MAX_NEW_TOKENS, "greedy": True,
            "tokens": tokens, "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
            "seconds": {k: [round(t["seconds"], 2) for t in v] for k, v in timings.items()},
            "cpu_seconds": {k: [round(t["cpu_seconds"], 2) for t in v] for k, v in timings.items()},
            "identical_outputs": not differing, "differing_prompts": differing,
        },
        notes="passed requires >= 1.0x and identical (whitespace-stripped) outputs")


if __name__ == "__main__":
    main()
