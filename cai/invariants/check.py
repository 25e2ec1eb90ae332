"""`cai check PATH... [--format text|json]`: invariants on

- a model: a checkpoint directory (must hold weights), a `.gguf` file, `embedded`,
  `tiny-random` or a locally cached hub id. Only the tokenizer is loaded (the cai way) and
  the model-level leakage sentinels are reported. Exit 0 = safe as a base model under cai.
- a data file (`.jsonl` of SFT, preference or evaluation records; kind from the fields):
  schema, chat markers, format parity, empty / truncated completions, duplicates.
- an artifact directory (holds manifest.json): provenance and hash integrity, recorded
  invariants, peak memory, and the data invariants of its records.
- a run directory (artifact directories below it): all of them, plus run-level checks
  (config hashes agree / match the run's config, model loads never overlap).

Output: text, or JSON — one object `{"subject", "kind", "results": [{"name", "status",
"severity", "evidence"}]}` for one PATH, a list of such objects for several. In run
reports each result name is prefixed with the artifact's path relative to the run
("sft/hashes_verify"). Exit codes: 0 every error-severity invariant passed (warnings
allowed), 1 one failed, 2 bad input (missing path, no weights, unreadable file).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cai.errors import BadInputError, CaiError, ConfigError
from cai.invariants.base import Invariant, Result, Severity, Status, all_passed, evaluate

MODEL_ALIASES = ("embedded", "tiny-random")
REPORT_KEYS = ("name", "status", "severity", "evidence")
SKIP_DIRS = {"reports", ".git", "__pycache__", "checkpoints", "discarded"}


@dataclass
class Report:
    """Invariant results about one subject (a model, data file, artifact or run)."""

    subject: str
    kind: str  # "model" | "data" | "artifact" | "run"
    results: list[Result] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # not part of the JSON contract

    @property
    def ok(self) -> bool:
        return all_passed(self.results)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == Status.FAIL]

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "kind": self.kind,
                "results": [{k: r.to_json()[k] for k in REPORT_KEYS} for r in self.results]}


# --------------------------------------------------------------------------- model


def check_model(source: str | Path, *, allow_pickle: bool = False) -> Report:
    """Model-level leakage sentinels for a checkpoint (tokenizer loaded, weights not)."""
    from cai.config import ModelConfig
    from cai.invariants.leakage import check_tokenizer
    from cai.pipeline.models import TINY_RANDOM, load_tokenizer, remote_code, resolve_source, weight_files

    resolved = resolve_source(ModelConfig(source=str(source), allow_pickle=allow_pickle))
    if resolved.kind != TINY_RANDOM:
        weight_files(Path(resolved.path), allow_pickle)  # no weights -> ModelLoadError (exit 2)
    note = remote_code(resolved.path, trust_remote_code=False)  # loadable only by running its code -> exit 2
    tok, prov = load_tokenizer(resolved.path)
    results = check_tokenizer(tok, prov, source_dir=resolved.path)
    results.append(Result("remote_code_not_run", Status.WARN if note else Status.PASS, Severity.WARN,
                          note or "config.json names no remote code (no auto_map)"))
    return Report(str(source), "model", results, {"resolved": resolved.path, "tokenizer": prov})


# --------------------------------------------------------------------------- data


def check_data(path: str | Path, *, train_format: str | None = None, eval_sets=None,
               critic_enabled: bool | None = None) -> Report:
    from cai.invariants.data import data_invariants, load_records

    rs = load_records(path)
    invs = data_invariants(rs.kind, train_format=train_format, eval_sets=eval_sets, critic_enabled=critic_enabled)
    return Report(str(path), "data", evaluate(invs, rs), {"record_kind": rs.kind, "records": len(rs)})


# --------------------------------------------------------------------------- artifacts and runs


def find_artifacts(run_dir: Path, max_depth: int = 3) -> list[Path]:
    """Artifact directories (holding manifest.json) below a run directory, sorted."""
    from cai.pipeline.store import MANIFEST

    run_dir = Path(run_dir)
    found = []

    def walk(d: Path, depth: int) -> None:
        for child in sorted(d.iterdir()):
            if not child.is_dir() or child.is_symlink() or child.name in SKIP_DIRS:
                continue
            if (child / MANIFEST).is_file():
                found.append(child)
            elif depth > 1:
                walk(child, depth - 1)

    walk(run_dir, max_depth)
    return found


def require_run_dir(path: str | Path) -> Path:
    """`path` as a run directory: it exists and holds a run.json or artifact manifests below
    it. Anything else is bad input, so no command writes reports or stages into a directory
    that is not a run."""
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"{path}: run directory not found")
    if not (path / "run.json").is_file() and not find_artifacts(path):
        raise BadInputError(f"{path}: not a cai run (no run.json and no manifest.json below it)")
    return path


def run_info(run_dir: Path) -> dict[str, Any]:
    """What a run directory says about itself: run.json (if any), its config and config
    hash (from run.json "config_hash" / "config", or config.yaml / config.yml). An
    unreadable run.json or config is bad input naming the file."""
    from cai.config import RunConfig, load_config
    from cai.pipeline.store import read_json_object

    run_dir = Path(run_dir)
    info: dict[str, Any] = {"run_json": None, "config": None, "config_hash": None}
    rj = run_dir / "run.json"
    if rj.is_file():
        data = info["run_json"] = read_json_object(rj, BadInputError)
        if isinstance(data.get("config"), dict):
            try:
                info["config"] = RunConfig.model_validate(data["config"])
            except Exception as err:  # noqa: BLE001 - pydantic ValidationError
                raise ConfigError(f"{rj}: config: {str(err).splitlines()[0]}") from None
        info["config_hash"] = data.get("config_hash")
    if info["config"] is None:
        for name in ("config.yaml", "config.yml"):
            if (run_dir / name).is_file():
                info["config"] = load_config(run_dir / name)
                break
    if info["config_hash"] is None and info["config"] is not None:
        info["config_hash"] = info["config"].hash()
    return info


def _records(artifact_dir: Path, manifest: dict[str, Any]) -> list[dict]:
    """The artifact's data records, read through the one JSONL reader (ArtifactError naming
    file and line on bytes that do not parse)."""
    from cai.pipeline.store import read_jsonl

    records = []
    for name, meta in manifest.get("outputs", {}).get("files", {}).items():
        if not (isinstance(meta, dict) and meta.get("kind") == "file"):
            records.extend(read_jsonl(artifact_dir / name))
    return records


class RecordsReadable(Invariant):
    """Prevents checks from passing over data they could not read: every data file of the
    artifact parses as JSONL objects (bytes that are not UTF-8 or JSON fail, naming file and line)."""

    name = "records_readable"

    def _check(self, subject):
        artifact_dir, manifest = subject
        try:
            records = _records(artifact_dir, manifest)
        except CaiError as err:
            return False, str(err).splitlines()[0]
        return True, f"{len(records)} record(s) read"


def _fail(name: str, evidence: str) -> Result:
    return Result(name, Status.FAIL, Severity.ERROR, evidence)


def artifact_results(artifact_dir: str | Path, *, config_hash: str | None = None, config=None) -> list[Result]:
    """Provenance + recorded invariants + peak memory + the content invariants of the
    artifact's stage (`cai.invariants.artifacts`), re-run on its records. The stage comes
    from the manifest; a shard gets the record-level checks (its merge ran the stage's)."""
    from cai.invariants.artifacts import stage_results
    from cai.invariants.memory import PeakMemoryRecorded
    from cai.invariants.provenance import ArtifactSubject, provenance_invariants
    from cai.pipeline.stages import STAGES

    subject = ArtifactSubject(Path(artifact_dir), config_hash)
    results = evaluate(provenance_invariants(config_hash), subject)
    manifest = subject.manifest
    if manifest is None:
        return results
    results.append(PeakMemoryRecorded().check(manifest))
    readable = RecordsReadable().check((subject.dir, manifest))
    results.append(readable)
    stage = manifest.get("stage")
    is_shard = isinstance(manifest.get("extra"), dict) and "shard" in manifest["extra"]
    if readable.blocking:
        return results
    if is_shard:
        from cai.invariants.artifacts import RecordIds

        return results + [RecordIds().check(_records(subject.dir, manifest))]
    if stage not in STAGES:
        return results + [_fail("content_checked", f"{subject.dir}: unknown stage {stage!r}: its content cannot be checked")]
    if config is None:
        return results + [_fail("content_checked", f"{subject.dir}: the run carries no config: the {stage} "
                                                   "content checks depend on it")]
    from cai.invariants.artifacts import CROSS_STAGE_INPUT, RecordedChecksPresent
    from cai.invariants.provenance import ModelAsConfigured

    files = manifest.get("outputs", {}).get("files", {})
    records = _records(subject.dir, manifest)
    live = stage_results(stage, records, config, subject.dir, files)
    results += live + [ModelAsConfigured(config.model).check(subject),
                       RecordedChecksPresent(stage, {r.name for r in live}, config.eval.lm_eval).check(manifest)]
    if stage in CROSS_STAGE_INPUT:
        results.append(_match_inputs(subject.dir, manifest, stage, records))
    return results


def _match_inputs(artifact_dir: Path, manifest: dict[str, Any], stage: str, records: list[dict]) -> Result:
    from cai.invariants.artifacts import CROSS_STAGE_INPUT, RecordsMatchInputs, StageRecords
    from cai.pipeline.store import input_dir, read_manifest

    entry = next((e for e in manifest.get("inputs", []) if isinstance(e, dict) and e.get("stage") == CROSS_STAGE_INPUT[stage]),
                 None)
    if entry is None:
        return _fail(RecordsMatchInputs.name, f"{artifact_dir}: no {CROSS_STAGE_INPUT[stage]} input to match records against")
    upstream_dir = input_dir(artifact_dir, entry)
    try:
        upstream = _records(upstream_dir, read_manifest(upstream_dir))
    except CaiError as err:
        return _fail(RecordsMatchInputs.name, f"input {entry.get('stage')}: {str(err).splitlines()[0]}")
    return RecordsMatchInputs(upstream).check(StageRecords(stage, records, artifact_dir))


def check_artifact(artifact_dir: str | Path) -> Report:
    artifact_dir = Path(artifact_dir)
    info = run_info(artifact_dir.parent)
    results = artifact_results(artifact_dir, config_hash=info["config_hash"], config=info["config"])
    return Report(str(artifact_dir), "artifact", results)


class ConfigHashesAgree(Invariant):
    """Prevents a run stitched together from artifacts of different configs (an edited
    config between a crash and --resume): every artifact of a run has the same config hash."""

    name = "config_hashes_agree"

    def _check(self, manifests):
        hashes = Counter(str(m.get("config_hash")) for m in manifests.values())
        if len(hashes) <= 1:
            return True, f"{len(manifests)} artifact(s) share config_hash {next(iter(hashes), '-')[:12]}"
        common = hashes.most_common(1)[0][0]
        odd = [f"{name} ({str(m.get('config_hash'))[:12]})" for name, m in manifests.items()
               if str(m.get("config_hash")) != common]
        return False, f"artifacts were produced under {len(hashes)} configs; differing from {common[:12]}: {', '.join(odd)}"


class RunIndexConsistent(Invariant):
    """Prevents judging a run against a config it was not run with: run.json parses, its
    config validates, and the config hashes to the recorded `config_hash`."""

    name = "run_index_consistent"

    def _check(self, run_dir: Path):
        try:
            info = run_info(run_dir)
        except CaiError as err:
            return False, str(err).splitlines()[0]
        cfg, recorded = info["config"], info["config_hash"]
        if cfg is None:
            return False, f"{run_dir}: no config (run.json 'config' or config.yaml): the run cannot be judged"
        if cfg.hash() != recorded:
            return False, f"{run_dir}/run.json: config hashes to {cfg.hash()[:12]}, recorded config_hash {str(recorded)[:12]}"
        return True, f"config {cfg.name!r} hashes to the recorded {recorded[:12]}"


class RequiredStagesPresent(Invariant):
    """Prevents a run missing a stage (a deleted or never-written manifest, an interrupted
    stage) from counting: every stage the run requires has a complete manifest in its
    directory. A run requires every pipeline stage unless its run.json declares fewer
    (`stages_required`, for partial runs built by hand)."""

    name = "required_stages_present"

    def _check(self, subject):
        from cai.pipeline.stages import STAGES
        from cai.pipeline.store import read_manifest

        run_dir, run_json = subject
        declared = (run_json or {}).get("stages_required", list(STAGES))
        if not isinstance(declared, list) or not declared or not set(declared) <= set(STAGES):
            return False, f"{run_dir}/run.json: stages_required {declared!r} is not a non-empty list of stages"
        problems = []
        for stage in declared:
            try:
                manifest = read_manifest(run_dir / stage)
            except CaiError as err:
                problems.append(f"{stage}: {str(err).splitlines()[0]}")
                continue
            if manifest.get("stage") != stage:
                problems.append(f"{stage}: its manifest says stage {manifest.get('stage')!r}")
            elif not manifest.get("complete"):
                problems.append(f"{stage}: incomplete (interrupted; finish with --resume)")
        if problems:
            return False, f"{len(problems)} of {len(declared)} required stage(s) missing or incomplete: " + "; ".join(problems)
        return True, f"all {len(declared)} required stage(s) present and complete"


class RunLayout(Invariant):
    """Prevents a run from being judged on files that are not its own: nothing below the
    run directory is a symbolic link (a stage swapped for a link to an unchecked copy), and
    every artifact sits where the pipeline writes one (a stage directory, a shard of one, or
    a discarded stage), so no second copy of a stage can stand in for the first."""

    name = "run_layout"

    def _check(self, run_dir: Path):
        import os

        from cai.pipeline.stages import STAGES

        links = []
        for root, dirs, files in os.walk(run_dir):
            links += [Path(root, n) for n in dirs + files if Path(root, n).is_symlink()]
        stray = [a.relative_to(run_dir).as_posix() for a in find_artifacts(run_dir)
                 if a.relative_to(run_dir).parts[0] not in (*STAGES, "shards")]
        problems = ([f"{len(links)} symbolic link(s), first {links[0].relative_to(run_dir)}"] if links else []) + \
                   ([f"artifact(s) outside the pipeline's layout: {', '.join(stray[:3])}"] if stray else [])
        if problems:
            return False, f"{run_dir}: " + "; ".join(problems)
        return True, "no symbolic links; every artifact in a stage or shard directory"


class MemoryChecksPassed(Invariant):
    """Prevents ignoring what the run observed after each model slot closed (a base model
    still alive): every released-check recorded in run.json `memory_checks` passed, and
    there is one for every slot the run opened (slot_events loads)."""

    name = "memory_checks_passed"

    def _check(self, run_json):
        checks = (run_json or {}).get("memory_checks")
        loads = [e for e in (run_json or {}).get("slot_events") or [] if isinstance(e, dict) and e.get("event") == "load"]
        if not isinstance(checks, list) or not checks:
            return False, "run.json records no memory check after a slot closed (memory_checks)"
        results = [r for c in checks if isinstance(c, dict) for r in (c.get("results") or [])]
        bad = [r for r in results if not isinstance(r, dict) or r.get("status") != "pass"]
        if bad:
            first = bad[0] if isinstance(bad[0], dict) else {}
            return False, f"{len(bad)} recorded memory check(s) did not pass; {first.get('name')}: {first.get('evidence')}"
        unsharded = [e for e in loads if not e.get("shard")]
        if len(checks) < len(unsharded):
            return False, f"{len(unsharded)} slot(s) opened but {len(checks)} released-check(s) recorded"
        return True, f"{len(checks)} slot(s) checked released after closing, {len(results)} result(s), all passed"


def check_run(run_dir: str | Path) -> Report:
    """Every artifact below `run_dir`, plus run-level checks. Fails closed: whatever cannot
    be read or checked is a failed result naming it, never an exception or a silent skip."""
    from cai.invariants.memory import LoadsSequenced
    from cai.pipeline.store import read_manifest

    run_dir = require_run_dir(run_dir)
    artifacts = find_artifacts(run_dir)
    try:
        info = run_info(run_dir)
    except CaiError:
        info = {"run_json": None, "config": None, "config_hash": None}  # RunIndexConsistent says why
    results: list[Result] = [RunIndexConsistent().check(run_dir), RequiredStagesPresent().check((run_dir, info["run_json"])),
                             RunLayout().check(run_dir)]
    rj = info["run_json"] or {}
    if "memory_checks" in rj or "status" in rj:  # every run.json `cai run` writes has them
        results.append(MemoryChecksPassed().check(rj))
    manifests: dict[str, dict] = {}
    for a in artifacts:
        rel = a.relative_to(run_dir).as_posix()
        try:
            found = artifact_results(a, config_hash=info["config_hash"], config=info["config"])
        except Exception as err:  # noqa: BLE001 - a check that could not run is a failure
            found = [_fail("verification_error", f"{rel}: checking it raised {type(err).__name__}: "
                                                 f"{str(err).splitlines()[0] if str(err) else ''}")]
        results += [Result(f"{rel}/{r.name}", r.status, r.severity, r.evidence, r.details) for r in found]
        try:
            manifests[rel] = read_manifest(a)
        except CaiError:
            pass  # manifest_complete already failed for it
    results.append(ConfigHashesAgree().check(manifests))
    events = (info["run_json"] or {}).get("slot_events")
    # run.json: every finished slot of every process (a killed process's load never released
    # is not there: its memory went with it); manifests only while no slot has closed yet
    results.append(LoadsSequenced().check(events if events else list(manifests.values())))
    return Report(str(run_dir), "run", results, {"artifacts": [a.relative_to(run_dir).as_posix() for a in artifacts],
                                                 "config_hash": info["config_hash"]})


# --------------------------------------------------------------------------- dispatch


def classify(path: str) -> str:
    """'model' | 'data' | 'artifact' | 'run' for a `cai check` argument (BadInputError if
    it names nothing)."""
    from cai.pipeline.models import PICKLE_SUFFIXES, WEIGHT_SUFFIXES
    from cai.pipeline.store import MANIFEST

    if path in MODEL_ALIASES:
        return "model"
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".jsonl":
            return "data"
        if p.suffix == ".gguf":
            return "model"
        raise BadInputError(f"{p}: cannot check this file (expected a .jsonl data file or a .gguf model)")
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return "artifact"
        if find_artifacts(p) or (p / "run.json").is_file():
            return "run"
        if (p / "config.json").is_file() or any(q.suffix in WEIGHT_SUFFIXES + PICKLE_SUFFIXES for q in p.iterdir()):
            return "model"
        raise BadInputError(f"{p}: not a model, artifact or run directory (no config.json or weights, "
                            "no manifest.json below it)")
    if p.suffix in (".jsonl", ".gguf", ".json") or path.startswith((".", "/", "~")) or p.exists():
        raise BadInputError(f"{p}: path not found")
    return "model"  # a hub id: resolves only from the local cache


def check_path(path: str | Path) -> Report:
    path = str(path)
    kind = classify(path)
    if kind == "model":
        return check_model(path)
    if kind == "data":
        return check_data(path)
    if kind == "artifact":
        return check_artifact(path)
    return check_run(path)


# --------------------------------------------------------------------------- output


def _oneline(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def format_text(reports: Iterable[Report]) -> str:
    lines = []
    for rep in reports:
        lines.append(f"{rep.subject} ({rep.kind})")
        width = max((len(r.name) for r in rep.results), default=10)
        for r in rep.results:
            lines.append(f"  {r.status.value.upper():4}  {r.name:<{width}}  {_oneline(r.evidence, 160)}")
        failed = rep.failed
        warns = [r.name for r in rep.results if r.status == Status.WARN]
        if failed:
            verdict = f"FAIL: {len(failed)} invariant(s) failed: {', '.join(r.name for r in failed)}"
        elif rep.kind == "model":
            verdict = "OK: safe as a base model under cai"
        else:
            verdict = "OK: all invariants passed"
        if warns:
            verdict += f" ({len(warns)} warning(s): {', '.join(warns)})"
        lines.append(f"  => {verdict}")
    return "\n".join(lines)


def cli_main(args) -> int:
    reports = [check_path(p) for p in args.paths]
    if getattr(args, "format", "text") == "json":
        payload = reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports]
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_text(reports))
    return 0 if all(r.ok for r in reports) else 1
