"""`cai train CONFIG --run RUN [--resume]`: SFT then DPO of a run directory whose data stages
are certified (`responses`, `pairs`), writing the same `sft` / `dpo` artifacts `cai run` writes,
through the same code (`runner.training_stage`). In one process it is `cai run`'s training;
under a launch every process runs it:

    accelerate launch --multi_gpu --num_processes N -m cai train CONFIG --run RUN

Every rank opens its own ModelSlot (one base model per rank, placed by
`training.rank_model_config`, released and checked released after each stage) and trains on
its shard of every batch; the pre-step-1 gate runs on every rank and a failure anywhere stops
all of them; the main process alone opens and seals the artifacts and writes run.json.
"""

from __future__ import annotations

import time
from pathlib import Path

TRAINING_STAGES = ("sft", "dpo")


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the run's config (YAML): the one its run.json was written with")
    parser.add_argument("--run", required=True, help="run directory with certified responses and pairs artifacts")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted training from its newest checkpoint (checkpoints/checkpoint-N)")


def check_run_inputs(cfg, out: Path) -> None:
    """Bad input before any model loads: `out` is a run of this config whose `responses` and
    `pairs` artifacts are complete, unaltered and certified (read_artifact verifies)."""
    from cai.errors import BadInputError
    from cai.pipeline.runner import read_run_index
    from cai.pipeline.store import read_artifact

    index = read_run_index(out)
    if index["config_hash"] != cfg.hash():
        raise BadInputError(f"{out}: was written with another config (hash {index['config_hash'][:12]}); "
                            "train it with the config it was run with")
    for stage in ("responses", "pairs"):
        read_artifact(out / stage)


def train_run(cfg, out: Path, *, resume: bool) -> list[str]:
    """The training stages not yet complete, in order, on this process (every process of a
    launch calls it). Returns the stages trained."""
    from cai.invariants import evaluate, memory_invariants
    from cai.invariants.base import Result, raise_on_failures
    from cai.pipeline import training
    from cai.pipeline.models import SLOT_EVENTS, ModelSlot
    from cai.pipeline.runner import Run, log, training_stage

    state = training.process_state(cfg.model)  # before any weights are read
    run = Run(cfg, out, resume=True) if state.is_main_process else None  # the data stages are done: always a continuation
    state.wait_for_everyone()
    model_cfg = training.rank_model_config(cfg.model, state)
    trained = []
    for stage in TRAINING_STAGES:
        done = training.all_ranks(state, run.is_done(stage) if run is not None else None)[0]  # main decides
        if done:
            continue
        if run is not None:
            log(f"stage {stage} ({state.num_processes} process(es))")
            run.slot_events_mark = len(SLOT_EVENTS)
        with ModelSlot(model_cfg, label=stage) as slot:
            training_stage(cfg, out, stage, slot, resume=resume, run=run)
        released = training.all_ranks(state, [r.to_json() for r in evaluate(memory_invariants(), slot)])
        if run is not None:
            run.record_slot_events()
            for rank, results in enumerate(released):
                run.index.setdefault("memory_checks", []).append(
                    {"slot": slot.label, "rank": rank, "time": time.time(), "results": results})
            run.save()
        raise_on_failures([Result.from_json(r) for results in released for r in results])
        trained.append(stage)
    return trained


def cli_main(args) -> int:
    from cai.config import load_config
    from cai.errors import InvariantError
    from cai.pipeline.runner import check_runnable, log

    cfg = load_config(args.config)
    out = Path(args.run)
    check_runnable(cfg, config_path=args.config)
    check_run_inputs(cfg, out)
    started = time.time()
    try:
        trained = train_run(cfg, out, resume=args.resume)
    except InvariantError as err:
        log(str(err))
        log(f"training stopped: {out} is not certified for {', '.join(TRAINING_STAGES)}")
        return 1
    log(f"trained {', '.join(trained) or 'nothing (sft and dpo already complete)'} in {time.time() - started:.0f} s")
    return 0
