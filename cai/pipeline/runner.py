"""`cai run`: the stages in order, each writing a certified artifact, gated by invariants.

A stage whose artifact is complete is skipped on `--resume` (after its hashes verify);
an interrupted one continues from its surviving records. Models enter memory one at a
time: one slot for the data stages, one for SFT, one for DPO, one for evaluation (base
plus adapters). A failed error-severity invariant stops the run with exit 1.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cai.config import RunConfig, load_config
from cai.errors import ArtifactError, BadInputError, CaiError, InvariantError
from cai.harness.session import VOID_EXIT_CODE
from cai.invariants.base import Result, Severity, Status, raise_on_failures
from cai.pipeline.sharding import (LOCK_FILE, OWNER_LOCK, SHARDS_DIR, Shard, claim, complete_shards, existing_shards,
                                   run_lock, shard_dir, wait_until)
from cai.pipeline.stages import STAGE_INPUTS, STAGES, downstream
from cai.pipeline.store import (MANIFEST, Artifact, ArtifactWriter, input_entry, read_artifact, read_manifest,
                                sha256_file, write_json_atomic)

def log(message: str) -> None:
    print(f"[cai] {message}", file=sys.stderr, flush=True)


RUN_INDEX = "run.json"


def read_run_index(out: Path) -> dict[str, Any]:
    """`OUT/run.json`, the run's index: the one reader of it, so that no command adopts a
    directory that is not a run. Not a directory, no run.json, unreadable bytes, invalid or
    truncated JSON, or an object without the config hash: bad input naming the file."""
    from cai.pipeline.store import read_json_object

    out = Path(out)
    if not out.is_dir():
        raise BadInputError(f"{out}: run directory not found")
    path = out / RUN_INDEX
    if not path.is_file():
        raise BadInputError(f"{out}: not a cai run directory (no {RUN_INDEX}); refusing to treat it as one")
    index = read_json_object(path, error=BadInputError)
    if not isinstance(index.get("config_hash"), str):
        raise BadInputError(f"{path}: not a cai run index (no 'config_hash')")
    return index


def _machinery(path: Path) -> bool:
    """Lock files a cai process creates before any run data (its claim on the directory)."""
    if path.name in (LOCK_FILE, OWNER_LOCK):
        return True
    return path.name == SHARDS_DIR and path.is_dir() and all(p.is_file() and p.suffix == ".lock" for p in path.iterdir())


def check_out_dir(out: Path, cfg: RunConfig, *, resume: bool) -> dict[str, Any] | None:
    """Whether `cai run` may write its run into `out`, decided before it writes there: the
    index of the run to continue, or None to start afresh (`out` absent or empty, or a run
    interrupted before its first stage: the same command starts it again). Refused: a file,
    a directory that is not a run, a started run without --resume, or with another config."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: exists and is not a directory (--out names the run directory)")
    entries = [p for p in out.iterdir() if not _machinery(p)] if out.is_dir() else []
    if not entries:
        return None
    index = read_run_index(out)
    if not index.get("stages") and all(p.name == RUN_INDEX for p in entries):
        return None
    if not resume:
        raise BadInputError(f"{out}: run directory exists and is not empty (use --resume or another --out)")
    if index["config_hash"] != cfg.hash():
        raise BadInputError(f"{out}: was started with another config (hash {index['config_hash'][:12]}); "
                            "resume needs the same config")
    return index


def check_output_path(path: Path, what: str) -> None:
    """`path` (a directory, made later) can be created and written. Tried, not asked: as
    root `os.access` says yes to a read-only or immutable directory. The probe is removed."""
    import tempfile

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"{what} {path}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cai-probe-", dir=existing))
    except OSError as err:
        raise BadInputError(f"{what} {path}: cannot write in {existing} ({err.strerror})") from None


def discard_unstarted(out: Path, *, remove_dir: bool) -> None:
    """Remove what a run that stopped before its first stage wrote (run.json, its locks),
    and `out` itself when this process created it: a failed start leaves nothing behind."""
    import shutil

    if not out.is_dir() or any(not _machinery(p) and p.name != RUN_INDEX for p in out.iterdir()):
        return
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if remove_dir:
        out.rmdir()


STAGE_LIMITS = {  # stage -> (batch-size key, length key): what an out-of-memory message tells to lower
    "candidates": ("instructions.batch_size", "instructions.max_new_tokens"),
    "instructions": ("critic.batch_size", None),
    "responses": ("responses.batch_size", "responses.max_new_tokens"),
    "sft": ("sft.batch_size", "sft.max_length"),
    "dpo": ("dpo.batch_size", "dpo.max_length"),
    "eval": ("eval.batch_size", "eval.max_new_tokens"),
}


def stage_in_progress(out: Path) -> str | None:
    """The first stage without a complete artifact: stages run in order, so the one a
    failure interrupted (None once all are complete)."""
    for stage in STAGES:
        try:
            if not read_manifest(out / stage).get("complete"):
                return stage
        except ArtifactError:
            return stage
    return None


def stage_fault(err: BaseException, cfg: RunConfig, out: Path, config_path: str) -> CaiError | None:
    """A failure of the machine during a run, said in the run's terms: the stage; for out of
    memory also the batch size in use and what to lower; for a full disk, a refused write
    or a read-only file system the file system's words. None for any other failure."""
    from cai.errors import EnvironmentFault, OutOfMemory, describe_os_error, os_error_in

    stage = stage_in_progress(out)
    where = f"stage {stage}" if stage else "evaluation (pytest suites/)"
    resume = f"then continue with `cai run {config_path} --out {out} --resume`"
    torch = sys.modules.get("torch")  # an out-of-memory error from torch means torch is loaded
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)):
        memory = "host memory" if isinstance(err, MemoryError) else f"{cfg.model.device} memory"
        batch_key, length_key = STAGE_LIMITS.get(stage, (None, None))
        if batch_key is None:
            advice = "free memory on the device"
        else:
            section, key = batch_key.split(".")
            value = getattr(getattr(cfg, section), key)
            advice = f"at {batch_key} = {value}: lower {batch_key}" + (f" or {length_key}" if length_key else "")
            if stage in ("sft", "dpo"):
                advice += f" (raise {stage}.grad_accum to keep the effective batch)"
        if cfg.model.quantization == "none":
            advice += ", or set model.quantization: 8bit / 4bit"
        return OutOfMemory(f"{where}: out of {memory} {advice}; {resume}")
    if (os_err := os_error_in(err)) is not None:
        fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EROFS: "make it writable"}.get(os_err.errno, "fix it")
        return EnvironmentFault(f"{where}: {describe_os_error(os_err)}; {fix}, {resume}")
    return None


class Run:
    """A run directory: one artifact per stage plus `run.json`, the index."""

    def __init__(self, cfg: RunConfig, out: Path, *, resume: bool):
        self.cfg, self.out, self.resume = cfg, out, resume
        self.index_path = out / RUN_INDEX
        self.slot_events_mark = 0  # SLOT_EVENTS index when the current stage's slot opened
        previous = check_out_dir(out, cfg, resume=resume)
        out.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Any] = {"name": cfg.name, "config_hash": cfg.hash(), "config": cfg.model_dump(mode="json"),
                                      "stages": {}, "status": "running",
                                      "stages_required": list(STAGES)}
        if previous is not None:
            self.index["stages"] = previous.get("stages", {})
            self.index["slot_events"] = previous.get("slot_events", [])
            self.index["memory_checks"] = previous.get("memory_checks", [])
        self.save()

    def save(self) -> None:
        """Write run.json, keeping what other processes (the shards of a split) recorded since
        this one read it: their stages and their slot events."""
        if self.index_path.is_file():
            disk = read_run_index(self.out)
            self.index["stages"] = {**disk.get("stages", {}), **self.index["stages"]}
            seen = {json.dumps(e, sort_keys=True) for e in disk.get("slot_events", [])}
            self.index["slot_events"] = disk.get("slot_events", []) + [
                e for e in self.index.get("slot_events", []) if json.dumps(e, sort_keys=True) not in seen]
            checked = {json.dumps(c, sort_keys=True) for c in disk.get("memory_checks", [])}
            self.index["memory_checks"] = disk.get("memory_checks", []) + [
                c for c in self.index.get("memory_checks", []) if json.dumps(c, sort_keys=True) not in checked]
        write_json_atomic(self.index_path, self.index)

    def check_released(self, slot) -> None:
        """After a slot closed: no base-sized model may still be alive (observed by a gc scan),
        and loads stayed one at a time. Recorded in run.json (the stage manifest is written)."""
        from cai.invariants import evaluate, memory_invariants

        results = evaluate(memory_invariants(), slot)
        self.index.setdefault("memory_checks", []).append({"slot": slot.label, "time": time.time(),
                                                           "results": [r.to_json() for r in results]})
        self.save()
        raise_on_failures(results)

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
        manifest = read_artifact(self.stage_dir(stage)).manifest  # verifies hashes and certification
        self.index["stages"].setdefault(stage, {  # a process killed between finalize and save left no entry
            "dir": stage, "certified": manifest["certified"], "records": manifest["outputs"]["records"],
            "seconds": manifest["timings"]["wall_seconds"]})
        return True

    def writer(self, stage: str, *, directory: Path | None = None, extra_inputs: tuple[Path, ...] = ()) -> ArtifactWriter:
        """The stage's artifact (or, with `directory`, a shard of it), naming the stages it
        reads (`STAGE_INPUTS`) and `extra_inputs`, further artifacts (the shards a merge reads)."""
        target = directory or self.stage_dir(stage)
        entries = [input_entry(self.stage_dir(s), target) for s in STAGE_INPUTS[stage]] + \
            [input_entry(d, target) for d in extra_inputs]
        return ArtifactWriter(target, stage, config_hash=self.cfg.hash(), seed=self.cfg.seed,
                              inputs=entries, resume=True)

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


def data_results(run: Run, stage: str, records: list[dict], slot=None) -> list[Result]:
    """The stage's content invariants (`cai.invariants.artifacts`, re-run by every later
    verification); with the stage's open slot, also the encoding checks on its prompts and
    the observed memory check (exactly one base model alive, the slot's)."""
    from cai.invariants import encoding_invariants, evaluate, open_slot_invariants, prompt_tokenizer_subject
    from cai.invariants.artifacts import stage_results

    results = stage_results(stage, records, run.cfg, run.stage_dir(stage))
    if slot is not None:
        if any(isinstance(r.get("prompt"), str) for r in records):
            results += evaluate(encoding_invariants(), prompt_tokenizer_subject(records, slot.tokenizer))
        results += evaluate(open_slot_invariants(), slot)
    return results


def slot_leakage_results(slot) -> list[Result]:
    """Leakage layers 1 (tokenizer) and 5 (behaviour sentinel, a warning with its outputs)
    on the data slot: recorded in the candidates manifest of every run."""
    from cai.invariants.slot import slot_leakage_results as check

    log("leakage layers 1 and 5 on the data slot (tokenizer, behaviour sentinel)")
    return check(slot)


def stage_candidates(run: Run, slot, gen) -> None:
    from cai.pipeline.instructions import generate_instructions

    writer = run.writer("candidates")
    stats = generate_instructions(run.cfg, gen, writer)
    run.finish("candidates", writer, data_results(run, "candidates", writer.done, slot) + slot_leakage_results(slot),
               model=slot.provenance,
               extra={"instructions": stats})


def stage_instructions(run: Run, slot, gen) -> None:
    from cai.pipeline.critic import filter_instructions

    candidates = records_of(run, "candidates")
    writer = run.writer("instructions")
    kept, stats = filter_instructions(run.cfg, gen, candidates)
    extra = write_instructions(run, writer, kept, stats)
    run.finish("instructions", writer, data_results(run, "instructions", writer.done, slot), model=slot.provenance, extra=extra)


def write_instructions(run: Run, writer: ArtifactWriter, kept: list[dict], stats: dict) -> dict:
    """The critic's selection written (its manifest fields returned), or a CaiError when it
    keeps fewer than asked."""
    if stats["short_by"]:
        raise CaiError(f"critic kept {stats['n_kept']} of {stats['n_candidates']} candidates, {run.cfg.instructions.n} "
                       f"asked (confident: {stats.get('n_confident', '-')}, threshold {run.cfg.critic.threshold}); "
                       "raise instructions.overgenerate or lower critic.threshold")
    from cai.pipeline.instructions import add_constraints

    kept, constraint_stats = add_constraints(run.cfg, kept)
    write_missing(writer, kept)
    return {"critic": stats, "critic_margins": [r["critic"]["margin"] for r in kept if r.get("critic")],
            "constraints": constraint_stats}


def stage_responses(run: Run, slot, gen) -> None:
    from cai.pipeline.responses import run_responses, shortfall_error

    writer = run.writer("responses")
    stats = run_responses(run.cfg, gen, records_of(run, "instructions"), writer)
    if (err := shortfall_error(run.cfg, stats)) is not None:
        raise err
    results = data_results(run, "responses", writer.done, slot)
    run.finish("responses", writer, results, model=slot.provenance, extra={"responses": stats})


def stage_pairs(run: Run, slot, gen) -> None:
    from cai.pipeline.pairs import run_pairs

    writer = run.writer("pairs")
    stats = run_pairs(run.cfg, records_of(run, "responses"), writer)
    results = data_results(run, "pairs", writer.done, slot)
    run.finish("pairs", writer, results, model=slot.provenance, extra={"pairs": stats})


def training_stage(cfg: RunConfig, out: Path, stage: str, slot, *, resume: bool, run: Run | None) -> dict:
    """One training stage ("sft" or "dpo") in this process: the one training path of `cai run`
    (one process) and `cai train` (every process of a launch, each with its own slot). Every
    process reads the run's certified inputs and trains; the main process, the one holding
    `run`, opens the stage's artifact before training and seals it after. SFT trains on the
    `responses` records, DPO on the `pairs` records from the SFT adapter."""
    from cai.pipeline.dpo import train_dpo
    from cai.pipeline.sft import train_sft

    writer = run.writer(stage) if run is not None else None
    if stage == "sft":
        result = train_sft(cfg, slot, list(read_artifact(out / "responses").records()), out / "sft", resume=resume)
    else:
        result = train_dpo(cfg, slot, list(read_artifact(out / "pairs").records()), out / "sft" / "adapter",
                           out / "dpo", resume=resume)
    if run is not None:
        _finish_training(run, stage, writer, result, slot)
    return result


def stage_sft(run: Run, slot) -> None:
    training_stage(run.cfg, run.out, "sft", slot, resume=run.resume, run=run)


def stage_dpo(run: Run, slot) -> None:
    training_stage(run.cfg, run.out, "dpo", slot, resume=run.resume, run=run)


def _finish_training(run: Run, stage: str, writer: ArtifactWriter, result: dict, slot) -> None:
    """A training artifact: the loss curve as records, the adapter files hashed."""
    if not writer.done:
        writer.extend(result.get("loss_curve_points", []))
    adapter = Path(result["adapter_dir"])
    from cai.invariants import evaluate, open_slot_invariants
    from cai.invariants.artifacts import stage_results

    files = [p for p in adapter.rglob("*") if p.is_file()]
    files += [p for p in (writer.dir / n for n in ("loss_curve.json", "loss_curve.png", "training.json")) if p.is_file()]
    results = [Result.from_json(r) if isinstance(r, dict) else r for r in result.get("invariants", [])]
    listed = {p.resolve().relative_to(writer.dir.resolve()).as_posix(): {} for p in files}
    results += stage_results(stage, writer.done, run.cfg, writer.dir, listed) + evaluate(open_slot_invariants(), slot)
    run.finish(stage, writer, results, model=slot.provenance, files=files, memory=result.get("memory"),
               extra={k: v for k, v in result.items() if k not in ("invariants", "loss_curve_points")})


def stage_eval(run: Run, slot) -> None:
    from cai.pipeline.compare import generate_eval_responses, load_eval_set

    cfg = run.cfg
    slot.add_adapter("sft", run.stage_dir("sft") / "adapter")
    slot.add_adapter("dpo", run.stage_dir("dpo") / "adapter")
    items = [it for name in cfg.eval.sets for it in load_eval_set(name, cfg.eval.limit)]
    writer = run.writer("eval")
    stats = generate_eval_responses(cfg, slot, items, ["base", "sft", "dpo"], writer)
    results = data_results(run, "eval", writer.done, slot)
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


# --------------------------------------------------------------------------- sharded data stages
# `--shard I/N` (see cai.pipeline.sharding): a shard writes RUN/shards/STAGE/I-of-N, the merge
# turns all N into RUN/STAGE. `pairs` needs no model work and runs once, after the merge.


def shard_candidates(run: Run, gen, shard: Shard, writer: ArtifactWriter) -> dict:
    from cai.pipeline.instructions import generate_candidate_shard

    if run.cfg.instructions.source == "templates":
        return {"units": [], "note": "source: templates: nothing to generate; the merge writes them"}
    siblings = [shard_dir(run.out, "candidates", Shard(i, shard.count)) for i in range(shard.count) if i != shard.index]
    return generate_candidate_shard(run.cfg, gen, writer, shard, siblings, log=log)


def merge_candidates(run: Run, slot, shards: list[Artifact], writer: ArtifactWriter) -> tuple[list[Result], dict]:
    from cai.pipeline import instructions

    if run.cfg.instructions.source == "templates":
        stats = instructions.template_instructions(run.cfg, writer)
    else:
        records, stats = instructions.merge_candidates(run.cfg, [r for a in shards for r in a.records()], len(shards))
        write_missing(writer, records)
    return data_results(run, "candidates", writer.done, slot) + slot_leakage_results(slot), {"instructions": stats}


def shard_instructions(run: Run, gen, shard: Shard, writer: ArtifactWriter) -> dict:
    from dataclasses import asdict

    from cai.pipeline.critic import judge_candidates

    if not run.cfg.critic.enabled:
        return {"judged": 0, "note": "critic.enabled: false: nothing to judge"}
    judgements = judge_candidates(run.cfg, gen, records_of(run, "candidates"), shard)
    write_missing(writer, [{"id": cid, "judgement": asdict(j)} for cid, j in judgements.items()])  # full precision
    return {"judged": len(judgements)}


def merge_instructions(run: Run, slot, shards: list[Artifact], writer: ArtifactWriter) -> tuple[list[Result], dict]:
    from cai.pipeline.critic import Judgement, select_instructions

    judgements = {r["id"]: Judgement(**r["judgement"]) for a in shards for r in a.records()}
    kept, stats = select_instructions(run.cfg, records_of(run, "candidates"), judgements)
    extra = write_instructions(run, writer, kept, stats)
    return data_results(run, "instructions", writer.done, slot), extra


def shard_responses(run: Run, gen, shard: Shard, writer: ArtifactWriter) -> dict:
    from cai.pipeline.responses import run_responses

    return run_responses(run.cfg, gen, records_of(run, "instructions"), writer, shard)


def merge_responses(run: Run, slot, shards: list[Artifact], writer: ArtifactWriter) -> tuple[list[Result], dict]:
    from cai.pipeline.responses import combine_stats, shortfall_error

    order = {r["id"]: i for i, r in enumerate(records_of(run, "instructions"))}
    records = sorted((r for a in shards for r in a.records()), key=lambda r: order[r["id"]])
    stats = combine_stats([a.manifest["extra"]["responses"] for a in shards], records)
    if (err := shortfall_error(run.cfg, stats)) is not None:
        raise err
    write_missing(writer, records)
    return data_results(run, "responses", writer.done, slot), {"responses": stats}


def shard_results(records: list[dict]) -> list[Result]:
    """A shard holds part of a stage's records: it gets the record-level checks; the merge
    runs the stage's own invariants on all of them."""
    from cai.invariants.artifacts import RecordIds

    return [RecordIds().check(records)]


def write_missing(writer: ArtifactWriter, records: list[dict]) -> None:
    """Append the records not yet written (a resumed writer keeps what survived). Duplicate
    ids among `records` mean two units produced the same record: refused."""
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ArtifactError(f"{writer.dir}: record id {dup!r} comes from more than one unit of work")
    done = {r["id"] for r in writer.done}
    writer.extend(r for r in records if r["id"] not in done)


def shard_summary(shards: list[Artifact]) -> dict:
    return {"count": len(shards), "shards": [{"dir": a.dir.name, "records": a.manifest["outputs"]["records"],
                                               "seconds": a.manifest["timings"]["wall_seconds"]} for a in shards]}


SHARDED_STAGES = {"candidates": (shard_candidates, merge_candidates),
                  "instructions": (shard_instructions, merge_instructions),
                  "responses": (shard_responses, merge_responses)}


def run_shard(run: Run, slot, gen, stage: str, shard: Shard) -> None:
    """This process's shard of `stage` (resumable); nothing to do when it is complete."""
    from cai.invariants.memory import memory_snapshot

    directory = shard_dir(run.out, stage, shard)
    if (directory / MANIFEST).is_file() and read_manifest(directory).get("complete"):
        return
    work, _ = SHARDED_STAGES[stage]
    log(f"stage {stage}: shard {shard.name}")
    writer = run.writer(stage, directory=directory)
    stats = work(run, gen, shard, writer)
    writer.finalize(invariants=shard_results(writer.done), model=slot.provenance, memory=memory_snapshot(events_since=run.slot_events_mark),
                    extra={"shard": shard.to_json(), stage: stats})


def merge_shards(run: Run, slot, stage: str, count: int, *, wait: bool) -> None:
    """Merge the N shards of `stage` into its artifact once all are complete (under the run
    lock; whichever process gets there first). `wait`: poll until then, else an error naming
    the shards still missing."""

    def attempt() -> str | None:
        with run_lock(run.out):
            if run.is_done(stage):
                return None
            dirs, missing = complete_shards(run.out, stage, count)
            if missing:
                return f"shard(s) {', '.join(missing)} of {stage}"
            shards = [read_artifact(d) for d in dirs]
            _, merge = SHARDED_STAGES[stage]
            inputs = STAGE_INPUTS[stage]
            upstream = [sha256_file(run.stage_dir(s) / MANIFEST) for s in inputs]
            for a in shards:
                if a.manifest.get("config_hash") != run.cfg.hash():
                    raise ArtifactError(f"{a.dir}: written under another config (hash {str(a.manifest.get('config_hash'))[:12]})")
                if [i["manifest_sha256"] for i in a.manifest.get("inputs", [])] != upstream:
                    raise ArtifactError(f"{a.dir}: made from another {', '.join(inputs)} artifact than {run.out}'s; "
                                        "remove the shard and run it again")
            log(f"stage {stage}: merging {count} shard(s)")
            writer = run.writer(stage, extra_inputs=tuple(dirs))
            results, extra = merge(run, slot, shards, writer)
            run.finish(stage, writer, results, model=slot.provenance, extra={**extra, "sharded": shard_summary(shards)})
            return None

    if wait:
        wait_until(attempt, what=f"the other shards of {stage}", log=log)
    elif (missing := attempt()) is not None:
        raise ArtifactError(f"{run.out}: {missing} not complete; finish with `cai run CONFIG --out {run.out} "
                            f"--shard I/{count}` for each, then merge")


def run_sharded(cfg: RunConfig, out: Path, shard: Shard) -> None:
    """Shard I of N of the data stages, each stage merged before the next starts; training
    and evaluation are left to an unsharded `cai run --resume` of the same directory. The
    caller has checked the config (`check_runnable`) and holds the shard's `claim`."""
    from cai.invariants import evaluate, offline_invariants
    from cai.pipeline.models import SLOT_EVENTS, ModelSlot

    with run_lock(out):
        run = Run(cfg, out, resume=True)  # every shard process opens the same run directory
    todo = [s for s in DATA_STAGES if not run.is_done(s)]
    if not todo:
        log(f"{out}: the data stages are already complete")
        return
    raise_on_failures(evaluate(offline_invariants(cfg.model), None))
    log(f"run {cfg.name} -> {out}, shard {shard.name} (data stages to run: {', '.join(todo)})")
    run.slot_events_mark = len(SLOT_EVENTS)
    with ModelSlot(cfg.model, label="data", shard=shard.name) as slot:
        gen = data_generator(cfg, slot)
        for stage in DATA_STAGES:
            if stage in SHARDED_STAGES:
                if not run.is_done(stage):
                    run_shard(run, slot, gen, stage, shard)
                merge_shards(run, slot, stage, shard.count, wait=True)
            else:
                with run_lock(out):
                    if not run.is_done(stage):
                        log(f"stage {stage}")
                        DATA_STAGES[stage](run, slot, gen)
        del gen
    with run_lock(out):
        run.record_slot_events()
        run.check_released(slot)


def data_generator(cfg: RunConfig, slot):
    """The one generator the data stages share (HF transformers on the slot's model)."""
    from cai.pipeline.generation import HFGenerator

    return HFGenerator(slot.model, slot.tokenizer, batch_size=cfg.responses.batch_size,
                       max_batch_tokens=cfg.generation.max_batch_tokens)


def run_stages(run: Run, todo: list[str]) -> None:
    """Data stages share one slot (the base model generates and judges); each training stage
    and the evaluation get their own, released (and checked released) before the next loads."""
    from cai.pipeline.models import SLOT_EVENTS, ModelSlot

    data = [s for s in DATA_STAGES if s in todo]
    if data:
        run.slot_events_mark = len(SLOT_EVENTS)
        with ModelSlot(run.cfg.model, label="data") as slot:
            gen = data_generator(run.cfg, slot)
            for stage in data:
                split = existing_shards(run.out, stage) if stage in SHARDED_STAGES else {}
                if split:  # a sharded run continued unsharded: merge its shards, never redo or ignore them
                    merge_shards(run, slot, stage, max(split), wait=False)
                    continue
                log(f"stage {stage}")
                DATA_STAGES[stage](run, slot, gen)
            del gen  # holds the model: drop it before the slot releases
        run.record_slot_events()
        run.check_released(slot)
    for stage, run_stage in MODEL_STAGES.items():
        if stage in todo:
            log(f"stage {stage}")
            run.slot_events_mark = len(SLOT_EVENTS)
            with ModelSlot(run.cfg.model, label=stage) as slot:
                run_stage(run, slot)
            run.record_slot_events()
            run.check_released(slot)


def check_runnable(cfg: RunConfig, out: Path | None = None, *, resume: bool = False,
                   config_path: str | None = None, offline: bool = True) -> None:
    """Everything a run can know before it writes a byte into `out` or loads a model, in
    one place for `cai run` and `cai preflight`: the generation backend, the run directory
    (with `out`), the device and quantization backend, the eval sets, the model source, its
    weights, remote code and tokenizer, and (`offline`) offline readiness. Bad input is one
    line naming the config file (`config_path`) and key; a failed offline invariant is exit 1."""
    from cai.invariants import evaluate, offline_invariants
    from cai.pipeline.compare import load_eval_set
    from cai.pipeline.models import TINY_RANDOM, check_device, load_tokenizer, remote_code, resolve_source, weight_files

    where = f"{config_path}: " if config_path else ""

    def at(key: str, check):
        try:
            return check()
        except BadInputError as err:
            line = str(err).splitlines()[0]
            raise type(err)(where + (line if line.startswith(key) else f"{key}: {line}")) from None

    if cfg.generation.backend != "hf":
        raise BadInputError(f"{where}generation.backend: {cfg.generation.backend!r} is not wired into `cai run` "
                            "(VLLMGenerator exists but was never run: no vLLM on cai's development machines); "
                            "use backend: hf, with `--shard I/N` for one process per GPU")
    if out is not None:
        check_out_dir(out, cfg, resume=resume)
        check_output_path(out, "--out")
    at("model", lambda: check_device(cfg.model))
    for i, name in enumerate(cfg.eval.sets):
        at(f"eval.sets[{i}]", lambda: load_eval_set(name))
    resolved = at("model.source", lambda: resolve_source(cfg.model))
    if resolved.kind != TINY_RANDOM:
        at("model.source", lambda: weight_files(Path(resolved.path), cfg.model.allow_pickle))
        note = at("model.source", lambda: remote_code(resolved.path, cfg.model.trust_remote_code))
        if note:
            log(note)
    at("model.source", lambda: load_tokenizer(resolved.path, trust_remote_code=cfg.model.trust_remote_code))
    if offline:
        raise_on_failures(evaluate(offline_invariants(cfg.model), None))


def discard_damaged(run: Run) -> list[str]:
    """`--resume` repairs: verify every stage artifact already on disk as the harness does
    (provenance, hashes, content); a stage that fails, or whose directory lost its manifest,
    is moved to RUN/discarded/ together with every stage downstream of it, so all of them are
    built again. An interrupted (incomplete) artifact is left for its writer to resume.
    Returns the stages discarded."""
    from cai.invariants.check import artifact_results

    damaged: dict[str, str] = {}
    for stage in STAGES:
        directory = run.stage_dir(stage)
        if not directory.exists():
            continue
        try:
            manifest = read_manifest(directory)
        except CaiError as err:
            damaged[stage] = str(err).splitlines()[0]
            continue
        if not manifest.get("complete"):
            continue
        failed = [r for r in artifact_results(directory, config_hash=run.cfg.hash(), config=run.cfg) if r.blocking]
        if failed:
            damaged[stage] = f"{failed[0].name}: {failed[0].evidence}"
    redo = [s for s in STAGES if any(s in downstream(d) for d in damaged)]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for stage in redo:
        if run.stage_dir(stage).exists():
            target = run.out / "discarded" / f"{stage}-{stamp}"
            target.parent.mkdir(exist_ok=True)
            run.stage_dir(stage).rename(target)
            why = damaged.get(stage) or f"downstream of {', '.join(d for d in damaged if stage in downstream(d))}"
            log(f"stage {stage}: fails verification ({why}); moved to {target}, redoing it")
        run.index["stages"].pop(stage, None)
    if redo:
        run.save()
    return redo


def run_pipeline(cfg: RunConfig, out: Path, *, resume: bool = False) -> Path:
    """Run every stage not yet complete (after `--resume` discarded the damaged ones), then
    evaluate: the exit status is always the verdict of a fresh verification."""
    from cai.invariants import evaluate, offline_invariants

    check_runnable(cfg)
    run = Run(cfg, out, resume=resume)
    if resume:
        discard_damaged(run)
    todo = [s for s in STAGES if not run.is_done(s)]
    if not todo:
        log(f"{out}: every stage is complete; verifying and evaluating again")
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
    returncode = run_child(cmd)
    if returncode != 0:
        why = "the run is VOID (an invariant failed)" if returncode & VOID_EXIT_CODE else "evaluation tests failed"
        raise InvariantError([Result("evaluation_suites", Status.FAIL, Severity.ERROR,
                                     f"pytest suites/ exited {returncode}: {why}")])
    return out / "reports" / "report.md"


def run_child(cmd: list[str]) -> int:
    """Run `cmd` to completion as a child that dies with this process: on Linux the kernel
    sends it SIGTERM when the parent dies, even by SIGKILL, when no handler of ours can run."""
    if not sys.platform.startswith("linux"):
        return subprocess.run(cmd).returncode
    parent = os.getpid()

    def die_with_parent() -> None:
        import ctypes
        import signal

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + signal.SIGTERM)

    return subprocess.run(cmd, preexec_fn=die_with_parent).returncode


def cli_main(args) -> int:
    """`cai run`. Bad input is refused before the run directory is touched; a start that fails
    before its first stage leaves nothing behind; a fault of the machine (memory, disk,
    permissions) is reported with the stage it hit (exit codes: cai.cli.EXIT_CODES)."""
    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    shard = Shard.parse(args.shard) if args.shard else None
    started = time.time()
    check_runnable(cfg, out, resume=args.resume or shard is not None, config_path=args.config)
    existed = out.exists()
    try:
        if shard is not None:
            with claim(out, shard):
                run_sharded(cfg, out, shard)
            log(f"shard {shard.name}: data stages complete in {out} ({time.time() - started:.0f} s); "
                f"train and evaluate with: cai run {args.config} --out {out} --resume")
            print(out)
            return 0
        with claim(out, None):
            try:
                report = run_pipeline(cfg, out, resume=args.resume)
            except BaseException:
                discard_unstarted(out, remove_dir=not existed)
                raise
    except InvariantError as err:
        log(str(err))
        log(f"run VOID: see {out / 'reports'}")
        return 1
    except CaiError:
        raise  # already says what and where (a claim refused, bad input found late)
    except Exception as err:
        fault = stage_fault(err, cfg, out, args.config)
        if fault is None:
            raise
        raise fault from err
    log(f"done in {time.time() - started:.0f} s; report: {report}")
    print(report)
    return 0
