"""models.py is the only loader: templates disabled, no special tokens when encoding,
one base model resident, pickle refused, bad sources are one-line errors."""

import gc
import json
import subprocess
import sys

import pytest
import torch

from cai.config import ModelConfig
from cai.errors import ChatTemplateDisabledError, MemorySequencingError, ModelLoadError
from cai.pipeline import formats
from cai.pipeline.models import (
    ModelSlot, encode, expected_parameters, load_model, load_tokenizer, resident_models, resolve_source, template_state,
    weight_files)

PROMPT = formats.render("instruction_response", "Name three colors.")


@pytest.fixture(scope="module")
def embedded_dir():
    return resolve_source(ModelConfig()).path


def last_logits(model, tokenizer):
    with torch.no_grad():
        return model(torch.tensor([encode(tokenizer, PROMPT)])).logits[0, -1].float()


def test_embedded_tokenizer_leaves_loader_without_template(embedded_dir):
    tok, prov = load_tokenizer(embedded_dir)
    assert tok.chat_template is None
    assert prov["chat_template"]["shipped"] is True and len(prov["chat_template"]["shipped_sha256"]) == 64
    with pytest.raises(ChatTemplateDisabledError, match=r"\*base\* model"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_template_state_is_observed_not_declared():
    """A template put back on the tokenizer after load shows in a fresh provenance read."""
    with ModelSlot(ModelConfig(source="tiny-random")) as slot:
        assert slot.provenance["tokenizer"]["chat_template"]["disabled"] is True
        slot.tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"
        state = slot.provenance["tokenizer"]["chat_template"]
        assert state["disabled"] is False and state["chat_template_is_none"] is False and len(state["live_sha256"]) == 64
        assert state["apply_chat_template"] == "raises ChatTemplateDisabledError"  # the refusal alone is not enough
        del slot.tokenizer.apply_chat_template  # cai's refusal removed: the class method renders again
        state = template_state(slot.tokenizer)
        assert state["apply_chat_template"] == "renders" and state["disabled"] is False
        assert state["shipped"] is True  # what the checkpoint shipped is remembered from load


def test_template_state_of_a_tokenizer_cai_did_not_load(raw_smol_tokenizer):
    state = template_state(raw_smol_tokenizer)
    assert state["shipped"] is None and state["disabled"] is False and state["apply_chat_template"] == "renders"
    assert state["live_sha256"] is not None


def test_encode_adds_no_special_tokens(embedded_dir):
    tok, _ = load_tokenizer(embedded_dir)
    ids = encode(tok, PROMPT)
    assert not set(ids) & set(tok.all_special_ids)
    assert tok.decode(ids) == PROMPT


def test_padding_is_left_with_explicit_pad(embedded_dir):
    tok, prov = load_tokenizer(embedded_dir)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert prov["special_tokens"]["pad_id"] == tok.pad_token_id


def test_load_model_records_provenance():
    loaded = load_model(ModelConfig())
    prov = loaded.provenance
    assert prov["kind"] == "embedded" and prov["origin"]["name"] == "SmolLM2-135M-Instruct"
    assert len(prov["origin"]["gguf_sha256"]) == 64
    assert all(len(h) == 64 for h in prov["weights_sha256"].values()) and prov["weights_sha256"]
    state = prov["tokenizer"]["chat_template"]
    assert state == {"shipped": True, "shipped_sha256": state["shipped_sha256"], "chat_template_is_none": True,
                     "live_sha256": None, "apply_chat_template": "raises ChatTemplateDisabledError", "disabled": True}
    assert len(state["shipped_sha256"]) == 64
    assert prov["n_parameters"] == expected_parameters(resolve_source(ModelConfig()), loaded.tokenizer, ModelConfig())
    assert prov["trust_remote_code"] is False and prov["quantization"] == "none"
    assert prov["versions"]["transformers"]
    json.dumps(prov)  # manifests store it


def test_second_load_while_first_alive_raises():
    with ModelSlot(ModelConfig(source="tiny-random")) as slot:
        assert slot.model is not None
        with pytest.raises(MemorySequencingError, match="already resident"):
            load_model(ModelConfig(source="tiny-random"))
        with pytest.raises(MemorySequencingError):
            with ModelSlot(ModelConfig(source="tiny-random")):
                pass
    assert not resident_models(slot.n_parameters)
    assert slot.memory["peak_rss_mb_sampled"] > 0
    with ModelSlot(ModelConfig(source="tiny-random")):  # released: loading again is fine
        pass


def test_reference_kept_outside_slot_still_blocks():
    with ModelSlot(ModelConfig(source="tiny-random")) as slot:
        leaked = slot.model
    with pytest.raises(MemorySequencingError):
        load_model(ModelConfig(source="tiny-random"))
    del leaked
    gc.collect()
    assert not resident_models(slot.n_parameters)


def test_adapters_switch_in_place_and_base_means_disabled(tmp_path):
    from peft import LoraConfig, get_peft_model

    with ModelSlot(ModelConfig(source="tiny-random")) as slot:
        base_logits = last_logits(slot.model, slot.tokenizer)
        peft_model = get_peft_model(slot.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / "adapter")
        peft_model.unload()  # restore the plain base before attaching through the slot
        del peft_model
        slot.add_adapter("sft", tmp_path / "adapter")
        with slot.use("sft"):
            sft_logits = last_logits(slot.model, slot.tokenizer)
        with slot.use("base"):
            again = last_logits(slot.model, slot.tokenizer)
    assert not torch.allclose(base_logits, sft_logits)
    assert torch.allclose(base_logits, again, atol=1e-5)


@pytest.mark.parametrize("quantization, min_corr", [("8bit", 0.98), ("4bit", 0.85)])
def test_quantized_loads_work_on_cpu(quantization, min_corr):
    """bitsandbytes 0.50 loads 8-bit and NF4 on the CPU (lossy): the real code path runs."""
    reference = load_model(ModelConfig())
    ref = last_logits(reference.model, reference.tokenizer)
    del reference
    quant = load_model(ModelConfig(quantization=quantization))
    layer = type(quant.model.model.layers[0].self_attn.q_proj).__name__
    got = last_logits(quant.model, quant.tokenizer)
    assert quant.provenance["quantization"] == quantization
    del quant
    assert layer == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantization]
    assert torch.corrcoef(torch.stack([ref, got]))[0, 1] > min_corr


def test_pickle_weights_refused_unless_allowed(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        weight_files(tmp_path, allow_pickle=False)
    assert weight_files(tmp_path, allow_pickle=True)[0].name == "pytorch_model.bin"


@pytest.mark.parametrize("make_source, message", [
    (lambda p: str(p / "missing"), "not found"),
    (lambda p: str(p), "no weights"),
    (lambda p: (p / "bad.gguf").write_bytes(b"GGUF garbage") and str(p / "bad.gguf") or str(p / "bad.gguf"), "unreadable GGUF"),
    (lambda p: "nobody/no-such-model-xyz", "local Hugging Face cache"),
])
def test_bad_sources_are_one_line_errors(tmp_path, monkeypatch, make_source, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    source = make_source(tmp_path)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_model(ModelConfig(source=source))
    assert "\n" not in str(err.value)


def test_cli_reports_bad_model_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  source: {tmp_path / 'nope'}\n")
    proc = subprocess.run([sys.executable, "-m", "cai.cli", "run", str(cfg), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
