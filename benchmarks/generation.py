"""Generation throughput against this machine's compute limit, and against a one-prompt loop.

The limit: this machine's fp32 matmul rate (best of repeated 2048^3 products) divided by the
model's FLOPs per generated token, read off its config (2 x the parameters of every matmul,
the LM head included, plus the attention over the mean context). Decoding cannot run faster
than that on this CPU; the fraction of it reached is what the engine still leaves.

Workload: the shipped Stage-1 eval prompts (all 182 unless `--prompts`) in the training format,
greedy, the format's stop strings, MAX_NEW_TOKENS new tokens: what the eval stage does for one
model in one suite, in one `generate` call. Each engine's tokens/s is the fastest of
`--repeats` runs after a warm-up:

* `HFGenerator.generate` at batch 1 (the loop), 16, 64, 128 rows, and cai's default (the eval
  batch size with the padded-token budget, `DEFAULT_MAX_BATCH_TOKENS`), one call over the
  whole workload;
* the same, with transformers' own `DynamicCache` (a `torch.cat` of the whole cache per
  step) instead of cai's spare-column layers;
* transformers' `model.generate` at cai's default batch, the engine before rows left the
  batch when they end.

Greedy outputs of every batched run must equal the loop's on the prompts the loop ran.

Steady decode: seconds per decode step with R rows alive throughout (R = 1 ... 256, the
prompts repeated, after the prefill), the cost of a batch kept full: the most a batch of R
rows can reach (a workload also pays its prefill, and the tail a batch decodes as its rows end).
Beside it, the model's linear layers alone on R rows (`linears_only`): what a decode step
costs before attention, norms and sampling, the ceiling of any engine on these kernels.

`python -m benchmarks.compile_options` measures transformers' compile and static-cache options.

    python -m benchmarks.generation [--repeats 2] [--prompts N]
"""

from __future__ import annotations

import argparse
from unittest import mock

from benchmarks.common import offline, stopwatch, write_result

MAX_NEW_TOKENS = 96
LOOP_PROMPTS = 12  # the one-prompt loop is slow: it runs on a spread of 12 prompts only
TARGET_FRACTION = 0.5
STEADY_ROWS = (1, 16, 64, 128, 256)
STEADY_STEPS = 16
BAR_FRACTION = 0.25


def matmul_gflops(size: int = 2048, repeats: int = 8) -> float:
    """Best fp32 GFLOP/s of `repeats` size^3 matrix products (after two warm-ups)."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def flops_per_token(model, mean_context: float) -> float:
    """2 FLOPs per weight of every matmul a token passes through (embedding lookups are not
    matmuls; a tied LM head is), plus QK^T and AV over the context (4 x layers x context x
    the attention width)."""
    import torch

    cfg = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * cfg.num_hidden_layers * mean_context * cfg.num_attention_heads * head_dim
    return 2 * matmul_params + attention


def steady_decode(gen, prompts: list[str], rows: int, steps: int = STEADY_STEPS, forward=None,
                  warmup: int = 0) -> tuple[float, list[list[int]]]:
    """(seconds per greedy decode step, the tokens chosen) of `gen`'s model with `rows` rows alive
    for all `steps` steps (no row ends), after the prefill and `warmup` untimed steps, through the
    same forward call as `HFGenerator` (or `forward`, e.g. a compiled one: torch.compile refuses
    inference tensors, so every run here is under `no_grad`)."""
    import time

    import torch

    from cai.pipeline import generation

    forward = gen.model if forward is None else forward
    input_ids, mask = gen._tensors([prompts[i % len(prompts)] for i in range(rows)])
    positions = gen._position_ids(mask)
    tokens = []
    with torch.no_grad():
        cache = generation._decode_cache()
        out = gen.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{gen._cache_arg: cache})
        position = positions[:, -1:] + 1
        for step in range(warmup + steps):
            if step == warmup:
                started = time.perf_counter()
            token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            tokens.append(token[:, 0].tolist())
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=-1)
            out = forward(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                          logits_to_keep=1, **{gen._cache_arg: cache})
            position = position + 1
        return (time.perf_counter() - started) / steps, tokens


def linears_only_seconds(model, rows: int, repeats: int = 4) -> float:
    """Seconds for every linear layer of `model` (the LM head included) applied once to `rows`
    rows, weights streamed in layer order as in a decode step: the matmul part of a step."""
    import time

    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features) for m in linears]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            for m, x in zip(linears, inputs):
                m(x)
            best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per engine; the fastest counts")
    parser.add_argument("--prompts", type=int, default=None, help="eval prompts in the workload (default: all)")
    args = parser.parse_args(argv)
    offline()
    import torch
    from transformers import GenerationConfig
    from transformers.cache_utils import DynamicCache

    from cai.config import EvalConfig, ModelConfig
    from cai.pipeline import formats
    from cai.pipeline.compare import load_eval_set
    from cai.pipeline import generation
    from cai.pipeline.generation import DEFAULT_MAX_BATCH_TOKENS, HFGenerator
    from cai.pipeline.models import ModelSlot, encode_batch

    fmt = "instruction_response"
    stop = list(formats.stop_sequences(fmt))
    prompts = [formats.render(fmt, it["instruction"]) for it in load_eval_set("stage1")[:args.prompts]]  # None: all
    default_batch = EvalConfig().batch_size
    stride = max(1, len(prompts) // LOOP_PROMPTS)
    loop_index = list(range(0, len(prompts), stride))[:LOOP_PROMPTS]  # spread over the set's instruction types
    loop_prompts = [prompts[i] for i in loop_index]
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        gen = HFGenerator(slot.model, slot.tokenizer)
        gen.generate(prompts[:2], max_new_tokens=4)  # warm-up (first-call allocations), not timed

        def timed(run):
            best, out = None, None
            for _ in range(args.repeats):
                with stopwatch() as t:
                    out = run()
                best = t if best is None or t["seconds"] < best["seconds"] else best
            return best, out

        engines: dict[str, dict] = {}
        outputs: dict[str, list[str]] = {}
        loop_t, loop = timed(lambda: [gen.generate([p], max_new_tokens=MAX_NEW_TOKENS, stop=stop, batch_size=1)[0]
                                      for p in loop_prompts])
        engines["cai batch 1 (loop)"] = {"batch": 1, "prompts": len(loop_prompts), "seconds": loop_t["seconds"],
                                         "tokens": sum(g.n_new_tokens for g in loop)}
        outputs["cai batch 1 (loop)"] = [g.text for g in loop]
        for name, rows in (("cai batch 16", 16), ("cai batch 64", 64), ("cai batch 128", 128),
                           (f"cai default ({default_batch} rows, {DEFAULT_MAX_BATCH_TOKENS} tokens)", default_batch)):
            t, out = timed(lambda: gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop=stop, batch_size=rows))
            engines[name] = {"batch": rows, "prompts": len(prompts), "seconds": t["seconds"],
                             "tokens": sum(g.n_new_tokens for g in out)}
            outputs[name] = [g.text for g in out]

        with mock.patch.object(generation, "_decode_cache", DynamicCache):  # the cache before spare columns
            t, out = timed(lambda: gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop=stop,
                                                batch_size=default_batch))
        name = "cai default, DynamicLayer cache (torch.cat per step)"
        engines[name] = {"batch": default_batch, "prompts": len(prompts), "seconds": t["seconds"],
                         "tokens": sum(g.n_new_tokens for g in out)}
        outputs[name] = [g.text for g in out]

        config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                  eos_token_id=slot.tokenizer.eos_token_id, pad_token_id=slot.tokenizer.pad_token_id,
                                  stop_strings=stop, repetition_penalty=1.0)

        def hf_generate() -> list[int]:
            tokens = 0
            for start in range(0, len(prompts), default_batch):
                enc = encode_batch(slot.tokenizer, prompts[start:start + default_batch], padding=True, return_tensors="pt")
                with torch.inference_mode():
                    out = slot.model.generate(**enc, generation_config=config, tokenizer=slot.tokenizer)
                new = out[:, enc["input_ids"].shape[1]:]
                tokens += int((new != slot.tokenizer.pad_token_id).sum())
            return tokens

        t, hf_tokens = timed(hf_generate)
        engines[f"transformers generate ({default_batch} rows)"] = {"batch": default_batch, "prompts": len(prompts),
                                                                    "seconds": t["seconds"], "tokens": hf_tokens}
        steady = {rows: steady_decode(gen, prompts, rows)[0] for rows in STEADY_ROWS}
        linears = {rows: linears_only_seconds(slot.model, rows) for rows in STEADY_ROWS}
        mean_prompt = sum(len(ids) for ids in encode_batch(slot.tokenizer, prompts)["input_ids"]) / len(prompts)
        mean_new = engines["cai batch 64"]["tokens"] / len(prompts)
        per_token = flops_per_token(slot.model, mean_prompt + mean_new / 2)

    gflops = matmul_gflops()
    limit = gflops * 1e9 / per_token
    loop_rate = engines["cai batch 1 (loop)"]["tokens"] / engines["cai batch 1 (loop)"]["seconds"]
    rows = {}
    for name, e in engines.items():
        rate = e["tokens"] / e["seconds"]
        rows[name] = {**e, "seconds": round(e["seconds"], 2), "tokens_per_s": round(rate, 1),
                      "fraction_of_limit": round(rate / limit, 3), "x_loop": round(rate / loop_rate, 2),
                      # the prompts' forward work counted as well (model FLOPs utilisation): not the headline
                      "fraction_counting_prompt_tokens": round((e["tokens"] + mean_prompt * e["prompts"])
                                                               / e["seconds"] / limit, 3)}
    steady_rows = {f"{r} rows": {"seconds_per_step": round(t, 4), "tokens_per_s": round(r / t, 1),
                                 "fraction_of_limit": round(r / t / limit, 3),
                                 "linears_only_seconds": round(linears[r], 4),
                                 "linears_only_fraction_of_limit": round(r / linears[r] / limit, 3)}
                   for r, t in steady.items()}
    default_name = next(n for n in rows if n.startswith("cai default"))
    identical = {name: [out[i] for i in loop_index] == outputs["cai batch 1 (loop)"] if len(out) == len(prompts)
                 else out == outputs["cai batch 1 (loop)"] for name, out in outputs.items()}
    fraction = rows[default_name]["fraction_of_limit"]
    return write_result(
        "generation", value=fraction, unit="fraction of the compute limit (tokens/s at cai's default batch)",
        target=TARGET_FRACTION, passed=fraction >= BAR_FRACTION and all(identical.values()),
        measurements={
            "engines": rows, "matmul_gflops_fp32": round(gflops, 1), "flops_per_token": round(per_token),
            "compute_limit_tokens_per_s": round(limit, 1), "max_new_tokens": MAX_NEW_TOKENS, "greedy": True,
            "mean_prompt_tokens": round(mean_prompt, 1), "mean_new_tokens": round(mean_new, 1),
            # prefill work the limit does not count (it counts generated tokens): prompt tokens per new token
            "prompt_tokens_per_new_token": round(mean_prompt / mean_new, 2),
            "identical_to_loop": identical, "torch_threads": torch.get_num_threads(),
            "steady_decode": {"steps": STEADY_STEPS, "rows": steady_rows},
        },
        notes=f"target {TARGET_FRACTION} of the limit, bar {BAR_FRACTION}; passed requires the bar and greedy "
              "outputs identical to the one-prompt loop")


if __name__ == "__main__":
    main()
