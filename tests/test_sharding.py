"""`cai run --shard I/N`: the data stages split over processes merge into the artifacts of an
unsharded run. Real processes on the embedded model, one of them SIGKILLed mid-stage and
restarted; the merge refuses inconsistent shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cai.config import RunConfig
from cai.errors import ArtifactError, BadInputError
from cai.pipeline.sharding import Shard, shard_dir
from cai.pipeline.store import MANIFEST, ArtifactWriter, read_artifact, read_manifest, write_json_atomic

DATA = ("candidates", "instructions", "responses", "pairs")
CONFIG = {
    "name": "shard-test", "seed": 0, "model": {"source": "embedded"},
    # 1 unit of 4 prompts per candidate round; critic units of 4; responses units of 1
    "instructions": {"n": 4, "overgenerate": 3.0, "seeds_per_prompt": 3, "max_new_tokens": 32, "batch_size": 4},
    "critic": {"threshold": 0.0, "batch_size": 4},
    "responses": {"shots": 2, "n_candidates": 3, "max_new_tokens": 48, "batch_size": 1},
    "pairs": {"min_margin": 0.0},
}


# --------------------------------------------------------------------------- the shard spec


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))))
def test_shard_spec_round_trips(spec):
    i, n = spec
    shard = Shard.parse(f"{i}/{n}")
    assert (shard.index, shard.count) == (i, n) and shard.name == f"{i}-of-{n}"


@given(st.integers(1, 16), st.integers(0, 500))
def test_every_unit_has_exactly_one_shard(n, unit):
    assert sum(Shard(i, n).owns(unit) for i in range(n)) == 1


@pytest.mark.parametrize("spec", ["4/4", "1/0", "-1/2", "a/b", "3", "1/2/3", ""])
def test_bad_shard_spec_is_one_line_bad_input(spec):
    with pytest.raises(BadInputError) as err:
        Shard.parse(spec)
    assert "\n" not in str(err.value) and "--shard" in str(err.value)


def test_cli_rejects_a_bad_shard_with_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    proc = subprocess.run([sys.executable, "-m", "cai", "run", str(cfg), "--out", str(tmp_path / "r"), "--shard", "2/2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "shard index must be in 0..1" in proc.stderr


def test_merge_refuses_duplicate_records(tmp_path):
    from cai.pipeline.runner import write_missing

    writer = ArtifactWriter(tmp_path / "a", "responses", config_hash="h")
    with pytest.raises(ArtifactError, match="'x' comes from more than one unit"):
        write_missing(writer, [{"id": "x"}, {"id": "y"}, {"id": "x"}])


# --------------------------------------------------------------------------- real runs


def _shard_cmd(config: Path, out: Path, spec: str) -> list[str]:
    return [sys.executable, "-m", "cai", "run", str(config), "--out", str(out), "--shard", spec]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An unsharded reference (the runner's own data stages, in process) and the same config
    as 2 concurrent shard processes, shard 1 SIGKILLed after its first response and restarted."""
    from cai.pipeline.runner import DATA_STAGES, Run, run_stages

    tmp = tmp_path_factory.mktemp("sharding")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference = tmp / "reference"
    run_stages(Run(RunConfig.model_validate(CONFIG), reference, resume=False), list(DATA_STAGES))

    sharded = tmp / "sharded"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on a 2-core machine
    shard0 = subprocess.Popen(_shard_cmd(config, sharded, "0/2"), env=env, stderr=subprocess.PIPE, text=True)
    shard1 = subprocess.Popen(_shard_cmd(config, sharded, "1/2"), env=env, stderr=subprocess.DEVNULL)
    partial = shard_dir(sharded, "responses", Shard(1, 2)) / "data" / "part-00000.jsonl.partial"
    deadline = time.time() + 900
    while shard1.poll() is None and time.time() < deadline:
        if partial.is_file() and partial.read_bytes().count(b"\n") >= 1:
            shard1.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    killed_rc = shard1.wait()
    written_before_kill = len(partial.read_bytes().splitlines()) if partial.is_file() else None
    restarted = subprocess.run(_shard_cmd(config, sharded, "1/2"), env=env, capture_output=True, text=True, timeout=900)
    _, shard0_err = shard0.communicate(timeout=900)
    return {"reference": reference, "sharded": sharded, "config": config, "killed_rc": killed_rc,
            "written_before_kill": written_before_kill, "restarted": restarted,
            "shard0": (shard0.returncode, shard0_err)}


def test_shard_processes_finish(runs):
    assert runs["killed_rc"] == -signal.SIGKILL, "the kill must land while shard 1 is still working"
    assert runs["written_before_kill"] is not None and runs["written_before_kill"] >= 1
    assert runs["restarted"].returncode == 0, runs["restarted"].stderr[-2000:]
    assert runs["shard0"][0] == 0, runs["shard0"][1][-2000:]
    assert "--resume" in runs["restarted"].stderr and str(runs["sharded"]) in runs["restarted"].stdout


@pytest.mark.parametrize("stage", DATA)
def test_merged_artifacts_equal_the_unsharded_run(runs, stage):
    reference = list(read_artifact(runs["reference"] / stage).records())
    merged = list(read_artifact(runs["sharded"] / stage).records())
    assert reference, f"{stage}: the reference run wrote nothing"
    assert merged == reference


def test_work_was_split_and_the_merge_certified(runs):
    sharded = runs["sharded"]
    for stage in ("candidates", "instructions", "responses"):
        manifest = read_manifest(sharded / stage)
        assert manifest["certified"] and manifest["extra"]["sharded"]["count"] == 2
        shard_inputs = [i for i in manifest["inputs"] if "/shards/" in i["path"]]
        assert [Path(i["path"]).name for i in shard_inputs] == ["0-of-2", "1-of-2"]
        per_shard = [read_manifest(shard_dir(sharded, stage, Shard(i, 2)))["extra"][stage] for i in range(2)]
        if stage == "responses":
            units = [s["units"] for s in per_shard]
            assert units[0] and units[1] and not set(units[0]) & set(units[1])
            assert all(u % 2 == 0 for u in units[0]) and all(u % 2 == 1 for u in units[1])
    run_index = json.loads((sharded / "run.json").read_text())
    assert set(run_index["stages"]) == set(DATA)


def test_merged_stats_are_the_unsharded_stats(runs):
    """Counts summed over shards and rates recomputed: what an unsharded manifest says."""
    ref = read_manifest(runs["reference"] / "responses")["extra"]["responses"]
    merged = read_manifest(runs["sharded"] / "responses")["extra"]["responses"]
    for key in ("instructions_in", "processed", "n_records", "dropped"):
        assert merged[key] == ref[key], key
    assert merged["candidates"]["stop_reasons"] == ref["candidates"]["stop_reasons"]
    for key in ("judgements", "disagreements", "disagreement_rate", "chosen_margin"):
        assert merged["critic"][key] == ref["critic"][key], key


def test_sharded_data_stages_pass_every_check_but_do_not_count_yet(runs):
    """Every check of the merged and shard artifacts passes; the run does not count until
    training and evaluation exist (`cai run --resume`), and `cai check` says exactly that."""
    proc = subprocess.run([sys.executable, "-m", "cai", "check", str(runs["sharded"]), "--format", "json"],
                          capture_output=True, text=True)
    failed = [r for r in json.loads(proc.stdout)["results"] if r["status"] == "fail"]
    assert proc.returncode == 1 and [r["name"] for r in failed] == ["required_stages_present"], failed
    assert all(f"{stage}: " in failed[0]["evidence"] for stage in ("sft", "dpo", "eval"))


# --------------------------------------------------------------------------- refusals


def _partial_copy(runs, tmp_path, stage: str) -> Path:
    """The sharded run with `stage` and what follows it not merged yet."""
    out = tmp_path / "run"
    shutil.copytree(runs["sharded"], out)
    later = DATA[DATA.index(stage):]
    for s in later:
        shutil.rmtree(out / s)
    index = json.loads((out / "run.json").read_text())
    index["stages"] = {k: v for k, v in index["stages"].items() if k not in later}
    write_json_atomic(out / "run.json", index)
    return out


def test_unsharded_continuation_refuses_missing_shards(runs, tmp_path):
    from cai.pipeline.runner import Run, merge_shards

    out = _partial_copy(runs, tmp_path, "responses")
    shutil.rmtree(shard_dir(out, "responses", Shard(1, 2)))
    run = Run(RunConfig.model_validate(CONFIG), out, resume=True)
    with pytest.raises(ArtifactError, match=r"shard\(s\) 1-of-2 of responses not complete"):
        merge_shards(run, None, "responses", 2, wait=False)


def test_merge_refuses_a_shard_made_from_another_input(runs, tmp_path):
    from cai.pipeline.runner import Run, merge_shards

    out = _partial_copy(runs, tmp_path, "responses")
    path = shard_dir(out, "responses", Shard(0, 2)) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["inputs"][0]["manifest_sha256"] = "0" * 64  # as if made from an earlier instructions artifact
    write_json_atomic(path, manifest)
    run = Run(RunConfig.model_validate(CONFIG), out, resume=True)
    with pytest.raises(ArtifactError, match="made from another instructions artifact"):
        merge_shards(run, None, "responses", 2, wait=False)


def test_merge_refuses_shards_split_two_ways(runs, tmp_path):
    from cai.pipeline.runner import Run, merge_shards

    out = _partial_copy(runs, tmp_path, "responses")
    shutil.copytree(shard_dir(out, "responses", Shard(0, 2)), shard_dir(out, "responses", Shard(0, 3)))
    run = Run(RunConfig.model_validate(CONFIG), out, resume=True)
    with pytest.raises(ArtifactError, match=r"shards of N=\[3\] next to N=2"):
        merge_shards(run, None, "responses", 2, wait=False)


# --------------------------------------------------------------------------- who may use a run directory


def _cli(config: dict, out: Path, *args: str) -> subprocess.CompletedProcess:
    path = out.parent / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "cai", "run", str(path), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120)


TINY = dict(CONFIG, model={"source": "tiny-random"})


@pytest.mark.parametrize("held, args, message", [
    (Shard(0, 2), ["--shard", "0/2"], "shard 0/2 is already running in another process"),
    (Shard(1, 2), ["--resume"], "another cai process (a shard, or a second `cai run`) is using this run directory"),
    (None, ["--shard", "1/2"], "an unsharded `cai run` is using this run directory"),
    (Shard(0, 2), ["--shard", "0/3"], "its data stages are split into N=[2]; --shard 0/3 would split them another way"),
])
def test_a_run_directory_is_claimed(tmp_path, held, args, message):
    """Claims are real flocks held by this test process; the CLI is a second process and
    must refuse, in one line, before loading anything."""
    from cai.pipeline.sharding import claim

    out = tmp_path / "run"
    with claim(out, held):
        proc = _cli(TINY, out, *args)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert message in proc.stderr


def test_a_killed_process_leaves_no_claim(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from cai.pipeline.sharding import Shard, claim\n"
                               "with claim(Path(sys.argv[1]), Shard(0, 2)):\n print('held', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert "already running" in _cli(TINY, out, "--shard", "0/2").stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    from cai.pipeline.sharding import claim

    with claim(out, Shard(0, 2)):  # the kernel dropped the dead process's flock
        pass
