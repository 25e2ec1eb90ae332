"""Provenance of artifacts: a run counts only when every artifact is complete, unaltered,
built from certified inputs that are themselves unaltered, under the run's config.

Subject: an artifact directory (str / Path) or `ArtifactSubject(dir, config_hash=...)`
where `config_hash` is the run's (RunConfig.hash()).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import ArtifactError
from cai.invariants.base import Invariant, all_passed

REQUIRED_KEYS = ("stage", "complete", "certified", "config_hash", "inputs", "outputs", "environment", "invariants")


@dataclass
class ArtifactSubject:
    dir: Path
    config_hash: str | None = None  # the run's config hash, when known
    _manifest: dict[str, Any] | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)

    def __post_init__(self):
        self.dir = Path(self.dir)

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when it cannot be read (`error` says why)."""
        if self._manifest is None and self._error is None:
            from cai.pipeline.store import read_manifest

            try:
                self._manifest = read_manifest(self.dir)
            except ArtifactError as err:
                self._error = str(err)
        return self._manifest

    @property
    def error(self) -> str | None:
        _ = self.manifest
        return self._error


def as_artifact(subject) -> ArtifactSubject:
    return subject if isinstance(subject, ArtifactSubject) else ArtifactSubject(Path(subject))


class ManifestComplete(Invariant):
    """Prevents using an interrupted or hand-made artifact: the manifest must be readable,
    `complete`, carry every provenance key, and its `certified` flag must agree with its
    recorded invariant results."""

    name = "manifest_complete"

    def _check(self, subject):
        a = as_artifact(subject)
        m = a.manifest
        if m is None:
            return False, a.error
        if not m.get("complete"):
            return False, f"{a.dir}: artifact is incomplete (interrupted; finish it with --resume)"
        missing = [k for k in REQUIRED_KEYS if k not in m]
        if missing:
            return False, f"{a.dir}: manifest lacks {', '.join(missing)}"
        from cai.pipeline.store import certifies

        if not isinstance(m["invariants"], list) or not all(isinstance(r, dict) for r in m["invariants"]):
            return False, f"{a.dir}: manifest invariants is not a list of results"
        if bool(m["certified"]) != certifies(m["invariants"]):
            state = ("include failures" if not all_passed(m["invariants"]) else
                     "are missing (nothing was checked)" if not m["invariants"] else
                     "passed" if certifies(m["invariants"]) else
                     "hold no passing error-severity check or an outcome cai never writes")
            return False, f"{a.dir}: certified={m['certified']} but its recorded invariants {state}"
        return True, f"stage {m['stage']!r} complete, {m['outputs'].get('records', 0)} record(s)"


class HashesVerify(Invariant):
    """Prevents results built on altered data: every data file listed in the manifest
    exists and has its recorded sha256, and no unlisted data file sits beside them."""

    name = "hashes_verify"

    def _check(self, subject):
        from cai.pipeline.store import verify_hashes

        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        problems = verify_hashes(a.dir, a.manifest)
        n = len(a.manifest.get("outputs", {}).get("files", {}))
        if not problems:
            return True, f"{n} data file(s) match their sha256"
        return False, problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), {"problems": problems}


class InputsCertified(Invariant):
    """Prevents a stage silently consuming a bad input: each input artifact must exist, be
    complete and certified, verify its own hashes, and its manifest must still have the
    sha256 recorded when this artifact was built (no later change or re-run)."""

    name = "inputs_certified"

    def _check(self, subject):
        from cai.pipeline.store import MANIFEST, input_dir, read_artifact, sha256_file

        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        inputs = a.manifest.get("inputs", [])
        if not isinstance(inputs, list) or not all(isinstance(e, dict) for e in inputs):
            return False, f"{a.dir}: manifest inputs is not a list of entries"
        problems = []
        for entry in inputs:
            path = input_dir(a.dir, entry)
            try:
                read_artifact(path)
            except ArtifactError as err:
                problems.append(f"input {entry.get('stage', '?')}: {str(err).splitlines()[0]}")
                continue
            actual = sha256_file(path / MANIFEST)
            if actual != entry.get("manifest_sha256"):
                problems.append(f"input {entry.get('stage', '?')} ({path}): manifest sha256 {actual[:12]} != recorded "
                                f"{str(entry.get('manifest_sha256'))[:12]} (changed after this artifact was built)")
        if not problems:
            return True, f"{len(inputs)} input(s) certified and unchanged" if inputs else "no inputs"
        return False, problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), {"problems": problems}


class ConfigHashMatches(Invariant):
    """Prevents mixing artifacts produced under different configs (a resumed run whose
    config was edited): the manifest's config_hash must equal the run's config hash."""

    name = "config_hash_matches"

    def __init__(self, config_hash: str | None = None):
        self.config_hash = config_hash

    def _check(self, subject):
        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        expected = self.config_hash or a.config_hash
        got = a.manifest.get("config_hash")
        if expected is None:
            return True, f"no run config to compare with (manifest config_hash {str(got)[:12]})"
        if got == expected:
            return True, f"config_hash {expected[:12]} matches the run's config"
        return False, f"config_hash {str(got)[:12]} != the run's config {expected[:12]} (produced under another config)"


class RecordedInvariantsPassed(Invariant):
    """Prevents counting an artifact whose own stage found a problem: no error-severity
    invariant recorded in its manifest failed."""

    name = "recorded_invariants_passed"

    def _check(self, subject):
        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        recorded = a.manifest.get("invariants", [])
        failed = [r for r in recorded if r.get("status") == "fail"]
        warned = [r for r in recorded if r.get("status") == "warn"]
        if not failed:
            return True, f"{len(recorded)} recorded invariant(s), none failed" + (f" ({len(warned)} warning(s))" if warned else "")
        first = failed[0]
        return False, (f"{len(failed)} recorded invariant(s) failed: {', '.join(r.get('name', '?') for r in failed)}; "
                       f"{first.get('name')}: {str(first.get('evidence', ''))[:120]}")


class InvariantsRecorded(Invariant):
    """Prevents certifying what nothing checked: a complete artifact records at least one
    invariant result (a stage that ran none, or a manifest whose results were deleted, fails)."""

    name = "invariants_recorded"

    def _check(self, subject):
        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        recorded = a.manifest.get("invariants") or []
        if not recorded:
            return False, f"{a.dir}: stage {a.manifest.get('stage')!r} recorded no invariant result"
        return True, f"{len(recorded)} invariant result(s) recorded"


class InputsAsDeclared(Invariant):
    """Prevents a stage artifact built from the wrong inputs (or whose input list was cut
    so that nothing upstream is checked): a stage's manifest names exactly the stages the
    pipeline feeds it (`cai.pipeline.stages.STAGE_INPUTS`), plus, for a merge, its own shards."""

    name = "inputs_as_declared"

    def _check(self, subject):
        from cai.pipeline.stages import STAGE_INPUTS

        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        stage = a.manifest.get("stage")
        if stage not in STAGE_INPUTS:
            return False, f"{a.dir}: unknown stage {stage!r}"
        entries = a.manifest.get("inputs") if isinstance(a.manifest.get("inputs"), list) else []
        got = [e.get("stage") for e in entries if isinstance(e, dict)]
        is_shard = isinstance(a.manifest.get("extra"), dict) and "shard" in a.manifest["extra"]
        want = list(STAGE_INPUTS[stage])
        upstream = [s for s in got if s != stage]
        shards = len(got) - len(upstream)
        if upstream != want or (is_shard and shards):
            return False, f"stage {stage!r} names inputs {got}, the pipeline feeds it {want}"
        from cai.pipeline.store import input_dir

        root = a.dir.parents[2] if is_shard else a.dir.parent  # RUN/shards/STAGE/I-of-N or RUN/STAGE
        for e in entries:
            own_shard = e.get("stage") == stage
            expected = Path(os.path.normpath(root / "shards" / stage if own_shard else root / str(e.get("stage"))))
            where = input_dir(a.dir, e)
            if (where.parent if own_shard else where) != expected:
                return False, f"input {e.get('stage')!r} points at {e.get('path')!r}, not the run's {e.get('stage')} directory"
        return True, f"stage {stage!r} built from {want or 'no input'}" + (f" and {shards} shard(s)" if shards else "")


class WeightsAsDeclared(Invariant):
    """Prevents a run whose model was not loaded as configured (a quantization the loader
    dropped, another dtype) from being reported as that configuration: the weights observed
    after loading (`observed` in the model provenance: the linear layers' quantization, the
    floating dtypes) match the declared `quantization` and `dtype`."""

    name = "weights_as_declared"

    def _check(self, subject):
        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        model = a.manifest.get("model")
        observed = model.get("observed") if isinstance(model, dict) else None
        if not isinstance(observed, dict):
            return False, f"{a.dir}: the model provenance does not record the loaded weights (model.observed)"
        declared_q, declared_dtype = model.get("quantization"), model.get("dtype")
        problems = []
        if observed.get("quantization") != declared_q:
            problems.append(f"quantization declared {declared_q!r}, loaded {observed.get('quantization')!r}")
        if declared_q == "none" and observed.get("dtypes") != [declared_dtype]:
            problems.append(f"dtype declared {declared_dtype!r}, parameters are {observed.get('dtypes')}")
        if problems:
            return False, f"{a.dir}: " + "; ".join(problems)
        return True, f"weights loaded as declared: quantization {declared_q}, dtypes {observed.get('dtypes')}"


class ModelAsConfigured(Invariant):
    """Prevents a run relabelled under another config (its config edited and re-hashed): the
    model each artifact records having loaded — source, dtype, quantization, remote code —
    is the model the run's config names."""

    name = "model_as_configured"

    def __init__(self, model_cfg):
        self.want = {"source": model_cfg.source, "dtype": model_cfg.dtype, "quantization": model_cfg.quantization,
                     "trust_remote_code": model_cfg.trust_remote_code}

    def _check(self, subject):
        a = as_artifact(subject)
        if a.manifest is None:
            return False, a.error
        model = a.manifest.get("model") if isinstance(a.manifest.get("model"), dict) else {}
        odd = [f"{k} {model.get(k)!r} (config: {v!r})" for k, v in self.want.items() if model.get(k) != v]
        if odd:
            return False, f"{a.dir}: the recorded model is not the configured one: " + "; ".join(odd)
        return True, f"model {self.want['source']!r} ({self.want['dtype']}, quantization {self.want['quantization']}) as configured"


def provenance_invariants(config_hash: str | None = None) -> list[Invariant]:
    return [ManifestComplete(), HashesVerify(), InputsCertified(), InputsAsDeclared(), ConfigHashMatches(config_hash),
            RecordedInvariantsPassed(), InvariantsRecorded(), WeightsAsDeclared()]
