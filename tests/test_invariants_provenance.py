"""Provenance on real artifacts written with store.ArtifactWriter: tampering, uncertified or
changed inputs, another config, interrupted artifacts all fail."""

import json

import pytest

from cai.invariants.base import Result, Severity, Status, all_passed, evaluate
from cai.invariants.provenance import (ArtifactSubject, ConfigHashMatches, HashesVerify, InputsCertified,
                                       ManifestComplete, RecordedInvariantsPassed, provenance_invariants)
from cai.pipeline.store import ArtifactWriter, sha256_file


def by_name(results):
    return {r.name: r for r in results}


def run_hash(run):
    return json.loads((run / "run.json").read_text())["config_hash"]


def test_good_run_artifacts_pass(make_run_dir):
    run = make_run_dir()
    for stage in ("candidates", "instructions", "responses"):
        results = evaluate(provenance_invariants(run_hash(run)), run / stage)
        assert all(r.status == Status.PASS for r in results), [r.evidence for r in results]


def test_tampered_data_file_fails(make_run_dir):
    run = make_run_dir()
    shard = next((run / "responses" / "data").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace("Joyful", "Sad"))
    r = HashesVerify().check(run / "responses")
    assert r.status == Status.FAIL and "sha256 differs" in r.evidence and shard.name in r.evidence
    # the downstream view: an artifact whose input was tampered with is not built on certified data
    rogue = run / "responses" / "data" / "part-09999.jsonl"
    rogue.write_text("{}\n")
    assert "not listed" in "\n".join(HashesVerify().check(run / "responses").details["problems"])


def test_tampered_input_fails_downstream(make_run_dir):
    run = make_run_dir()
    shard = next((run / "instructions" / "data").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace("rainbow", "sky"))
    r = InputsCertified().check(run / "responses")
    assert r.status == Status.FAIL and "input instructions" in r.evidence and "sha256 differs" in r.evidence


def test_input_manifest_changed_after_use_fails(make_run_dir):
    run = make_run_dir()
    m = run / "instructions" / "manifest.json"
    data = json.loads(m.read_text())
    data["seed"] = 123  # e.g. the input stage was re-run after sft consumed it
    m.write_text(json.dumps(data, indent=2))
    r = InputsCertified().check(run / "responses")
    assert r.status == Status.FAIL and "changed after this artifact was built" in r.evidence


def test_uncertified_input_fails(tmp_path):
    w = ArtifactWriter(tmp_path / "a", "instructions", config_hash="h")
    w.append({"id": 1, "instruction": "x"})
    w.finalize(invariants=[Result("no_chat_markers", Status.FAIL, Severity.ERROR, "record 1: <|im_start|>")])
    # store.input_entry refuses an uncertified input; a stage that bypasses it writes the entry itself
    entry = {"path": str(tmp_path / "a"), "stage": "instructions",
             "manifest_sha256": sha256_file(tmp_path / "a" / "manifest.json")}
    w2 = ArtifactWriter(tmp_path / "b", "sft", config_hash="h", inputs=[entry])
    w2.finalize(invariants=[Result("records_written", Status.PASS, Severity.ERROR, "test")])
    r = InputsCertified().check(tmp_path / "b")
    assert r.status == Status.FAIL and "not certified" in r.evidence and "no_chat_markers" in r.evidence
    rec = RecordedInvariantsPassed().check(tmp_path / "a")
    assert rec.status == Status.FAIL and "no_chat_markers" in rec.evidence


def test_other_config_fails(make_run_dir):
    run = make_run_dir()
    assert ConfigHashMatches(run_hash(run)).check(run / "responses").status == Status.PASS
    r = ConfigHashMatches("0" * 64).check(run / "responses")
    assert r.status == Status.FAIL and "another config" in r.evidence
    assert ConfigHashMatches().check(ArtifactSubject(run / "responses", config_hash="f" * 64)).status == Status.FAIL


def test_interrupted_artifact_fails(tmp_path):
    w = ArtifactWriter(tmp_path / "a", "responses", config_hash="h", shard_size=2)
    w.extend({"id": i} for i in range(3))  # one shard sealed, no finalize: a crash
    w.close()
    results = by_name(evaluate(provenance_invariants(), tmp_path / "a"))
    assert results["manifest_complete"].status == Status.FAIL
    assert "incomplete" in results["manifest_complete"].evidence


def test_certified_flag_must_agree_with_results(make_run_dir):
    run = make_run_dir()
    m = run / "responses" / "manifest.json"
    data = json.loads(m.read_text())
    data["invariants"].append({"name": "no_chat_markers", "status": "fail", "severity": "error", "evidence": "x"})
    m.write_text(json.dumps(data))  # a hand edit that keeps "certified": true
    r = ManifestComplete().check(run / "responses")
    assert r.status == Status.FAIL and "certified=True" in r.evidence


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"schema": "other"})])
def test_missing_or_foreign_manifest_fails(tmp_path, content):
    d = tmp_path / "x"
    d.mkdir()
    if content is not None:
        (d / "manifest.json").write_text(content)
    results = evaluate(provenance_invariants(), d)
    assert not all_passed(results) and all(r.status == Status.FAIL for r in results)


def test_weights_as_declared_reads_the_loaded_modules(tmp_path):
    """The provenance of a real load records what the modules are; a manifest whose
    declared quantization the weights do not show fails, and so does one that never recorded them."""
    from cai.config import ModelConfig
    from cai.invariants.provenance import WeightsAsDeclared
    from cai.pipeline.models import load_model

    loaded = load_model(ModelConfig(source="tiny-random"))
    provenance = dict(loaded.provenance)
    del loaded
    assert provenance["observed"] == {"quantization": "none", "dtypes": ["float32"]}

    def artifact(name, model):
        w = ArtifactWriter(tmp_path / name, "candidates", config_hash="h")
        w.append({"id": "a", "instruction": "x"})
        w.finalize(invariants=[Result("records_written", Status.PASS, Severity.ERROR, "test")], model=model)
        return tmp_path / name

    assert WeightsAsDeclared().check(artifact("ok", provenance)).status == Status.PASS
    r = WeightsAsDeclared().check(artifact("claims-8bit", {**provenance, "quantization": "8bit"}))
    assert r.status == Status.FAIL and "quantization declared '8bit', loaded 'none'" in r.evidence
    r = WeightsAsDeclared().check(artifact("claims-bf16", {**provenance, "dtype": "bfloat16"}))
    assert r.status == Status.FAIL and "dtype declared 'bfloat16'" in r.evidence
    unrecorded = {k: v for k, v in provenance.items() if k != "observed"}
    assert WeightsAsDeclared().check(artifact("unrecorded", unrecorded)).status == Status.FAIL


def test_tiny_random_refuses_a_quantization_it_would_ignore():
    from cai.config import ModelConfig
    from cai.errors import ModelLoadError
    from cai.pipeline.models import load_model

    with pytest.raises(ModelLoadError, match="never applied to tiny-random"):
        load_model(ModelConfig(source="tiny-random", quantization="8bit"))
