"""A stage killed with SIGKILL mid-generation resumes to exactly the artifact an
uninterrupted run writes, redoing at most the batch in flight."""

import os

import pytest

from benchmarks.resume import measure

CONFIG = {"name": "resume-test", "seed": 3, "model": {"source": "embedded"},
          "instructions": {"n": 6, "overgenerate": 2.0, "batch_size": 2, "max_new_tokens": 32}}


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))  # `python -m benchmarks.resume` from the repo root
    m = measure(tmp_path, CONFIG, kill_after=1)
    assert m["killed_returncode"] == -9
    assert m["identical"], m
    assert m["resumed_batches"] >= 1, "the kill landed after the stage finished: nothing was resumed"
    assert m["redone_batches"] <= 1, m
    assert m["records"] == 12
