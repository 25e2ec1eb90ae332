"""Offline readiness fails fast: missing punkt_tab, a hub id not in the local cache, a
model directory without weights, HF_HUB_OFFLINE unset."""

import shutil

from cai.config import ModelConfig
from cai.invariants.base import Status, all_passed, evaluate
from cai.invariants.offline import (SHIPPED_NLTK, HubOffline, ModelSourceLocal, PunktAvailable,
                                    offline_invariants)


def test_shipped_punkt_tab_is_found():
    r = PunktAvailable().check(None)
    assert r.status == Status.PASS and str(SHIPPED_NLTK) in r.evidence


def test_punkt_missing_fails(tmp_path):
    r = PunktAvailable(nltk_dirs=[tmp_path], include_default_paths=False).check(None)
    assert r.status == Status.FAIL and "LookupError" in r.evidence


def test_punkt_in_another_data_dir_is_found(tmp_path):
    shutil.copytree(SHIPPED_NLTK, tmp_path / "nltk")
    r = PunktAvailable(nltk_dirs=[tmp_path / "nltk"], include_default_paths=False).check(None)
    assert r.status == Status.PASS


def test_embedded_and_tiny_resolve_locally(embedded_model_dir):
    assert ModelSourceLocal(ModelConfig(source="embedded")).check(None).status == Status.PASS
    assert ModelSourceLocal().check(ModelConfig(source="tiny-random")).status == Status.PASS
    r = ModelSourceLocal(ModelConfig(source=embedded_model_dir)).check(None)
    assert r.status == Status.PASS and "1 weight file" in r.evidence


def test_hub_id_not_in_cache_fails():
    r = ModelSourceLocal(ModelConfig(source="no-such-org/no-such-model-7b")).check(None)
    assert r.status == Status.FAIL and "not in the local Hugging Face cache" in r.evidence


def test_directory_without_weights_fails(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = ModelSourceLocal(ModelConfig(source=str(tmp_path))).check(None)
    assert r.status == Status.FAIL and "no weights" in r.evidence


def test_hub_offline_required(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert HubOffline().check(None).status == Status.PASS
    monkeypatch.delenv("HF_HUB_OFFLINE")
    r = HubOffline().check(None)
    assert r.status == Status.FAIL and "HF_HUB_OFFLINE" in r.evidence
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert HubOffline().check(None).status == Status.FAIL


def test_offline_group_passes_here():
    results = evaluate(offline_invariants(ModelConfig(source="tiny-random")), None)
    assert all_passed(results), [r.evidence for r in results]
