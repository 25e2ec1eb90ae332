"""Seconds per optimizer step of `train_sft` / `train_dpo` on the embedded model (CPU).

    python benchmarks/training.py [--steps 10] [--threads 1] [--quantization none|4bit|8bit]

Trains SFT for --steps steps on 64 short records (batch 4, max_length 64, LoRA r=16 on
q/k/v/o), then DPO from that adapter on 32 pairs, and prints one JSON object with
seconds/step, wall time and peak RSS. Timings include the trainer's own per-step overhead
(logging) but not model loading, dataset preparation or the DPO reference precompute.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

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
    cfg = RunConfig(name="bench", model={"quantization": args.quantization},
                    sft={**small, "learning_rate": 1e-3}, dpo={**small, "learning_rate": 5e-4})
    sft_records, pairs = records()
    out = {"threads": torch.get_num_threads(), "quantization": args.quantization, "steps": args.steps,
           "batch_size": 4, "max_length": 64, "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp, ModelSlot(cfg.model) as slot:
        sft = train_sft(cfg, slot, sft_records, Path(tmp) / "sft")
        dpo = train_dpo(cfg, slot, pairs, Path(sft["adapter_dir"]), Path(tmp) / "dpo")
        for name, r in (("sft", sft), ("dpo", dpo)):
            curve = json.loads(Path(r["loss_curve"]["json"]).read_text())["summary"]
            out[name] = {"seconds_per_step": r["timings"]["seconds_per_step"],
                         "train_seconds": r["timings"]["train_seconds"], "wall_seconds": r["timings"]["wall_seconds"],
                         "peak_rss_mb_sampled": r["memory"]["peak_rss_mb_sampled"], "first_loss": curve["first_loss"],
                         "last_loss": curve["last_loss"]}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
