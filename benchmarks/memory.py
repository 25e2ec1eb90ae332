"""Peak memory of the three-model comparison: one base with SFT and DPO adapters switched in
place (cai's way) vs three separate merged models resident together (what the audited
codebase did), each relative to one model alone.

Each mode runs in its own process (peak RSS is per process) on the embedded model:
`one` loads the base and generates; `adapters` attaches two LoRA adapters (r=16 on
q/k/v/o, random non-zero weights) and generates as base, sft and dpo; `separate` holds the
base plus two merged copies (deep copies with an adapter merged in) and generates with
each. Target: adapters <= 1.25x one.

    python -m benchmarks.memory
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import offline, write_result

TARGET_RATIO = 1.25
PROMPTS = ["Instruction: Name three colors.\nResponse:", "Instruction: Write a haiku about rain.\nResponse:"]


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_adapters(directory: Path) -> list[Path]:
    """Two real LoRA adapters for the embedded model (random B so they change outputs)."""
    from peft import LoraConfig, get_peft_model

    from cai.config import ModelConfig
    from cai.pipeline.models import ModelSlot

    paths = []
    with ModelSlot(ModelConfig()) as slot:
        for i, name in enumerate(("sft", "dpo")):
            peft_model = get_peft_model(slot.model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            peft_model.save_pretrained(directory / name)
            peft_model.unload()
            del peft_model
            paths.append(directory / name)
    return paths


def run_mode(mode: str, adapters: list[str]) -> dict:
    """Runs inside the child process."""
    import copy

    from peft import PeftModel

    from cai.config import ModelConfig
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.models import ModelSlot

    with ModelSlot(ModelConfig()) as slot:
        gen = HFGenerator(slot.model, slot.tokenizer)
        outputs = {}
        if mode == "one":
            outputs["base"] = [g.text for g in gen.generate(PROMPTS, max_new_tokens=16)]
        elif mode == "adapters":
            slot.add_adapter("sft", adapters[0])
            slot.add_adapter("dpo", adapters[1])
            gen = HFGenerator(slot.model, slot.tokenizer)
            for name in ("base", "sft", "dpo"):
                with slot.use(name):
                    outputs[name] = [g.text for g in gen.generate(PROMPTS, max_new_tokens=16)]
        elif mode == "separate":
            merged = []
            for path in adapters:  # what three independently loaded models cost: full copies
                copy_model = PeftModel.from_pretrained(copy.deepcopy(slot.model), path).merge_and_unload()
                merged.append(copy_model)
            outputs["base"] = [g.text for g in gen.generate(PROMPTS, max_new_tokens=16)]
            for name, model in zip(("sft", "dpo"), merged):
                outputs[name] = [g.text for g in HFGenerator(model, slot.tokenizer).generate(PROMPTS, max_new_tokens=16)]
            del merged
    return {"mode": mode, "peak_rss_mb": round(_peak_mb(), 1), "outputs": outputs}


def main(argv: list[str] | None = None) -> dict:
    offline()
    if argv and argv[0] == "--child":
        print(json.dumps(run_mode(argv[1], argv[2:])))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [str(p) for p in make_adapters(Path(tmp))]
        runs = {}
        for mode in ("one", "adapters", "separate"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", mode, *adapters],
                                  capture_output=True, text=True, check=True)
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, switched, separate = (runs[m]["peak_rss_mb"] for m in ("one", "adapters", "separate"))
    same_outputs = runs["adapters"]["outputs"] == runs["separate"]["outputs"]
    return write_result("memory", value=round(switched / one, 3), unit="x one model (peak RSS)", target=TARGET_RATIO,
                        target_op="<=", measurements={"peak_rss_mb": {"one": one, "adapters": switched, "separate": separate},
                                                      "separate_ratio": round(separate / one, 3),
                                                      "adapters_outputs_equal_separate_models": same_outputs})


if __name__ == "__main__":
    main(sys.argv[1:])
