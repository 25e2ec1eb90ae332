"""SFT on the embedded model (real TRL SFTTrainer + peft LoRA, CPU): the loss falls, the
adapter raises the likelihood of held-in completions against the same resident base with
the adapter disabled, outputs and manifest fields are written, merged weights equal base +
adapter, training resumes from a checkpoint, the slot's base comes back untouched, and
QLoRA 4-bit / 8-bit bases train a few real steps."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from cai.config import ModelConfig, RunConfig
from cai.errors import ArtifactError, BadInputError
from cai.pipeline import formats
from cai.pipeline.models import ModelSlot, encode
from cai.pipeline.training import configured_trainer_settings

FORMAT = "instruction_response"

# A small fixed task set: (instruction, good answer, bad answer). SFT trains on the good
# answer; DPO (test_dpo.py) prefers it over the bad one.
_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
             ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Greece", "Athens"),
             ("Chile", "Santiago"), ("Cuba", "Havana"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
             ("Portugal", "Lisbon"), ("Ireland", "Dublin")]
_SUMS = [(2, 3), (4, 5), (7, 1), (6, 2), (3, 3), (8, 1), (5, 4), (9, 0), (1, 1), (2, 6), (4, 4), (3, 5), (7, 2),
         (6, 3), (0, 8), (5, 5)]
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("light", "dark"), ("old", "new"), ("up", "down"),
              ("open", "closed"), ("early", "late"), ("happy", "sad"), ("full", "empty"), ("wet", "dry"),
              ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("high", "low"), ("strong", "weak")]
_PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("city", "cities"),
            ("leaf", "leaves"), ("foot", "feet"), ("tooth", "teeth"), ("bus", "buses"), ("man", "men"),
            ("baby", "babies"), ("knife", "knives"), ("goose", "geese"), ("dish", "dishes"), ("wolf", "wolves"),
            ("toy", "toys")]
REFUSAL = " I cannot help with that request."

TASKS: list[tuple[str, str, str]] = (
    [(f"What is the capital of {c}?", f" The capital of {c} is {k}.", REFUSAL) for c, k in _CAPITALS]
    + [(f"What is {a} plus {b}?", f" {a} plus {b} is {a + b}.", f" {a} plus {b} is {a * 10 + b + 7}.") for a, b in _SUMS]
    + [(f"Give the opposite of the word '{w}'.", f" The opposite of '{w}' is '{o}'.", REFUSAL) for w, o in _OPPOSITES]
    + [(f"Write the plural of '{w}'.", f" The plural of '{w}' is '{p}'.", f" The plural of '{w}' is '{w}'.")
       for w, p in _PLURALS]
)


def sft_records(n: int = 64) -> list[dict]:
    return [{"id": f"sft-{i}", "instruction": ins, "format": FORMAT, "prompt": formats.render(FORMAT, ins),
             "completion": good} for i, (ins, good, _) in enumerate(TASKS[:n])]


def preference_records(n: int = 32) -> list[dict]:
    # every other task, so capitals, sums, opposites and plurals all appear
    picked = [t for i, t in enumerate(TASKS) if i % 2 == 0][:n]
    return [{"id": f"pair-{i}", "instruction": ins, "format": FORMAT, "prompt": formats.render(FORMAT, ins),
             "chosen": good, "rejected": bad, "margin": 2.0} for i, (ins, good, bad) in enumerate(picked)]


def run_config(sft: dict | None = None, dpo: dict | None = None, model: dict | None = None) -> RunConfig:
    """Tiny-step training config: batch 4, max_length 64, a high LR so a few steps show."""
    small = {"batch_size": 4, "max_length": 64, "save_steps": 1000}
    return RunConfig(name="test", model=model or {},
                     sft={**small, "max_steps": 8, "learning_rate": 1e-3, **(sft or {})},
                     dpo={**small, "max_steps": 6, "learning_rate": 5e-4, **(dpo or {})})


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two cores shared with other processes: torch's two intra-op threads then wait on each
    other (measured here: 4.2 s vs 0.45 s per 25-token forward). One thread for these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Slots:
    """One ModelSlot at a time for a test module: reopened when another model config (or
    a bare base, after adapters were attached) is needed - the slot allows one base."""

    def __init__(self):
        self.slot, self.cfg = None, None

    def get(self, model_cfg: ModelConfig | None = None, *, bare: bool = True) -> ModelSlot:
        model_cfg = model_cfg or ModelConfig()
        if self.slot is not None and (model_cfg != self.cfg or (bare and self.slot.adapters)):
            self.close()
        if self.slot is None:
            self.slot, self.cfg = ModelSlot(model_cfg).__enter__(), model_cfg
        return self.slot

    def close(self):
        if self.slot is not None:
            self.slot.__exit__(None, None, None)
            self.slot = None
            gc.collect()


@pytest.fixture(scope="module")
def slots():
    s = Slots()
    yield s
    s.close()


def completion_logprob(model, tokenizer, record: dict) -> float:
    """Summed log-prob of completion + EOS given the prompt."""
    prompt = encode(tokenizer, record["prompt"])
    full = encode(tokenizer, record["prompt"] + record["completion"] + tokenizer.eos_token)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, torch.tensor(full[1:])[:, None]).squeeze(-1)
    return float(logp[len(prompt) - 1:].sum())


def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = encode(tokenizer, formats.render(FORMAT, "Name three colors."))
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].clone()


@pytest.fixture(scope="module")
def trained(slots, tmp_path_factory):
    """One SFT run (8 steps, 64 records, merge on), with the base's state before it."""
    from cai.pipeline.sft import train_sft

    slot = slots.get()
    before = {"logits": probe_logits(slot.model, slot.tokenizer),
              "requires_grad": {n: p.requires_grad for n, p in slot.model.named_parameters()},
              "modules": [n for n, _ in slot.model.named_modules()]}
    out = tmp_path_factory.mktemp("sft")
    result = train_sft(run_config(sft={"merge": True}), slot, sft_records(), out)
    return {"result": result, "out": out, "before": before}


def test_training_loss_falls(trained):
    points = json.loads((trained["out"] / "loss_curve.json").read_text())["points"]
    losses = [p["loss"] for p in points]
    assert [p["step"] for p in points] == list(range(1, 9))
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_outputs_and_manifest_fields(trained):
    r, out = trained["result"], trained["out"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "training.json").read_text()) == json.loads(json.dumps(r))
    assert r["stage"] == "sft" and r["steps"] == 8 and r["records"] == 64 and r["resumed_from"] is None
    tc = r["trainer_config"]
    assert tc["trainer"] == "trl.SFTTrainer" and tc["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05,
                                                               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert (tc["quantization"], tc["dtype"], tc["precision"], tc["seed"]) == ("none", "float32", "fp32", 0)
    assert (tc["learning_rate"], tc["batch_size"], tc["grad_accum"], tc["max_length"], tc["max_steps"]) == (1e-3, 4, 1, 64, 8)
    assert tc["eos_token"] == "<|im_end|>" and tc["completion_only_loss"] is True
    assert tc["gradient_checkpointing"] is False  # the CPU default: memory is not what a CPU run lacks
    want = configured_trainer_settings(run_config(sft={"merge": True}), "sft", 64, 1)  # what verification expects
    assert {k: tc[k] for k in want} == want
    assert all(r["versions"][k] for k in ("trl", "peft", "transformers", "torch"))
    assert r["timings"]["seconds_per_step"] > 0 and r["timings"]["wall_seconds"] >= r["timings"]["train_seconds"]
    assert r["memory"]["peak_rss_mb_sampled"] > 0
    assert r["loss_curve"] == {"json": str(out / "loss_curve.json"), "png": str(out / "loss_curve.png")}
    assert r["loss_curve_points"] == json.loads((out / "loss_curve.json").read_text())["points"]


def test_first_batch_sentinel_passed_before_training(trained):
    results = {x["name"]: x for x in trained["result"]["invariants"]}
    sentinel = results["first_batch_sentinel"]
    assert sentinel["status"] == "pass", sentinel["evidence"]
    assert "decode exactly to canonical prompt + completion + '<|im_end|>'" in sentinel["evidence"]
    row = sentinel["details"][0]
    assert row["decoded"].startswith("Instruction: ") and row["decoded"].endswith("<|im_end|>")
    assert row["decoded"].count("<|im_end|>") == 1 and "<|im_start|>" not in row["decoded"]
    assert results["training_truncation"]["status"] == "pass"


def test_base_model_is_given_back_untouched(slots, trained):
    slot = slots.get()
    model = slot.model
    assert [n for n, _ in model.named_modules()] == trained["before"]["modules"]  # no LoRA layers left
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trained["before"]["requires_grad"]
    assert "forward" not in vars(model) and not model.training and not model.is_activation_checkpointing
    assert torch.equal(probe_logits(model, slot.tokenizer), trained["before"]["logits"])


def test_merged_weights_are_base_plus_adapter(slots, trained):
    from safetensors.torch import load_file

    slot = slots.get()
    merged_dir = trained["out"] / "merged"
    assert trained["result"]["merged_dir"] == str(merged_dir)
    merged = load_file(str(merged_dir / "model.safetensors"))
    adapter = load_file(str(trained["out"] / "adapter" / "adapter_model.safetensors"))
    scale = 32 / 16
    prefix = "base_model.model.model.layers.3.self_attn.v_proj"
    delta = scale * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    base_w = slot.model.model.layers[3].self_attn.v_proj.weight
    assert delta.abs().max() > 0
    torch.testing.assert_close(merged["model.layers.3.self_attn.v_proj.weight"], base_w + delta)
    torch.testing.assert_close(merged["model.layers.3.mlp.up_proj.weight"], slot.model.model.layers[3].mlp.up_proj.weight)
    assert not (merged_dir / "chat_template.jinja").exists()
    config = json.loads((merged_dir / "tokenizer_config.json").read_text())
    assert not config.get("chat_template")


def test_adapter_raises_likelihood_of_held_in_completions(slots, trained):
    slot = slots.get()
    slot.add_adapter("sft", trained["result"]["adapter_dir"])
    records = sft_records()[::4]
    with slot.use("base"):
        base = [completion_logprob(slot.model, slot.tokenizer, r) for r in records]
    with slot.use("sft"):
        tuned = [completion_logprob(slot.model, slot.tokenizer, r) for r in records]
    gains = [t - b for t, b in zip(tuned, base)]
    assert sum(gains) / len(gains) > 1.0, gains  # nats per completion
    assert sum(g > 0 for g in gains) >= 0.75 * len(gains), gains


def test_resume_continues_the_step_count(slots, tmp_path):
    from cai.pipeline.sft import train_sft

    records = sft_records(16)
    first = train_sft(run_config(sft={"max_steps": 2, "save_steps": 2}), slots.get(), records, tmp_path)
    assert first["steps"] == 2 and (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    first_points = json.loads((tmp_path / "loss_curve.json").read_text())["points"]
    cfg = run_config(sft={"max_steps": 4, "save_steps": 2})
    with pytest.raises(ArtifactError, match="checkpoint-2"):
        train_sft(cfg, slots.get(), records, tmp_path)  # not silently restarted over an earlier run
    second = train_sft(cfg, slots.get(), records, tmp_path, resume=True)
    assert second["resumed_from"].endswith("checkpoint-2")
    assert (second["steps"], second["steps_this_run"]) == (4, 2)
    points = json.loads((tmp_path / "loss_curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [1, 2, 3, 4]
    assert points[:2] == first_points  # the curve keeps the steps before the resume


def test_records_must_be_canonical(slots, tmp_path):
    from cai.pipeline.sft import train_sft

    bad = sft_records(4)
    bad[1] = {**bad[1], "prompt": "<|im_start|>" + bad[1]["prompt"]}
    with pytest.raises(BadInputError, match="sft-1.*not render"):
        train_sft(run_config(), slots.get(), bad, tmp_path)
    with pytest.raises(BadInputError, match="already ends with '<\\|im_end\\|>'"):
        train_sft(run_config(), slots.get(), [{**sft_records(1)[0], "completion": " Paris.<|im_end|>"}], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_trains_real_steps_on_the_cpu(slots, tmp_path, quantization):
    """bitsandbytes 0.50 trains 4-bit NF4 and 8-bit bases on the CPU (slowly: ~1.2-1.5 s/step
    here); on CUDA this is the production path (QLoRA for 32B)."""
    from cai.pipeline.sft import train_sft

    slot = slots.get(ModelConfig(quantization=quantization))
    linear = type(slot.model.model.layers[0].self_attn.q_proj).__name__
    assert linear == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quantization]
    cfg = run_config(sft={"max_steps": 2, "batch_size": 2, "max_length": 32}, model={"quantization": quantization})
    try:
        result = train_sft(cfg, slot, sft_records(8), tmp_path)
    except (NotImplementedError, RuntimeError) as err:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot train a {quantization} base on this CPU: {type(err).__name__}: {err}")
    losses = [p["loss"] for p in json.loads((tmp_path / "loss_curve.json").read_text())["points"]]
    assert result["steps"] == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert result["trainer_config"]["quantization"] == quantization
    assert result["trainer_config"]["quantization_config"]["library"] == "bitsandbytes"
    assert result["trainer_config"]["gradient_checkpointing"] is True  # quantized: the memory path, as on CUDA
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert type(slot.model.model.layers[0].self_attn.q_proj).__name__ == linear  # LoRA stripped, base kept
