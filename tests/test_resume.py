"""A stage killed with SIGKILL mid-generation resumes to exactly the artifact an
uninterrupted run writes, redoing at most the batch in flight (real subprocesses, the
embedded model, a real SIGKILL). `python -m benchmarks.resume` runs the same on the
sampled instruction stage."""

import os

from benchmarks.resume import EVAL_CONFIG, measure


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))  # `python -m benchmarks.resume` from the repo root
    m = measure(tmp_path, EVAL_CONFIG, kill_after=1, stage="eval")
    assert m["killed_returncode"] == -9
    assert m["identical"], m
    assert m["resumed_batches"] >= 1, "the kill landed after the stage finished: nothing was resumed"
    assert m["redone_batches"] <= 1, m
    assert m["records"] == 12
