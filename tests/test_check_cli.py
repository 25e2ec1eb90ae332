"""`cai check` on models, tokenizer dirs, data files, artifacts and runs: exit 0 clean,
1 an invariant failed, 2 bad input with one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cai import cli

REPORT_KEYS = {"name", "status", "severity", "evidence"}
IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval" / "input_data.jsonl"


def cai(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})},
                          cwd=Path(__file__).resolve().parents[1], timeout=300)


def check(capsys, *args):
    code = cli.main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- models


def test_cai_check_embedded_exits_0_with_a_passing_report():
    proc = cai("check", "embedded", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"subject", "kind", "results"}
    assert report["subject"] == "embedded" and report["kind"] == "model"
    assert all(set(r) == REPORT_KEYS for r in report["results"])
    status = {r["name"]: (r["status"], r["severity"]) for r in report["results"]}
    assert status["chat_template_shipped"] == ("warn", "warning")
    for name in ("chat_template_disabled", "apply_chat_template_refuses", "no_special_token_ids",
                 "decode_encode_roundtrip"):
        assert status[name] == ("pass", "error")


def test_cai_check_missing_path_is_one_line_exit_2():
    proc = cai("check", "/no/such/model_dir")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "path not found" in proc.stderr and not proc.stdout


def test_dir_without_weights_is_exit_2(tmp_path, capsys, embedded_model_dir):
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(Path(embedded_model_dir) / f, tmp_path / f)
    code, out, err = check(capsys, str(tmp_path))
    assert code == 2 and "no weights" in err and err.strip().count("\n") == 0


def test_pickle_only_dir_is_exit_2(tmp_path, capsys):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    code, _, err = check(capsys, str(tmp_path))
    assert code == 2 and "pickle" in err and err.strip().count("\n") == 0


def test_garbage_gguf_is_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    code, out, err = check(capsys, str(bad))
    assert code == 2 and "GGUF" in err and err.strip().count("\n") == 0 and not out


def test_unknown_file_kind_is_exit_2(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    code, _, err = check(capsys, str(f))
    assert code == 2 and "cannot check this file" in err


@pytest.fixture(scope="module")
def checkpoint_dirs(raw_smol_tokenizer, embedded_model_dir, tmp_path_factory):
    """Checkpoint dirs (embedded weights linked in) whose template sits in chat_template.jinja
    or inside tokenizer_config.json."""
    jinja = tmp_path_factory.mktemp("ckpt_jinja")
    raw_smol_tokenizer.save_pretrained(jinja)
    in_config = tmp_path_factory.mktemp("ckpt_config")
    raw_smol_tokenizer.save_pretrained(in_config)
    template = (in_config / "chat_template.jinja").read_text()
    (in_config / "chat_template.jinja").unlink()
    cfg = json.loads((in_config / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (in_config / "tokenizer_config.json").write_text(json.dumps(cfg))
    for d in (jinja, in_config):
        (d / "model.safetensors").symlink_to(Path(embedded_model_dir) / "model.safetensors")
        shutil.copy(Path(embedded_model_dir) / "config.json", d / "config.json")
    return {"jinja": jinja, "config": in_config}


@pytest.mark.parametrize("where,file", [("jinja", "chat_template.jinja"), ("config", "tokenizer_config.json")])
def test_checkpoint_with_shipped_template_is_safe_under_cai(checkpoint_dirs, capsys, where, file):
    code, out, _ = check(capsys, str(checkpoint_dirs[where]), "--format", "json")
    report = json.loads(out)
    assert code == 0
    shipped = next(r for r in report["results"] if r["name"] == "chat_template_shipped")
    assert shipped["status"] == "warn" and file in shipped["evidence"]


# --------------------------------------------------------------------------- data files


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def sft_records(sft_record):
    return [sft_record(i, ins, c) for i, (ins, c) in enumerate([
        ("Name a fruit.", " An apple."), ("Name a planet.", " Mars."), ("Name a metal.", " Iron.")])]


def test_contaminated_data_file_exits_1_naming_record_and_marker(tmp_path, capsys, sft_records):
    sft_records[1]["completion"] = " Mars.<|im_end|>\n<|im_start|>user\nThanks"
    path = write_jsonl(tmp_path / "sft.jsonl", sft_records)
    code, out, _ = check(capsys, str(path))
    assert code == 1
    assert "FAIL  no_chat_markers" in out and "'sft-1'" in out and "<|im_end|>" in out
    code, out, _ = check(capsys, str(path), "--format", "json")
    report = json.loads(out)
    assert report["kind"] == "data" and code == 1
    failed = [r for r in report["results"] if r["status"] == "fail"]
    assert [r["name"] for r in failed] == ["no_chat_markers"]


def test_clean_data_file_exits_0(tmp_path, capsys, sft_records):
    code, out, _ = check(capsys, str(write_jsonl(tmp_path / "sft.jsonl", sft_records)))
    assert code == 0 and "OK: all invariants passed" in out


def test_preference_file_with_hand_built_prompt_exits_1(tmp_path, capsys, sft_records):
    prefs = [{**{k: v for k, v in r.items() if k != "completion"}, "chosen": " Good.", "rejected": " Bad.",
              "margin": 2.0} for r in sft_records]
    prefs[0]["prompt"] = "### Instruction: Name a fruit.\n### Response:"
    code, out, _ = check(capsys, str(write_jsonl(tmp_path / "pairs.jsonl", prefs)))
    assert code == 1 and "prompt_format_parity" in out and "no_chat_markers" in out and "'sft-0'" in out


@pytest.mark.skipif(not IFEVAL.is_file(), reason="shared IFEval data not present")
def test_ifeval_prompts_file_is_clean(capsys):
    code, out, _ = check(capsys, str(IFEVAL), "--format", "json")
    assert code == 0 and json.loads(out)["kind"] == "data"


def test_bad_json_line_is_exit_2_with_file_and_line(tmp_path, capsys, sft_records):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(sft_records[0]) + "\n" + '{"id": "x", "instr')
    code, _, err = check(capsys, str(path))
    assert code == 2 and f"{path}:2" in err


# --------------------------------------------------------------------------- artifacts and runs


def test_run_dir_checks_every_artifact(make_run_dir, capsys):
    run = make_run_dir()
    code, out, _ = check(capsys, str(run), "--format", "json")
    report = json.loads(out)
    assert code == 0, [r for r in report["results"] if r["status"] != "pass"]
    assert report["kind"] == "run"
    names = {r["name"] for r in report["results"]}
    assert {"instructions/hashes_verify", "responses/hashes_verify", "responses/inputs_certified", "responses/config_hash_matches",
            "responses/no_chat_markers", "responses/critic_margins_present", "config_hashes_agree", "loads_sequenced"} <= names


def test_tampered_run_exits_1(make_run_dir, capsys):
    run = make_run_dir()
    shard = next((run / "responses" / "data").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace("Joyful", "<|im_start|>assistant Joyful"))
    code, out, _ = check(capsys, str(run))
    assert code == 1
    assert "FAIL  responses/hashes_verify" in out and "FAIL  responses/no_chat_markers" in out


def test_artifact_dir_and_several_paths(make_run_dir, capsys, tmp_path, sft_records):
    run = make_run_dir()
    data = write_jsonl(tmp_path / "d.jsonl", sft_records)
    code, out, _ = check(capsys, str(run / "responses"), str(data), "--format", "json")
    reports = json.loads(out)
    assert code == 0 and isinstance(reports, list) and [r["kind"] for r in reports] == ["artifact", "data"]


def test_run_with_failed_recorded_invariant_exits_1(make_run_dir, capsys, sft_record):
    bad = [sft_record(0, "Name a fruit.", " [INST] apple [/INST]"), sft_record(1, "Name a planet.", " Mars.")]
    run = make_run_dir(sft_records=bad)
    code, out, _ = check(capsys, str(run))
    assert code == 1 and "FAIL  responses/recorded_invariants_passed" in out and "no_chat_markers" in out


def test_eval_outputs_scored_on_another_format_fail(make_run_dir, capsys):
    """A hand-made eval artifact in which base saw raw instructions in the primary suite: the
    live content checks of `cai check` name the format and the prompt mismatch. (A real run's
    eval artifact, damaged many ways, is in test_fail_closed.py.)"""
    from cai.pipeline import formats
    from cai.pipeline.store import ArtifactWriter, input_entry

    run = make_run_dir()
    cfg_hash = json.loads((run / "run.json").read_text())["config_hash"]
    w = ArtifactWriter(run / "eval", "eval", config_hash=cfg_hash, inputs=[input_entry(run / "responses", run / "eval")])
    for suite, fmt in (("primary", "instruction_response"), ("raw_probe", "raw")):
        for model in ("base", "sft"):
            for k, ins in enumerate(["Name a fruit.", "Name a planet."]):
                prompt = formats.render(fmt, ins)
                fmt_used = fmt
                if model == "base" and suite == "primary":
                    fmt_used, prompt = "raw", ins  # base scored on raw instructions in the primary suite
                w.append({"id": f"{suite}/{model}/{k}", "suite": suite, "model": model, "key": k, "instruction": ins,
                          "eval_set": "stage1", "format": fmt_used, "prompt": prompt, "response": "x", "stop_reason": "eos"})
    w.finalize(invariants=[], model={"source": "tiny-random"}, memory={"peak_rss_mb": 300.0})
    code, out, _ = check(capsys, str(run))
    assert code == 1
    assert "FAIL  eval/format_matches_training" in out and "FAIL  eval/prompts_identical_across_models" in out
    assert "FAIL  eval/inputs_as_declared" in out and "FAIL  eval/invariants_recorded" in out
