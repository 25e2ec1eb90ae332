"""`cai run`: the stages in order, each writing a certified artifact, gated by invariants.

A stage whose artifact is complete is skipped on `--resume` (after its hashes verify);
an interrupted one continues from its surviving records. Models enter memory one at a
time: one slot for the data stages, one for SFT, one for DPO, one for evaluation (base
plus adapters). A failed error-severity invariant stops the run with exit 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cai.config import RunConfig, load_config
from cai.errors import BadInputError, CaiError, InvariantError
from cai.harness.session import VOID_EXIT_CODE
from cai.invariants.base import Result, Severity, Status, raise_on_failures
from cai.pipeline.store import MANIFEST, ArtifactWriter, input_entry, read_artifact, read_manifest, write_json_atomic

STAGES = ("candidates", "instructions", "responses", "pairs", "sft", "dpo", "eval")


def log(message: str) -> None:
    print(f"[cai] {message}", file=sys.stderr, flush=True)


class Run:
    """A run directory: one artifact per stage plus `run.json`, the index."""

    def __init__(self, cfg: RunConfig, out: Path, *, resume: bool):
        self.cfg, self.out, self.resume = cfg, out, resume
        self.index_path = out / "run.json"
        self.slot_events_mark = 0  # SLOT_EVENTS index when the current stage's slot opened
        if out.exists() and any(out.iterdir()) and not resume:
            raise BadInputError(f"{out}: run directory exists and is not empty (use --resume or another --out)")
        if resume and self.index_path.is_file():
            index = json.loads(self.index_path.read_text())
            if index.get("config_hash") != cfg.hash():
                raise BadInputError(f"{out}: was started with another config (hash {index.get('config_hash', '?')[:12]}); "
                                    "resume needs the same config")
        out.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Any] = {"name": cfg.name, "config_hash": cfg.hash(), "config": cfg.model_dump(mode="json"),
                                      "stages": {}, "status": "running"}
        if self.index_path.is_file():
            previous = json.loads(self.index_path.read_text())
            self.index["stages"] = previous.get("stages", {})
            self.index["slot_events"] = previous.get("slot_events", [])
        self.save()

    def save(self) -> None:
        write_json_atomic(self.index_path, self.index)

    def record_slot_events(self) -> None:
        """The complete load/release log (all processes of this run, resumes included): the
        run-level check that models were resident one at a time reads it."""
        from cai.pipeline.models import SLOT_EVENTS

        self.index.setdefault("slot_events", []).extend(dict(e) for e in SLOT_EVENTS[self.slot_events_mark:])
        self.save()

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def is_done(self, stage: str) -> bool:
        path = self.stage_dir(stage) / MANIFEST
        if not path.is_file() or not read_manifest(self.stage_dir(stage)).get("complete"):
            return False
        read_artifact(self.stage_dir(stage))  # verifies hashes and certification, raises otherwise
        return True

    def writer(self, stage: str, inputs: list[str], shard_size: int = 1000) -> ArtifactWriter:
        return ArtifactWriter(self.stage_dir(stage), stage, config_hash=self.cfg.hash(), seed=self.cfg.seed,
                              inputs=[input_entry(self.stage_dir(s)) for s in inputs], shard_size=shard_size,
                              resume=True)

    def finish(self, stage: str, writer: ArtifactWriter, results: list[Result], **manifest_fields) -> dict:
        from cai.invariants.memory import memory_snapshot

        manifest_fields.setdefault("memory", memory_snapshot(events_since=self.slot_events_mark))
        manifest = writer.finalize(invariants=results, **manifest_fields)
        self.index["stages"][stage] = {"dir": stage, "certified": manifest["certified"],
                                       "records": manifest["outputs"]["records"],
                                       "seconds": manifest["timings"]["wall_seconds"]}
        self.save()
        raise_on_failures(results)
        return manifest


def records_of(run: Run, stage: str) -> list[dict]:
    return list(read_artifact(run.stage_dir(stage)).records())


# --------------------------------------------------------------------------- stages


def eval_sets(cfg: RunConfig) -> dict[str, list[dict]]:
    from cai.pipeline.compare import load_eval_set

    return {name: load_eval_set(name) for name in cfg.eval.sets}


def data_results(run: Run, kind: str, records: list[dict], slot=None) -> list[Result]:
    """Every data invariant of a training artifact (+ encoding checks when a tokenizer is at hand)."""
    from cai.invariants import RecordSet, data_invariants, encoding_invariants, evaluate, prompt_tokenizer_subject

    rs = RecordSet(kind, records)
    results = evaluate(data_invariants(kind, eval_sets=eval_sets(run.cfg), critic_enabled=run.cfg.critic.enabled,
                                       train_format=run.cfg.format), rs)
    if slot is not None:
        results += evaluate(encoding_invariants(), prompt_tokenizer_subject(rs, slot.tokenizer))
    return results


def stage_candidates(run: Run, slot, gen) -> None:
    from cai.pipeline.instructions import generate_instructions

    writer = run.writer("candidates", [])
    stats = generate_instructions(run.cfg, gen, writer)
    run.finish("candidates", writer, [], model=slot.provenance, extra={"instructions": stats})


def stage_instructions(run: Run, slot, gen) -> None:
    from cai.pipeline.critic import filter_instructions

    candidates = records_of(run, "candidates")
    writer = run.writer("instructions", ["candidates"])
    kept, stats = filter_instructions(run.cfg, gen, candidates)
    if stats["short_by"]:
        raise CaiError(f"critic kept {stats['n_kept']} of {len(candidates)} candidates, {run.cfg.instructions.n} asked "
                       f"(confident: {stats.get('n_confident', '-')}, threshold {run.cfg.critic.threshold}); "
                       "raise instructions.overgenerate or lower critic.threshold")
    if not writer.done:
        writer.extend(kept)
    margins = [r["critic"]["margin"] for r in kept if r.get("critic")]
    run.finish("instructions", writer, [], model=slot.provenance,
               extra={"critic": stats, "critic_margins": margins})


def stage_responses(run: Run, slot, gen) -> None:
    from cai.pipeline.responses import run_responses

    writer = run.writer("responses", ["instructions"])
    stats = run_responses(run.cfg, gen, records_of(run, "instructions"), writer)
    results = data_results(run, "sft", writer.done, slot)
    run.finish("responses", writer, results, model=slot.provenance, extra={"responses": stats})


def stage_pairs(run: Run, slot, gen) -> None:
    from cai.pipeline.pairs import run_pairs

    writer = run.writer("pairs", ["responses"])
    stats = run_pairs(run.cfg, records_of(run, "responses"), writer)
    results = data_results(run, "preference", writer.done, slot)
    run.finish("pairs", writer, results, model=slot.provenance, extra={"pairs": stats})


def stage_sft(run: Run, slot) -> None:
    from cai.pipeline.sft import train_sft

    writer = run.writer("sft", ["responses"])
    result = train_sft(run.cfg, slot, records_of(run, "responses"), run.stage_dir("sft"), resume=run.resume)
    _finish_training(run, "sft", writer, result, slot)


def stage_dpo(run: Run, slot) -> None:
    from cai.pipeline.dpo import train_dpo

    writer = run.writer("dpo", ["pairs", "sft"])
    result = train_dpo(run.cfg, slot, records_of(run, "pairs"), run.stage_dir("sft") / "adapter",
                       run.stage_dir("dpo"), resume=run.resume)
    _finish_training(run, "dpo", writer, result, slot)


def _finish_training(run: Run, stage: str, writer: ArtifactWriter, result: dict, slot) -> None:
    """A training artifact: the loss curve as records, the adapter files hashed."""
    if not writer.done:
        writer.extend(result.get("loss_curve_points", []))
    adapter = Path(result["adapter_dir"])
    files = [p for p in adapter.rglob("*") if p.is_file()]
    results = [Result.from_json(r) if isinstance(r, dict) else r for r in result.get("invariants", [])]
    run.finish(stage, writer, results, model=slot.provenance, files=files, memory=result.get("memory"),
               extra={k: v for k, v in result.items() if k not in ("invariants", "loss_curve_points")})


def stage_eval(run: Run, slot) -> None:
    from cai.invariants import eval_response_invariants, evaluate
    from cai.pipeline.compare import generate_eval_responses, load_eval_set

    cfg = run.cfg
    slot.add_adapter("sft", run.stage_dir("sft") / "adapter")
    slot.add_adapter("dpo", run.stage_dir("dpo") / "adapter")
    items = [it for name in cfg.eval.sets for it in load_eval_set(name, cfg.eval.limit)]
    writer = run.writer("eval", ["sft", "dpo"])
    stats = generate_eval_responses(cfg, slot, items, ["base", "sft", "dpo"], writer)
    results = evaluate(eval_response_invariants(cfg.format), writer.done)
    second_opinion = lm_eval_second_opinion(cfg, slot) if cfg.eval.lm_eval else {}
    for model_report in second_opinion.values():
        results += [Result.from_json(r) for r in model_report.get("invariants", [])]
    run.finish("eval", writer, results, model=slot.provenance,
               extra={"eval": stats, "adapters": slot.adapters, "lm_eval": second_opinion})


def lm_eval_second_opinion(cfg: RunConfig, slot) -> dict[str, Any]:
    """lm-eval's HFLM over the same resident model, each adapter switched in: its metrics
    go in the report next to the canonical metric (never replace it)."""
    from cai.pipeline.lmeval import run_lm_eval

    out = {}
    for name in ("base", "sft", "dpo"):
        log(f"lm-eval second opinion: {name}")
        with slot.use(name):
            report = run_lm_eval(slot.model, slot.tokenizer, limit=cfg.eval.lm_eval_limit,
                                 batch_size=cfg.eval.batch_size, format_name=cfg.eval.format or cfg.format,
                                 max_gen_toks=cfg.eval.max_new_tokens, raise_on_failure=False)
        out[name] = {"tasks": {t: {"metrics": v["metrics"], "n": v.get("n")} for t, v in report["tasks"].items()},
                     "lm_eval_version": report.get("lm_eval_version"),
                     "invariants": [r if isinstance(r, dict) else r.to_json() for r in report.get("invariants", [])]}
    return out


DATA_STAGES = {"candidates": stage_candidates, "instructions": stage_instructions,
               "responses": stage_responses, "pairs": stage_pairs}
MODEL_STAGES = {"sft": stage_sft, "dpo": stage_dpo, "eval": stage_eval}


def run_stages(run: Run, todo: list[str]) -> None:
    """Data stages share one slot (the base model generates and judges); each training stage
    and the evaluation get their own, released before the next loads."""
    from cai.invariants import evaluate, memory_invariants
    from cai.pipeline.generation import HFGenerator
    from cai.pipeline.models import SLOT_EVENTS, ModelSlot

    data = [s for s in DATA_STAGES if s in todo]
    if data:
        run.slot_events_mark = len(SLOT_EVENTS)
        with ModelSlot(run.cfg.model, label="data") as slot:
            gen = HFGenerator(slot.model, slot.tokenizer, batch_size=run.cfg.responses.batch_size)
            for stage in data:
                log(f"stage {stage}")
                DATA_STAGES[stage](run, slot, gen)
            del gen  # holds the model: drop it before the slot releases
        run.record_slot_events()
    for stage, run_stage in MODEL_STAGES.items():
        if stage in todo:
            log(f"stage {stage}")
            run.slot_events_mark = len(SLOT_EVENTS)
            with ModelSlot(run.cfg.model, label=stage) as slot:
                run_stage(run, slot)
            run.record_slot_events()
            raise_on_failures(evaluate(memory_invariants(), None))


def run_pipeline(cfg: RunConfig, out: Path, *, resume: bool = False) -> Path:
    """Run every stage not yet complete; return the report path."""
    from cai.invariants import evaluate, offline_invariants
    from cai.pipeline.models import TINY_RANDOM, resolve_source, weight_files

    resolved = resolve_source(cfg.model)  # a bad model source is bad input (exit 2), before anything is written
    if resolved.kind != TINY_RANDOM:
        weight_files(Path(resolved.path), cfg.model.allow_pickle)
    run = Run(cfg, out, resume=resume)
    todo = [s for s in STAGES if not run.is_done(s)]
    if not todo and (out / "reports" / "report.md").is_file():
        log(f"{out}: every stage is already complete and the report exists; nothing to do")
        return out / "reports" / "report.md"
    raise_on_failures(evaluate(offline_invariants(cfg.model), None))  # fail fast, before expensive work
    if todo:
        log(f"run {cfg.name} -> {out} (stages to run: {', '.join(todo)})")
        run_stages(run, todo)
    run.index["status"] = "stages complete"
    run.save()
    return evaluate_run(out)


def evaluate_run(out: Path) -> Path:
    """`pytest suites/ --cai-run OUT`: the evaluation entrypoint, as its own process."""
    suites = Path(__file__).resolve().parents[2] / "suites"
    cmd = [sys.executable, "-m", "pytest", str(suites), "--cai-run", str(out), "-q", "-p", "no:cacheprovider",
           f"--junitxml={out / 'reports' / 'junit.xml'}"]
    log("evaluating: " + " ".join(cmd[2:]))
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        why = "the run is VOID (an invariant failed)" if proc.returncode & VOID_EXIT_CODE else "evaluation tests failed"
        raise InvariantError([Result("evaluation_suites", Status.FAIL, Severity.ERROR,
                                     f"pytest suites/ exited {proc.returncode}: {why}")])
    return out / "reports" / "report.md"


def cli_main(args) -> int:
    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    if args.shard:
        raise BadInputError("--shard: sharded runs are not supported by `cai run` yet; run unsharded")
    started = time.time()
    try:
        report = run_pipeline(cfg, out, resume=args.resume)
    except InvariantError as err:
        log(str(err))
        log(f"run VOID: see {out / 'reports'}")
        return 1
    log(f"done in {time.time() - started:.0f} s; report: {report}")
    print(report)
    return 0
