"""The gate fails closed: a finished real run (the embedded model, every stage) is damaged
in many ways — some edits re-sealed with valid hashes and counts all the way down the
manifest chain, so that only a content check can notice — and for every one
`pytest suites/ --cai-run` exits non-zero with a VOID report, `cai report` exits 1 with a
VOID report, and `cai check` exits 1. An undamaged copy moved with `mv` still counts, and
`cai run --resume` redoes a damaged stage with everything downstream of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from cai.cli import main as cai_main
from cai.pipeline.stages import downstream
from cai.pipeline.store import MANIFEST, sha256_file, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "name": "fail-closed", "seed": 0, "model": {"source": "embedded"},
    "instructions": {"n": 4, "overgenerate": 3.0, "seeds_per_prompt": 3, "max_new_tokens": 32, "batch_size": 4},
    "critic": {"threshold": 0.0, "batch_size": 4},
    "responses": {"shots": 2, "n_candidates": 3, "max_new_tokens": 32, "batch_size": 4},
    "pairs": {"min_margin": 0.0},
    "sft": {"max_steps": 2, "batch_size": 2, "max_length": 96},
    "dpo": {"max_steps": 2, "batch_size": 2, "max_length": 96, "precompute_ref_log_probs": False},
    "eval": {"sets": ["stage1"], "limit": 6, "max_new_tokens": 24, "batch_size": 6, "lm_eval_limit": 2,
             "bootstrap_resamples": 500},
}


def cai(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), timeout=1800)


def suites(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", str(REPO / "suites"), "--cai-run", str(run), "-q",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=REPO, timeout=900)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, run directory) of one complete `cai run` through the real CLI."""
    tmp = tmp_path_factory.mktemp("fail-closed")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    proc = cai("run", str(config), "--out", str(tmp / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, tmp / "run"


# --------------------------------------------------------------------------- damage


def records(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in data_file(run, stage).read_text().splitlines() if line.strip()]


def data_file(run: Path, stage: str) -> Path:
    return sorted((run / stage / "data").glob("*.jsonl"))[0]


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / MANIFEST).read_text())


def reseal(run: Path, stage: str) -> None:
    """Make an edit of `stage` look legitimate: recompute its files' sha256, sizes and record
    counts, then every downstream manifest's input hashes, in run order."""
    for s in downstream(stage):
        m = manifest(run, s)
        for name, meta in m["outputs"]["files"].items():
            path = run / s / name
            meta.update(sha256=sha256_file(path), bytes=path.stat().st_size)
            if meta.get("kind") != "file":
                meta["records"] = sum(1 for line in path.read_text().splitlines() if line.strip())
        m["outputs"]["records"] = sum(v["records"] for v in m["outputs"]["files"].values())
        for entry in m["inputs"]:
            entry["manifest_sha256"] = sha256_file(run / s / entry["path"] / MANIFEST)
        write_json_atomic(run / s / MANIFEST, m)


def edit_records(stage: str, edit: Callable[[list[dict]], list[dict]], *, sealed: bool = True):
    def damage(run: Path) -> None:
        rows = edit(records(run, stage))
        data_file(run, stage).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if sealed:
            reseal(run, stage)
    return damage


def edit_manifest(stage: str, edit: Callable[[dict], None], *, sealed: bool = False):
    def damage(run: Path) -> None:
        m = manifest(run, stage)
        edit(m)
        write_json_atomic(run / stage / MANIFEST, m)
        if sealed:
            reseal(run, stage)
    return damage


def write_bytes(relpath: str, make: Callable[[bytes], bytes]):
    def damage(run: Path) -> None:
        path = run / relpath
        path.write_bytes(make(path.read_bytes()))
    return damage


def first_record(field: str, value_of: Callable[[dict], object]):
    def edit(rows: list[dict]) -> list[dict]:
        rows[0][field] = value_of(rows[0])
        return rows
    return edit


def set_field(key: str, value_of: Callable[[dict], object]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m[key] = value_of(m)
    return edit


def flip_recorded_status(m: dict) -> None:
    m["invariants"][0]["status"] = "fail"  # `certified` left true


def drop_eval_record_of(model: str):
    def edit(rows: list[dict]) -> list[dict]:
        victim = next(i for i, r in enumerate(rows) if r["model"] == model)
        return rows[:victim] + rows[victim + 1:]
    return edit


def nan_loss(rows: list[dict]) -> list[dict]:
    rows[-1]["loss"] = float("nan")
    return rows


def edit_run_json(edit: Callable[[dict], None]):
    def damage(run: Path) -> None:
        index = json.loads((run / "run.json").read_text())
        edit(index)
        write_json_atomic(run / "run.json", index)
    return damage


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def with_bad_utf8(data: bytes) -> bytes:
    return data.replace(b"\n", b" \xff\xfe\n", 1)


def flip_one_byte(data: bytes) -> bytes:
    i = data.index(b'"completion"') if b'"completion"' in data else len(data) // 2
    return data[:i + 20] + bytes([data[i + 20] ^ 0x01]) + data[i + 21:]


def rm(relpath: str):
    return lambda run: (run / relpath).unlink()


def extra_data_file(stage: str):
    return lambda run: shutil.copy(data_file(run, stage), run / stage / "data" / "part-99999.jsonl")


def marker_in_eval_response(r: dict) -> str:
    return r["response"] + " <|im_start|>assistant"


def lower_eval_limit(index: dict) -> None:
    index["config"]["eval"]["limit"] = 3  # hash left as it was


def bad_utf8_sealed(run: Path) -> None:
    path = run / "responses" / "data" / "part-00000.jsonl"
    path.write_bytes(with_bad_utf8(path.read_bytes()))
    m = manifest(run, "responses")
    m["outputs"]["files"]["data/part-00000.jsonl"].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    write_json_atomic(run / "responses" / MANIFEST, m)
    for s in downstream("responses")[1:]:  # re-seal the chain below it
        mm = manifest(run, s)
        for entry in mm["inputs"]:
            entry["manifest_sha256"] = sha256_file(run / s / entry["path"] / MANIFEST)
        write_json_atomic(run / s / MANIFEST, mm)


def rehash_config(edit: Callable[[dict], None]):
    """Relabel the run: edit its config, give run.json and every manifest the new hash, re-seal."""
    def damage(run: Path) -> None:
        from cai.config import RunConfig
        from cai.pipeline.stages import STAGES

        index = json.loads((run / "run.json").read_text())
        edit(index["config"])
        index["config_hash"] = RunConfig.model_validate(index["config"]).hash()
        write_json_atomic(run / "run.json", index)
        for stage in STAGES:
            m = manifest(run, stage)
            m["config_hash"] = index["config_hash"]
            write_json_atomic(run / stage / MANIFEST, m)
        reseal(run, "candidates")
    return damage


def edit_trainer_settings(stage: str, edit: Callable[[dict], None]):
    """Edit what the trainer recorded it ran with (training.json), then re-seal."""
    def damage(run: Path) -> None:
        path = run / stage / "training.json"
        summary = json.loads(path.read_text())
        edit(summary["trainer_config"])
        write_json_atomic(path, summary)
        reseal(run, stage)
    return damage


def linked_copy(stage: str, edit: Callable[[dict], None]):
    """Replace a (terminal) stage directory by a symbolic link to an edited copy outside the
    run whose own hashes are fixed."""
    def damage(run: Path) -> None:
        outside = run.parent / f"outside-{stage}"
        shutil.copytree(run / stage, outside)
        shutil.rmtree(run / stage)
        os.symlink(outside, run / stage)
        rows = [edit(r) or r for r in records(run, stage)]
        path = data_file(run, stage)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        m = manifest(run, stage)
        m["outputs"]["files"][f"data/{path.name}"].update(sha256=sha256_file(path), bytes=path.stat().st_size)
        write_json_atomic(run / stage / MANIFEST, m)
    return damage


def stray_copy_of(stage: str):
    def damage(run: Path) -> None:
        shutil.copytree(run / stage, run / f"zz_{stage}")
    return damage


def fail_memory_checks(index: dict) -> None:
    for check in index["memory_checks"]:
        for r in check["results"]:
            r.update(status="fail", evidence="2 base models resident")


def redirect_input(stage: str, to: str):
    def edit(m: dict) -> None:
        m["inputs"][0]["path"] = f"../{to}"
    return edit_manifest(stage, edit)


def keep_recorded(*names: str):
    return set_field("invariants", lambda m: [r for r in m["invariants"] if r["name"] in names])


def rotate_completions(rows: list[dict]) -> list[dict]:
    completions = [r["completion"] for r in rows]
    for r, c in zip(rows, completions[1:] + completions[:1]):
        r["completion"] = c
    return rows


def bypass_the_verifier(rows: list[dict]) -> list[dict]:
    """A quality gate that scored but did not select: record 0 gets a verifiable constraint
    (the whole response in double quotes) its chosen completion fails, while another usable
    candidate, now quoted, passes; its verifier block says so, as such a stage would write."""
    from cai.pipeline.formats import COMPLETION_PREFIX

    r = rows[0]
    chosen = r["completion"][len(COMPLETION_PREFIX):]
    other = next(k for k in range(len(r["candidates"])) if k != r["chosen_index"])
    r["candidates"][other].update(text=f'"{chosen.strip()}"', stop_reason="eos", usable=True, unusable_reason=None)
    constraint = {"instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    r.update(constraint, verifier={**constraint, "source": "record", "chosen_passes": False, "passing_candidates": 1})
    return rows


def easier_eval_items(rows: list[dict]) -> list[dict]:
    from cai.pipeline.formats import render

    for r in rows:
        old = render(r["format"], r["instruction"])
        r["instruction"] = "Say anything you like."
        r["prompt"] = r["prompt"][: -len(old)] + render(r["format"], r["instruction"])
    return rows


def another_instruction(rows: list[dict]) -> list[dict]:
    from cai.pipeline.formats import render

    for r in rows:
        r["instruction"] = "Reply with a haiku about cats: " + r["instruction"]
        r["prompt"] = render(r["format"], r["instruction"])
    return rows


# (id, damage, a fragment of a failing result's name the damage must produce)
DAMAGES = [
    ("eval-manifest-removed", rm(f"eval/{MANIFEST}"), "required_stages_present"),
    ("run-json-cut-in-half", write_bytes("run.json", cut), "run_index_consistent"),
    ("run-json-config-edited", edit_run_json(lower_eval_limit), "run_index_consistent"),
    ("manifest-not-an-object", write_bytes(f"sft/{MANIFEST}", lambda _: b"[1, 2]\n"), "sft/manifest_complete"),
    ("manifest-truncated", write_bytes(f"instructions/{MANIFEST}", cut), "instructions/manifest_complete"),
    ("non-utf8-byte-in-data", write_bytes("responses/data/part-00000.jsonl", with_bad_utf8), "responses/hashes_verify"),
    ("non-utf8-byte-resealed", bad_utf8_sealed, "responses/records_readable"),
    ("byte-flipped-in-pairs", write_bytes("pairs/data/part-00000.jsonl", flip_one_byte), "pairs/hashes_verify"),
    ("data-file-removed", rm("responses/data/part-00000.jsonl"), "responses/hashes_verify"),
    ("unlisted-data-file", extra_data_file("pairs"), "pairs/hashes_verify"),
    ("adapter-weights-removed", rm("sft/adapter/adapter_model.safetensors"), "sft/hashes_verify"),
    ("recorded-failure-hidden", edit_manifest("responses", flip_recorded_status), "responses/manifest_complete"),
    ("recorded-results-deleted", edit_manifest("eval", set_field("invariants", lambda m: []), sealed=True),
     "eval/invariants_recorded"),
    ("dpo-inputs-cut-resealed", edit_manifest("dpo", set_field("inputs", lambda m: []), sealed=True),
     "dpo/inputs_as_declared"),
    ("chat-marker-in-eval-response-resealed", edit_records("eval", first_record("response", marker_in_eval_response)),
     "eval/no_chat_markers"),
    ("chat-marker-in-completion-resealed",
     edit_records("responses", first_record("completion", lambda r: r["completion"] + " [INST] more [/INST]")),
     "responses/no_chat_markers"),
    ("eval-response-lost-resealed", edit_records("eval", drop_eval_record_of("sft")), "eval/eval_coverage"),
    ("eval-cap-relabelled-and-rehashed", rehash_config(lambda c: c["eval"].update(max_new_tokens=48)),
     "eval/eval_decoding_as_configured"),
    ("eval-response-not-cut-at-its-stop-resealed",
     edit_records("eval", first_record("response", lambda r: r["response"] + "\nInstruction: and another")),
     "eval/eval_decoding_as_configured"),
    ("eval-prompt-changed-resealed",
     edit_records("eval", first_record("prompt", lambda r: r["prompt"].replace("Instruction:", "Instruction :"))),
     "eval/prompt_format_parity"),
    ("instruction-dropped-resealed", edit_records("instructions", lambda rows: rows[1:]), "instructions/instruction_count"),
    ("critic-margin-below-threshold-resealed",
     edit_records("instructions", first_record("critic", lambda r: {**r["critic"], "margin": -2.0})),
     "instructions/critic_selected"),
    ("loss-nan-resealed", edit_records("dpo", nan_loss), "dpo/training_outputs"),
    ("pair-chosen-equals-rejected-resealed", edit_records("pairs", first_record("rejected", lambda r: r["chosen"])),
     "pairs/chosen_differs_from_rejected"),
    ("declared-quantization-edited-resealed",
     edit_manifest("sft", lambda m: m["model"].update(quantization="4bit"), sealed=True), "sft/weights_as_declared"),
    ("config-relabelled-and-rehashed", rehash_config(lambda c: c["model"].update(source="tiny-random")),
     "model_as_configured"),
    ("lora-rank-relabelled-and-rehashed", rehash_config(lambda c: c["sft"]["lora"].update(r=64)), "sft/training_outputs"),
    ("learning-rate-relabelled-and-rehashed", rehash_config(lambda c: c["sft"].update(learning_rate=1e-3)),
     "sft/training_outputs"),
    ("dpo-beta-relabelled-and-rehashed", rehash_config(lambda c: c["dpo"].update(beta=0.3)), "dpo/training_outputs"),
    ("trainer-reference-mode-edited-resealed",
     edit_trainer_settings("dpo", lambda t: t.update(precompute_ref_log_probs=True)), "dpo/training_outputs"),
    ("templates-relabelled-and-rehashed", rehash_config(lambda c: c["instructions"].update(source="templates")),
     "instructions/instruction_records"),
    ("stage-replaced-by-a-link-to-an-edited-copy",
     linked_copy("eval", lambda r: r.update(response=r["response"] + " <|im_start|>assistant")), "run_layout"),
    ("stray-second-eval-artifact", stray_copy_of("eval"), "run_layout"),
    ("memory-checks-failed-in-run-json", edit_run_json(fail_memory_checks), "memory_checks_passed"),
    ("eval-input-redirected", redirect_input("eval", "dpo"), "eval/inputs_as_declared"),
    ("leakage-results-deleted", edit_manifest("candidates", keep_recorded("instruction_records")),
     "candidates/recorded_checks_present"),
    ("only-a-warning-recorded", edit_manifest("candidates", set_field("invariants", lambda m: [
        {"name": "anything", "status": "warn", "severity": "warning", "evidence": "x"}])), "candidates/manifest_complete"),
    ("eval-items-replaced-resealed", edit_records("eval", easier_eval_items), "eval/eval_coverage"),
    ("responses-instructions-replaced-resealed", edit_records("responses", another_instruction),
     "responses/records_match_inputs"),
    ("completions-moved-between-instructions-resealed", edit_records("responses", rotate_completions),
     "pairs/records_match_inputs"),
    ("verifier-gate-not-applied-resealed", edit_records("responses", bypass_the_verifier),
     "responses/gated_chosen_passes_when_one_could"),
    ("duplicate-sft-record-resealed", edit_records("responses", lambda rows: rows + rows[:1]), "responses/record_schema"),
]


def test_the_finished_run_counts(finished_run):
    _, run = finished_run
    proc = suites(run)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((run / "reports" / "invariants.json").read_text())["verdict"] == "VALID"
    assert cai_main(["check", str(run)]) == 0


@pytest.mark.parametrize("damage, expected", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_damaged_run_is_void_everywhere(finished_run, tmp_path, damage, expected, capsys):
    _, original = finished_run
    run = tmp_path / "damaged"
    shutil.copytree(original, run, ignore=shutil.ignore_patterns("reports"))
    damage(run)

    proc = suites(run)
    assert proc.returncode != 0, proc.stdout[-3000:]
    report = json.loads((run / "reports" / "invariants.json").read_text())
    assert report["verdict"] == "VOID"
    assert any(expected in name.replace("::", "/") for name in report["failed"]), report["failed"]
    md = (run / "reports" / "report.md").read_text()
    assert "**VOID**" in md and "## Results" not in md
    assert not (run / "reports" / "results.json").exists()

    assert cai_main(["report", str(run)]) == 1
    assert "**VOID**" in (run / "reports" / "report.md").read_text()
    assert cai_main(["check", str(run)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_moved_copy_still_counts_and_resumes(finished_run, tmp_path):
    config, original = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    moved = tmp_path / "moved"
    os.rename(copy, moved)
    proc = suites(moved)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert cai_main(["report", str(moved)]) == 0
    assert cai_main(["check", str(moved)]) == 0
    resumed = cai("run", str(config), "--out", str(moved), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "every stage is complete" in resumed.stderr


def test_resume_redoes_a_damaged_stage_and_everything_downstream(finished_run, tmp_path):
    config, original = finished_run
    run = tmp_path / "repair"
    shutil.copytree(original, run)
    edit_records("dpo", nan_loss)(run)  # sealed: only the content check sees it
    before = {s: sha256_file(run / s / MANIFEST) for s in ("candidates", "responses", "sft", "dpo", "eval")}
    proc = cai("run", str(config), "--out", str(run), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage dpo: fails verification (training_outputs" in proc.stderr
    assert "stage eval: fails verification (downstream of dpo)" in proc.stderr
    discarded = sorted(p.name.split("-")[0] for p in (run / "discarded").iterdir())
    assert discarded == ["dpo", "eval"]
    after = {s: sha256_file(run / s / MANIFEST) for s in before}
    assert [s for s in before if before[s] != after[s]] == ["dpo", "eval"]  # upstream kept, downstream rebuilt
    assert cai_main(["check", str(run)]) == 0
