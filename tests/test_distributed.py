"""`cai train` under a real launch: two processes on the CPU (gloo), the tiny random model.

`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.16 (its simple
launcher; CPU processes are joined only through mpirun), so the launch here is
`accelerate launch --multi_gpu --num_processes 2`, torchrun under the hood, with the run's
`model.device: cpu` telling accelerate to join the processes over gloo (`training.process_state`).
Measured values and what remains untested: docs/multi_gpu.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cai.pipeline import formats

REPO = Path(__file__).resolve().parents[1]
LOSS_TOLERANCE = 1e-4  # |1-process loss - 2-process loss| per step, fp32 on the CPU
PAIRS = [  # instruction, chosen, rejected: no verifiable constraint, so no verifier gating
    ("Name a fruit that is yellow.", " A banana.", " I cannot help with that."),
    ("Say something about the moon.", " The moon shines at night.", " Cars are fast."),
    ("Give a synonym for happy.", " Joyful.", " Sad, sad, sad, sad, sad."),
    ("Name a large animal.", " An elephant.", " Hmm"),
    ("Describe the colour of grass.", " Grass is green.", " Blue, I think, or maybe not."),
    ("Name a musical instrument.", " A violin.", " The weather is nice."),
    ("Name something that is cold.", " Ice is cold.", " No."),
    ("Name a planet.", " Mars is a planet.", " I refuse to answer."),
]
CONFIG = {
    "name": "dist", "seed": 0, "model": {"source": "tiny-random"},
    "instructions": {"source": "templates", "n": len(PAIRS)},
    "critic": {"threshold": 0.5},
    "pairs": {"min_margin": 0.0},
    # dropout 0: the two launches draw different dropout masks; everything else is deterministic
    "sft": {"max_steps": 4, "batch_size": 4, "max_length": 48, "save_steps": 2, "lora": {"dropout": 0.0}},
    "dpo": {"max_steps": 2, "batch_size": 4, "max_length": 48, "save_steps": 2, "lora": {"dropout": 0.0},
            "precompute_ref_log_probs": False},
}


def build_run(run: Path, config: dict) -> Path:
    """A run directory whose data stages (candidates, instructions, responses, pairs) are real
    certified artifacts, written with store.ArtifactWriter and their stages' own invariants on a
    live slot, as `cai run` writes them (the tiny random model cannot generate usable data)."""
    from cai.config import RunConfig
    from cai.invariants import encoding_invariants, evaluate, open_slot_invariants, prompt_tokenizer_subject
    from cai.invariants.artifacts import stage_results
    from cai.invariants.slot import slot_leakage_results
    from cai.pipeline.models import ModelSlot
    from cai.pipeline.store import ArtifactWriter, input_entry, write_json_atomic

    cfg = RunConfig.model_validate(config)
    run.mkdir(parents=True)
    write_json_atomic(run / "run.json", {"name": cfg.name, "config": cfg.model_dump(mode="json"),
                                         "config_hash": cfg.hash(), "stages": {}, "status": "running"})
    sft = [{"id": f"r{i}", "instruction": ins, "format": cfg.format, "prompt": formats.render(cfg.format, ins),
            "completion": chosen, "critic_margin": 1.5, "stop_reason": "stop", "source": "templates"}
           for i, (ins, chosen, _) in enumerate(PAIRS)]
    pairs = [{**{k: r[k] for k in ("instruction", "format", "prompt")}, "id": f"p{i}", "sft_id": r["id"],
              "chosen": r["completion"], "rejected": rejected, "margin": 1.0, "negative_type": "critic"}
             for i, (r, (_, _, rejected)) in enumerate(zip(sft, PAIRS))]
    rows = {"candidates": [{"id": r["id"], "instruction": r["instruction"], "source": "templates"} for r in sft],
            "instructions": [{"id": r["id"], "instruction": r["instruction"], "source": "templates",
                              "critic": {"margin": 1.5}} for r in sft],
            "responses": sft, "pairs": pairs}
    with ModelSlot(cfg.model, label="data") as slot:
        upstream = None
        for stage, records in rows.items():
            w = ArtifactWriter(run / stage, stage, config_hash=cfg.hash(), seed=cfg.seed,
                               inputs=[input_entry(run / upstream, run / stage)] if upstream else [])
            w.extend(records)
            results = stage_results(stage, w.done, cfg, run / stage) + evaluate(open_slot_invariants(), slot)
            if stage == "candidates":
                results += slot_leakage_results(slot)
            if stage in ("responses", "pairs"):
                results += evaluate(encoding_invariants(), prompt_tokenizer_subject(w.done, slot.tokenizer))
            manifest = w.finalize(invariants=results, model=slot.provenance, memory=slot.stage_memory())
            assert manifest["certified"], [r.to_json() for r in results if r.blocking]
            upstream = stage
    return run


def launch(config: Path, run: Path, *, processes: int, resume: bool = False, script: Path | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """`cai train` in `processes` real processes (torchrun via accelerate), or plain `python -m cai`."""
    target = [str(script)] if script else ["-m", "cai"]
    args = ["train", str(config), "--run", str(run)] + (["--resume"] if resume else [])
    if processes == 1:
        cmd = [sys.executable, *target, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000), *target, *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def losses(run: Path, stage: str) -> list[float]:
    return [p["loss"] for p in json.loads((run / stage / "loss_curve.json").read_text())["points"]]


def training_json(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "training.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The config file and a fresh data-only run directory per call."""
    tmp = tmp_path_factory.mktemp("dist")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    template = build_run(tmp / "template", CONFIG)

    def fresh(name: str) -> Path:
        import shutil

        shutil.copytree(template, tmp / name)
        return tmp / name

    return config, fresh
