"""Offline readiness: a run must not discover halfway through that it needs the network.
Checked before the first stage (fail fast):

- `PunktAvailable`: NLTK `punkt_tab` (the IFEval checkers count sentences with it; offline,
  nltk's download fails quietly and scoring raises `LookupError` later).
- `ModelSourceLocal`: the configured model resolves locally (a hub id must be in the cache).
- `HubOffline`: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, and honoured by huggingface_hub.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from cai.config import ModelConfig
from cai.invariants.base import Invariant

SHIPPED_NLTK = Path(__file__).resolve().parent.parent / "data" / "nltk"
PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


def enforce_offline() -> None:
    """Set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 unless the user set them; call before
    huggingface_hub / datasets are imported (they read the variables at import)."""
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")


class PunktAvailable(Invariant):
    """Prevents scoring that dies (or silently degrades) offline: lm-eval's IFEval checkers
    need NLTK's punkt_tab, and `nltk.download` cannot work here. cai ships a minimal English
    punkt_tab under cai/data/nltk; it (or an installed one) must be findable."""

    name = "punkt_tab_available"

    def __init__(self, nltk_dirs: Sequence[str | Path] | None = None, include_default_paths: bool = True):
        if nltk_dirs is None:
            nltk_dirs = [SHIPPED_NLTK] if SHIPPED_NLTK.is_dir() else []
        self.nltk_dirs = [str(d) for d in nltk_dirs]
        self.include_default_paths = include_default_paths

    def _check(self, subject):
        try:
            import nltk
        except ImportError:
            return False, "nltk is not installed (the IFEval checkers need it)"
        paths = self.nltk_dirs + (list(nltk.data.path) if self.include_default_paths else [])
        try:
            found = nltk.data.find(PUNKT_RESOURCE, paths=paths)
        except LookupError:
            return False, (f"NLTK {PUNKT_RESOURCE} not found in {paths[:4]}{' …' if len(paths) > 4 else ''}: "
                           "sentence counting in the IFEval checkers would raise LookupError offline")
        return True, f"punkt_tab found at {found}"


class ModelSourceLocal(Invariant):
    """Prevents a run that stalls on a download or fails after hours of earlier stages:
    the configured model (embedded, tiny-random, a directory, a .gguf file, or a hub id)
    must resolve from local files — a hub id only from the local cache — with weights."""

    name = "model_source_local"

    def __init__(self, model_cfg: ModelConfig | None = None):
        self.model_cfg = model_cfg

    def _check(self, subject):
        from cai.errors import ModelLoadError
        from cai.pipeline.models import TINY_RANDOM, resolve_source, weight_files

        cfg = subject if isinstance(subject, ModelConfig) else (self.model_cfg or ModelConfig())
        try:
            resolved = resolve_source(cfg)
            if resolved.kind != TINY_RANDOM:
                weights = weight_files(Path(resolved.path), cfg.allow_pickle)
            else:
                weights = []
        except ModelLoadError as err:
            return False, str(err).splitlines()[0]
        return True, f"{cfg.source!r} resolves locally to {resolved.path} ({resolved.kind}, {len(weights)} weight file(s))"


class HubOffline(Invariant):
    """Prevents hidden network access: every hub call must be refused locally rather than
    attempted (and hang on timeouts on a machine without a network). HF_HUB_OFFLINE and
    HF_DATASETS_OFFLINE must be set, and huggingface_hub, if already imported, must have
    read them (it reads them once, at import)."""

    name = "hub_offline"

    def _check(self, subject):
        unset = [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() not in _TRUE]
        if unset:
            return False, (f"{', '.join(unset)} not set: a library call could try the network; "
                           f"export {' '.join(v + '=1' for v in OFFLINE_VARS)} (or call cai.invariants.offline.enforce_offline())")
        hub = sys.modules.get("huggingface_hub.constants")
        if hub is not None and not getattr(hub, "HF_HUB_OFFLINE", False):
            return False, ("HF_HUB_OFFLINE is set now but huggingface_hub was imported before it was: the hub client "
                           "is still online; set the variable before importing transformers")
        return True, f"{', '.join(OFFLINE_VARS)} set" + (" and honoured by huggingface_hub" if hub is not None else "")


def offline_invariants(model_cfg: ModelConfig | None = None) -> list[Invariant]:
    """Run before the first stage: `raise_on_failures(evaluate(offline_invariants(cfg.model), None))`."""
    return [HubOffline(), PunktAvailable(), ModelSourceLocal(model_cfg)]
