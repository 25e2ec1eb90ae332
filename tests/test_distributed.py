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


FAULTS = textwrap.dedent('''
    """`python -m cai` with one fault injected on rank 1 only (CAI_TEST_FAULT), for test_distributed."""
    import os
    import signal
    import sys
    from pathlib import Path

    import torch

    rank, fault, marks = int(os.environ["RANK"]), os.environ["CAI_TEST_FAULT"], Path(os.environ["CAI_TEST_MARKS"])
    step = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):  # every optimizer update leaves a mark
        (marks / f"update-rank{rank}-{os.urandom(4).hex()}").touch()
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = counted_step
    if rank == 1 and fault == "unmasked-prompt":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling.__call__

        def unmasked(self, examples):  # the prompt gets loss: what a broken completion mask does
            batch = collate(self, examples)
            batch["labels"] = batch["input_ids"].clone()
            return batch

        DataCollatorForLanguageModeling.__call__ = unmasked
    if rank == 1 and fault == "sigkill-at-step-3":
        from transformers import TrainerCallback

        from cai.pipeline import sft

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    os.kill(os.getpid(), signal.SIGKILL)

        build = sft.build_sft_trainer
        sft.build_sft_trainer = lambda *a, **k: (lambda t: (t.add_callback(Kill()), t)[1])(build(*a, **k))

    from cai.cli import main

    sys.exit(main())
''')


@pytest.fixture(scope="module")
def trained(runs, tmp_path_factory):
    """One run trained in 1 process (batch 4) and one in 2 processes (batch 2 each): the same
    effective batch of 4, from run directories of their own configs."""
    tmp = tmp_path_factory.mktemp("trained")
    out = {}
    for processes, batch in ((1, 4), (2, 2)):
        config = {**CONFIG, "sft": {**CONFIG["sft"], "batch_size": batch}, "dpo": {**CONFIG["dpo"], "batch_size": batch}}
        path = tmp / f"config-{processes}.yaml"
        path.write_text(yaml.safe_dump(config))
        run = build_run(tmp / f"run-{processes}", config)
        proc = launch(path, run, processes=processes)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[processes] = (path, run, proc)
    return out


def test_two_processes_reproduce_one_process_loss_curve(trained):
    _, one, _ = trained[1]
    _, two, _ = trained[2]
    for stage, steps in (("sft", CONFIG["sft"]["max_steps"]), ("dpo", CONFIG["dpo"]["max_steps"])):
        a, b = losses(one, stage), losses(two, stage)
        assert len(a) == len(b) == steps
        assert max(abs(x - y) for x, y in zip(a, b)) <= LOSS_TOLERANCE, (stage, a, b)
        t1, t2 = training_json(one, stage), training_json(two, stage)
        assert (t1["world_size"], t2["world_size"]) == (1, 2)
        assert t1["trainer_config"]["effective_batch_size"] == t2["trainer_config"]["effective_batch_size"] == 4
        assert [m["rank"] for m in t2["memory_per_rank"]] == [0, 1]
        assert all(m["peak_rss_mb_sampled"] > 0 for m in t2["memory_per_rank"])
    assert losses(one, "dpo")[0] == pytest.approx(0.693147, abs=1e-4)  # step 0: policy == reference


def test_two_process_artifacts_are_written_once_and_pass_cai_check(trained):
    _, two, proc = trained[2]
    check = subprocess.run([sys.executable, "-m", "cai", "check", str(two / "sft"), str(two / "dpo")],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:]
    for stage in ("sft", "dpo"):
        manifest = json.loads((two / stage / "manifest.json").read_text())
        assert manifest["certified"] and manifest["extra"]["world_size"] == 2
        gate = {r["name"]: r for r in manifest["invariants"]}["first_batch_sentinel"]
        assert gate["status"] == "pass" and gate["evidence"].startswith("all 2 ranks: rank 0:")
        assert not (two / stage / "adapter" / "ref").exists()  # DPO's frozen reference copy stays out
    assert "dpo_reference_identity" in {r["name"] for r in json.loads((two / "dpo" / "manifest.json").read_text())["invariants"]}
    index = json.loads((two / "run.json").read_text())
    assert sorted((c["slot"], c["rank"]) for c in index["memory_checks"] if "rank" in c) == \
        [("dpo", 0), ("dpo", 1), ("sft", 0), ("sft", 1)]
    assert proc.stderr.count("[cai] stage sft") == 1  # the main process alone reports and writes


def test_broken_first_batch_on_rank_1_stops_every_rank_before_step_1(runs, tmp_path):
    config, fresh = runs
    run = fresh("broken")
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    marks = tmp_path / "marks"
    marks.mkdir()
    os.environ.update(CAI_TEST_FAULT="unmasked-prompt", CAI_TEST_MARKS=str(marks))
    try:
        proc = launch(config, run, processes=2, script=script)
    finally:
        del os.environ["CAI_TEST_FAULT"], os.environ["CAI_TEST_MARKS"]
    assert proc.returncode != 0
    assert "first_batch_sentinel: failed on rank(s) 1 of 2" in proc.stderr, proc.stderr[-3000:]
    assert list(marks.iterdir()) == []  # no optimizer update on any rank
    assert not list((run / "sft" / "checkpoints").glob("checkpoint-*"))
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert not manifest["complete"] and not manifest["certified"]
    assert not (run / "dpo").exists()


def test_sigkill_of_one_rank_then_resume_continues_from_the_last_checkpoint(runs, trained, tmp_path):
    config, fresh = runs
    path, _, _ = trained[2]
    run = build_run(tmp_path / "run", yaml.safe_load(path.read_text()))
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    marks = tmp_path / "marks"
    marks.mkdir()
    os.environ.update(CAI_TEST_FAULT="sigkill-at-step-3", CAI_TEST_MARKS=str(marks))
    try:
        killed = launch(path, run, processes=2, script=script)
    finally:
        del os.environ["CAI_TEST_FAULT"], os.environ["CAI_TEST_MARKS"]
    assert killed.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in killed.stderr or "Signals.SIGKILL" in killed.stderr, killed.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run / "sft" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]
    assert not json.loads((run / "sft" / "manifest.json").read_text())["complete"]

    refused = launch(path, run, processes=1)  # without --resume the checkpoint is not silently dropped
    assert refused.returncode != 0 and "resume it (--resume)" in refused.stderr
    resumed = launch(path, run, processes=2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = training_json(run, "sft")
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps_this_run"] == 2
    assert summary["steps"] == CONFIG["sft"]["max_steps"]
    _, uninterrupted, _ = trained[2]
    assert losses(run, "sft") == pytest.approx(losses(uninterrupted, "sft"), abs=LOSS_TOLERANCE)
    assert json.loads((run / "dpo" / "manifest.json").read_text())["certified"]
