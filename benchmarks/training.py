"""Seconds per optimizer step of `train_sft` / `train_dpo` on the embedded model (CPU).

    python -m benchmarks.training [--steps 10] [--threads 1] [--quantization none|4bit|8bit]

Trains SFT for --steps steps on 64 short records (batch 4, max_length 64, LoRA r=16 on
q/k/v/o), with cai's CPU default (no gradient checkpointing) and again with it on, then DPO from that adapter on 32 pairs twice: with the reference log-probs
precomputed (one forward pass over the pairs before training, cai's default) and computed
per step. Timings include the trainer's own per-step overhead (logging) but not model
loading or dataset preparation; the precompute is its own figure. The value is the DPO
step (default mode) over the SFT step at the same batch and length: target <= 2x (a DPO
step runs chosen and rejected, twice the sequences), bar 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.common import write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FORMAT = "instruction_response"
_FACTS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
          ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa")]


def records() -> tuple[list[dict], list[dict]]:
    from cai.pipeline.formats import render

    tasks = [(f"What is the capital of {c}?", f" The capital of {c} is {k}.") for c, k in _FACTS]
    tasks += [(f"What is {a} plus {b}?", f" {a} plus {b} is {a + b}.") for a in range(1, 8) for b in range(1, 9)][:56]
    sft = [{"id": f"s{i}", "instruction": ins, "format": FORMAT, "prompt": render(FORMAT, ins), "completion": c}
           for i, (ins, c) in enumerate(tasks)]
    pairs = [{**{k: v for k, v in r.items() if k != "completion"}, "id": f"p{i}", "chosen": r["completion"],
              "rejected": " I cannot help with that request.", "margin": 2.0} for i, r in enumerate(sft[::2])]
    return sft, pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    args = parser.parse_args(argv)

    import torch

    from cai.config import RunConfig
    from cai.pipeline.dpo import train_dpo
    from cai.pipeline.models import ModelSlot
    from cai.pipeline.sft import train_sft

    if args.threads:
        torch.set_num_threads(args.threads)
    small = {"batch_size": 4, "max_length": 64, "max_steps": args.steps, "save_steps": 10_000}
    sft_records, pairs = records()
    out = {"threads": torch.get_num_threads(), "quantization": args.quantization, "steps": args.steps,
           "batch_size": 4, "max_length": 64, "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(name="bench", model={"quantization": args.quantization},
                        sft={**small, "learning_rate": 1e-3}, dpo={**small, "learning_rate": 5e-4})
        with ModelSlot(cfg.model) as slot:
            runs = {"sft": train_sft(cfg, slot, sft_records, Path(tmp) / "sft")}
            checkpointed = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"gradient_checkpointing": True})})
            runs["sft_gradient_checkpointing"] = train_sft(checkpointed, slot, sft_records, Path(tmp) / "sft_gc")
            for precompute in (True, False):
                dpo_cfg = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"precompute_ref_log_probs": precompute})})
                name = "dpo_precomputed_ref" if precompute else "dpo_live_ref"
                runs[name] = train_dpo(dpo_cfg, slot, pairs, Path(runs["sft"]["adapter_dir"]), Path(tmp) / name)
        for name, r in runs.items():
            curve = json.loads(Path(r["loss_curve"]["json"]).read_text())["summary"]
            t = r["timings"]
            out[name] = {"seconds_per_step": t["seconds_per_step"], "train_seconds": t["train_seconds"],
                         "wall_seconds": t["wall_seconds"], "peak_rss_mb_sampled": r["memory"]["peak_rss_mb_sampled"],
                         "first_loss": curve["first_loss"], "last_loss": curve["last_loss"]}
    sft_step = out["sft"]["seconds_per_step"]
    out["sft"]["gradient_checkpointing"] = runs["sft"]["trainer_config"]["gradient_checkpointing"]
    out["sft_gradient_checkpointing"]["x_sft_step"] = round(out["sft_gradient_checkpointing"]["seconds_per_step"] / sft_step, 2)
    for name in ("dpo_precomputed_ref", "dpo_live_ref"):
        out[name]["x_sft_step"] = round(out[name]["seconds_per_step"] / sft_step, 2)
    # the precompute is paid once, before training: the rest of the DPO wall time
    out["dpo_precompute_seconds"] = round(out["dpo_precomputed_ref"]["wall_seconds"]
                                          - out["dpo_precomputed_ref"]["train_seconds"]
                                          - (out["dpo_live_ref"]["wall_seconds"] - out["dpo_live_ref"]["train_seconds"]), 2)
    faster = min(("dpo_precomputed_ref", "dpo_live_ref"), key=lambda n: out[n]["wall_seconds"])
    out["faster_mode"] = faster
    out["faster_by_wall_seconds"] = round(abs(out["dpo_precomputed_ref"]["wall_seconds"] - out["dpo_live_ref"]["wall_seconds"]), 2)
    ratio = out["dpo_precomputed_ref"]["x_sft_step"]
    return write_result("training", value=ratio, unit="x SFT step (DPO step, reference precomputed, same batch/length)",
                        target=2.0, target_op="<=", passed=ratio <= 3.0, measurements=out,
                        notes="target 2x, bar 3x; passed means within the bar")


if __name__ == "__main__":
    main()
