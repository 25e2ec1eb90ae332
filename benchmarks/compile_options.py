"""The compile and cache options transformers offers for generation, measured on this machine.

* `torch.compile(model, dynamic=True)` (rows leave the batch and the context grows every step,
  so shapes are dynamic) of the forward cai's engine calls, as steady decode (`generation.
  steady_decode`: R rows alive throughout) against the same forward uncompiled; compile time
  apart; greedy tokens must be identical.
* transformers' `model.generate` with its static cache, uncompiled and compiled
  (`CompileConfig`; transformers compiles on accelerators only unless told otherwise), against
  its dynamic cache, on one batch of cai's default size: the second of two runs counts (the
  first compiles).

An option that raises is recorded with its error, not skipped: "it crashed here" is a result.
The value is the compiled engine's speedup at cai's default batch; an option is worth wiring
into cai only well above 1, since every model of a run would pay the compile time.

    python -m benchmarks.compile_options
"""

from __future__ import annotations

import time

from benchmarks.common import offline, write_result
from benchmarks.generation import MAX_NEW_TOKENS, steady_decode

ROWS = (16, 64)
TARGET_SPEEDUP = 1.0


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__


def compiled_engine(gen, prompts: list[str]) -> dict:
    """Steady decode at each of ROWS rows, uncompiled against `torch.compile(dynamic=True)`."""
    import torch

    started = time.perf_counter()
    compiled = torch.compile(gen.model, dynamic=True)
    out: dict = {}
    try:
        steady_decode(gen, prompts, ROWS[0], steps=1, forward=compiled)  # compiles (dynamic: once)
        out["compile_seconds"] = round(time.perf_counter() - started, 1)
    except Exception as err:  # noqa: BLE001 - the failure is the measurement
        return {"error": _error(err)}
    for rows in ROWS:
        eager_s, eager_tokens = steady_decode(gen, prompts, rows, warmup=2)
        try:
            compiled_s, compiled_tokens = steady_decode(gen, prompts, rows, forward=compiled, warmup=2)
        except Exception as err:  # noqa: BLE001
            out[f"{rows} rows"] = {"eager_seconds_per_step": round(eager_s, 4), "error": _error(err)}
            continue
        out[f"{rows} rows"] = {"eager_seconds_per_step": round(eager_s, 4),
                               "compiled_seconds_per_step": round(compiled_s, 4),
                               "speedup": round(eager_s / compiled_s, 3),
                               "identical_tokens": eager_tokens == compiled_tokens}
    torch._dynamo.reset()
    return out


def transformers_static_cache(gen, prompts: list[str], stop: list[str]) -> dict:
    """`model.generate` on one batch: dynamic cache, static cache, static cache compiled."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    from cai.pipeline.models import encode_batch

    tokenizer = gen.tokenizer
    enc = encode_batch(tokenizer, prompts, padding=True, return_tensors="pt")
    compile_everywhere = CompileConfig(dynamic=False)
    compile_everywhere._compile_all_devices = True
    modes = {"dynamic cache": {}, "static cache": {"cache_implementation": "static", "disable_compile": True},
             "static cache, compiled": {"cache_implementation": "static", "compile_config": compile_everywhere}}
    out, reference = {}, None
    for name, options in modes.items():
        config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  stop_strings=stop, **options)
        runs = []
        try:
            for _ in range(2):
                started = time.perf_counter()
                with torch.no_grad():  # compiled graphs refuse inference tensors
                    new = gen.model.generate(**enc, generation_config=config, tokenizer=tokenizer)
                runs.append(time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001
            out[name] = {"error": _error(err)}
            continue
        new = new[:, enc["input_ids"].shape[1]:]
        reference = new if reference is None else reference
        tokens = int((new != tokenizer.pad_token_id).sum())
        out[name] = {"first_run_seconds": round(runs[0], 1), "seconds": round(runs[1], 1), "tokens": tokens,
                     "tokens_per_s": round(tokens / runs[1], 1), "identical_tokens": torch.equal(new, reference)}
    torch._dynamo.reset()
    return out


def main(argv: list[str] | None = None) -> dict:
    offline()
    from cai.config import EvalConfig, ModelConfig
    from cai.pipeline import formats
    from cai.pipeline.compare import load_eval_set
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.models import ModelSlot

    fmt = "instruction_response"
    stop = list(formats.stop_sequences(fmt))
    batch = EvalConfig().batch_size
    prompts = [formats.render(fmt, it["instruction"]) for it in load_eval_set("stage1")[:batch]]
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        gen = HFGenerator(slot.model, slot.tokenizer)
        engine = compiled_engine(gen, prompts)
        hf = transformers_static_cache(gen, prompts, stop)
    speedup = engine.get(f"{batch} rows", {}).get("speedup", 0.0)
    return write_result(
        "compile_options", value=speedup, target=TARGET_SPEEDUP,
        unit=f"steady-decode speedup of torch.compile(dynamic=True) on cai's engine at {batch} rows (0: it failed)",
        measurements={f"cai engine, torch.compile(dynamic=True)": engine,
                      f"transformers generate, {len(prompts)} prompts, {MAX_NEW_TOKENS} new tokens": hf},
        notes="measured, not wired in: cai generates uncompiled with its dynamic cache")


if __name__ == "__main__":
    main()
