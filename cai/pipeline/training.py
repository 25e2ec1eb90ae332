"""What SFT and DPO share, in one place: records -> canonical examples, the LoRA config and
trainer arguments from one config section, borrowing the slot's base model (and giving it
back untouched), the pre-step-1 gate (first-batch sentinel, ...), the loss curve (JSON +
PNG), checkpoints and resume, saving the adapter / merged weights, and the manifest fields.

sft.py and dpo.py only build their dataset and their TRL trainer; everything else is here,
so the two trainers cannot drift apart (the audit found several near-duplicate trainers
whose LoRA rank and quantization differed without reason).

Layout of a training output directory:

    out_dir/
      adapter/            the trained LoRA adapter (adapter_config.json, adapter_model.safetensors)
      merged/             base + adapter merged (only with `merge: true`; not for quantized bases)
      checkpoints/        trainer checkpoints every `save_steps` (resume points)
      loss_curve.json     per-step loss (and DPO rewards) from the trainer's log history
      loss_curve.png
      training.json       the summary `train_sft` / `train_dpo` return (manifest fields)
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cai.config import RunConfig, TrainConfig
from cai.errors import ArtifactError, BadInputError
from cai.invariants.base import Result, raise_on_failures
from cai.invariants.memory import memory_snapshot
from cai.invariants.training import Example, FirstBatch, TokenLengths, TrainingTruncation
from cai.pipeline.formats import COMPLETION_PREFIX, FormatError, get_format, render
from cai.pipeline.models import library_versions
from cai.pipeline.store import write_json_atomic

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"
LOSS_CURVE_JSON = "loss_curve.json"
LOSS_CURVE_PNG = "loss_curve.png"
SUMMARY_JSON = "training.json"
# Trades ~20% compute for activation memory; needed for 32B on one GPU, harmless on the CPU.
GRADIENT_CHECKPOINTING = True
SAVE_TOTAL_LIMIT = 2

RECORD_FIELDS = {
    "sft": ("id", "instruction", "format", "prompt", "completion"),
    "dpo": ("id", "instruction", "format", "prompt", "chosen", "rejected", "margin"),
}
COMPLETION_ROLES = {"sft": ("completion",), "dpo": ("chosen", "rejected")}


# --------------------------------------------------------------------------- records


def canonical_examples(records: Sequence[dict], kind: str, train_format: str, eos_token: str) -> list[Example]:
    """Validate training records and return their canonical form: the prompt rendered by
    `formats.render` from the stored instruction (it must equal the stored prompt) and the
    stored completion(s), which start with one space and do not carry the EOS (the
    trainer appends it). Any problem is a one-line BadInputError naming the record."""
    if not records:
        raise BadInputError(f"no {kind} records to train on")
    fields, roles = RECORD_FIELDS[kind], COMPLETION_ROLES[kind]
    fmt = get_format(train_format)
    if fmt.purpose != "train":
        raise BadInputError(f"format {train_format!r} is a {fmt.purpose} format and cannot train")
    examples = []
    for i, rec in enumerate(records):
        rid = rec.get("id", f"#{i}")
        missing = [k for k in fields if k not in rec]
        if missing:
            raise BadInputError(f"{kind} record {rid!r}: missing field(s) {', '.join(missing)}")
        if rec["format"] != train_format:
            raise BadInputError(f"{kind} record {rid!r}: format {rec['format']!r}, but the run trains on {train_format!r}")
        try:
            prompt = render(rec["format"], rec["instruction"])
        except FormatError as err:
            raise BadInputError(f"{kind} record {rid!r}: {err}") from None
        if rec["prompt"] != prompt:
            raise BadInputError(f"{kind} record {rid!r}: stored prompt {rec['prompt'][:60]!r} is not "
                                f"render({rec['format']!r}, instruction) = {prompt[:60]!r}")
        for role in roles:
            text = rec[role]
            if not isinstance(text, str) or not text.startswith(COMPLETION_PREFIX) or not text.strip():
                raise BadInputError(f"{kind} record {rid!r}: {role} must be non-empty text starting with "
                                    f"{COMPLETION_PREFIX!r}, got {str(text)[:40]!r}")
            if text.endswith(eos_token):
                raise BadInputError(f"{kind} record {rid!r}: {role} already ends with {eos_token!r}; "
                                    "the trainer appends the EOS")
        if kind == "dpo" and rec["chosen"] == rec["rejected"]:
            raise BadInputError(f"{kind} record {rid!r}: chosen and rejected are the same text")
        examples.append(Example(rid, prompt, {role: rec[role] for role in roles}))
    return examples


def token_lengths(examples: Sequence[Example], tokenizer, eos_token: str, max_length: int) -> TokenLengths:
    """prompt + completion + EOS lengths (DPO: the longer side) for the truncation check."""
    texts = [[ex.prompt + c + eos_token for c in ex.completions.values()] for ex in examples]
    flat = [t for group in texts for t in group]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    lengths, k = [], 0
    for group in texts:
        lengths.append(max(len(x) for x in ids[k:k + len(group)]))
        k += len(group)
    return TokenLengths([ex.id for ex in examples], lengths, max_length)


# --------------------------------------------------------------------------- config


def lora_config(section: TrainConfig):
    """peft LoraConfig from the one config section (rank, alpha, dropout, target modules)."""
    from peft import LoraConfig

    lora = section.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def trainer_args(cfg: RunConfig, section: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig. Everything a run's result
    depends on comes from `cfg`; precision follows `model.dtype` explicitly (TRL would
    otherwise default to bf16 autocast - 4x slower on the CPU and not what was asked)."""
    dtype = cfg.model.dtype
    return dict(
        output_dir=str(out_dir / CHECKPOINT_DIR),
        learning_rate=section.learning_rate,
        num_train_epochs=section.epochs,
        max_steps=section.max_steps,
        per_device_train_batch_size=section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        max_length=section.max_length,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        logging_steps=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=cfg.model.device == "cpu",
        gradient_checkpointing=GRADIENT_CHECKPOINTING,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def prepare(kind: str, cfg: RunConfig, section: TrainConfig, records: Sequence[dict], tokenizer,
            out_dir: Path) -> tuple[Path, str, list[Example], Result]:
    """The shared start of an SFT or DPO run: the output directory, the declared EOS, the
    canonical examples the first-batch sentinel compares against, the merge check, and the
    truncation check (a warning the manifest carries)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token
    examples = canonical_examples(records, kind, cfg.format, eos)
    check_merge_allowed(cfg, section)
    truncation = TrainingTruncation().check(token_lengths(examples, tokenizer, eos, section.max_length))
    return out_dir, eos, examples, truncation


def trainer_config_record(cfg: RunConfig, section: TrainConfig, trainer, **extra) -> dict[str, Any]:
    """What the trainer actually ran with (read back from its args where it can be)."""
    args = trainer.args
    record = {
        "trainer": f"trl.{type(trainer).__name__}",
        "format": cfg.format,
        "lora": section.lora.model_dump(),
        "quantization": cfg.model.quantization,
        "quantization_config": _quantization_record(cfg),
        "dtype": cfg.model.dtype,
        "device": cfg.model.device,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "learning_rate": args.learning_rate,
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "world_size": args.world_size,
        "max_length": args.max_length,
        "save_steps": args.save_steps,
        "seed": args.seed,
        "gradient_checkpointing": args.gradient_checkpointing,
        "eos_token": trainer.processing_class.eos_token,
        "merge": section.merge,
    }
    record.update(extra)
    return record


def _quantization_record(cfg: RunConfig) -> dict[str, Any] | None:
    q = cfg.model.quantization
    if q == "none":
        return None
    if q == "8bit":
        return {"library": "bitsandbytes", "load_in_8bit": True}
    return {"library": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": cfg.model.dtype, "prepare_model_for_kbit_training": True}


def check_merge_allowed(cfg: RunConfig, section: TrainConfig) -> None:
    """Refuse before training, not after: merged weights need an unquantized base."""
    if section.merge and cfg.model.quantization != "none":
        raise BadInputError(
            f"merge: true with a {cfg.model.quantization} base: adapter deltas cannot be merged into quantized "
            "weights; keep the adapter (the pipeline attaches it to the base) or merge later on an unquantized load")


# --------------------------------------------------------------------------- the base model


@contextlib.contextmanager
def borrowed_base(slot, model_cfg):
    """Lend the slot's resident base model to a trainer and give it back as it was.

    Trainers change the model they are handed: peft injects LoRA layers, TRL patches
    `forward`, enables gradient checkpointing and input-grad hooks, zeroes dropout, freezes
    parameters (and `prepare_model_for_kbit_training` upcasts norms on quantized bases).
    On exit every LoRA layer is removed again and the rest restored, so after training the
    slot holds the same base model - one copy in memory - to which trained adapters are
    attached by name (`slot.add_adapter`), "base" meaning adapters disabled."""
    import torch
    from peft import PeftModel

    model = slot.model
    if isinstance(model, PeftModel) or getattr(slot, "adapters", None):
        raise ValueError(
            f"the slot's model carries adapters ({sorted(getattr(slot, 'adapters', {})) or 'peft'}): train on the "
            "bare base (train SFT and DPO before attaching adapters for evaluation, or use a fresh slot)")
    state = {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "dtype": {n: p.dtype for n, p in model.named_parameters()},
        "training": model.training,
        "forward_patched": "forward" in vars(model),
        "checkpointing": _checkpointing(model),
        "dropout": {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)},
        "use_cache": getattr(model.config, "use_cache", None),
        "config_ids": {k: getattr(model.config, k, None) for k in ("pad_token_id", "eos_token_id")},
        "generation_ids": {k: getattr(model.generation_config, k, None) for k in ("pad_token_id", "eos_token_id")}
        if getattr(model, "generation_config", None) is not None else {},
    }
    try:
        if model_cfg.quantization != "none":
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=GRADIENT_CHECKPOINTING)
        yield model
    finally:
        _give_back(model, state)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def strip_lora_layers(model) -> int:
    """Replace every peft tuner layer in `model` by its base layer (what `unload()` does,
    without needing the PeftModel wrapper, which may never have been returned)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    stripped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, child, None) is module:
                setattr(parent, child, module.get_base_layer())
                stripped += 1
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return stripped


def _checkpointing(model) -> bool:
    # transformers 5 renames gradient to activation checkpointing (the old names warn)
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _give_back(model, state: dict[str, Any]) -> None:
    import torch

    strip_lora_layers(model)
    if not state["forward_patched"] and "forward" in vars(model):
        del model.forward  # TRL's fused-LM-head patch
    if not state["checkpointing"] and _checkpointing(model):
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    for name, p in model.named_parameters():
        if name in state["dtype"] and p.dtype != state["dtype"][name] and p.dtype.is_floating_point:
            p.data = p.data.to(state["dtype"][name])
        if name in state["requires_grad"]:
            p.requires_grad_(state["requires_grad"][name])
        p.grad = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and name in state["dropout"]:
            module.p = state["dropout"][name]
    if state["use_cache"] is not None:
        model.config.use_cache = state["use_cache"]
    for k, v in state["config_ids"].items():
        setattr(model.config, k, v)
    for k, v in state["generation_ids"].items():
        setattr(model.generation_config, k, v)
    model.train(state["training"])


# --------------------------------------------------------------------------- first batch / gate


def first_batch(trainer) -> dict[str, Any]:
    """The first batch the trainer's own dataloader builds (its dataset preparation and
    collator), before any optimizer step."""
    return next(iter(trainer.get_train_dataloader()))


def _rows(tensor) -> list[list[int]]:
    return [[int(x) for x in row] for row in tensor.tolist()]


def first_batch_subject(kind: str, batch: dict[str, Any], examples: Sequence[Example], tokenizer,
                        eos_token: str, max_length: int | None) -> FirstBatch:
    """FirstBatch from a collated SFT batch (input_ids / attention_mask / labels) or DPO
    batch (input_ids / attention_mask / completion_mask, chosen rows then rejected rows)."""
    input_ids = _rows(batch["input_ids"])
    attention = _rows(batch["attention_mask"]) if "attention_mask" in batch else [[1] * len(r) for r in input_ids]
    if kind == "sft":
        labels = _rows(batch["labels"])
        loss_mask = [[int(lab != -100) for lab in row] for row in labels]
    else:
        labels = None
        loss_mask = _rows(batch["completion_mask"])
    return FirstBatch(kind, input_ids, attention, loss_mask, examples, tokenizer, eos_token,
                      labels=labels, max_length=max_length)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest `checkpoint-N` directory under `directory` (by step), or None."""
    if not directory.is_dir():
        return None
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit():
            if (p / "trainer_state.json").is_file():
                found.append((int(p.name.split("-", 1)[1]), p))
    return max(found)[1] if found else None


def run_trainer(trainer, *, stage: str, out_dir: Path, resume: bool,
                checks: Callable[[Any, dict[str, Any]], list[Result]], results: Iterable[Result] = ()) -> dict[str, Any]:
    """Gate, then train. The checks run on the first batch before step 1; any error-severity
    failure raises InvariantError and no optimizer step is taken. With `resume`, training
    continues from the newest checkpoint in out_dir/checkpoints (the step count, optimizer,
    scheduler and RNG state come back with it)."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    checkpoint = latest_checkpoint(ckpt_dir)
    if checkpoint is not None and not resume:
        raise ArtifactError(f"{ckpt_dir}: checkpoints of an earlier run exist ({checkpoint.name}); "
                            "resume it (--resume) or train into a new directory")
    batch = first_batch(trainer)
    results = list(results) + list(checks(trainer, batch))
    raise_on_failures(results)  # before step 1
    del batch

    start_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    steps = trainer.state.global_step
    ran = steps - start_step
    memory = memory_snapshot()  # this stage's peaks, measured by the open slot
    curve = write_loss_curve(trainer.state.log_history, out_dir, stage)
    return {
        "steps": steps,
        "steps_this_run": ran,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "timings": {"train_seconds": round(train_seconds, 3),
                    "seconds_per_step": round(train_seconds / ran, 4) if ran else None},
        "memory": memory,
        "invariants": [r.to_json() for r in results],
        "loss_curve": curve,
        "loss_curve_points": curve_points(trainer.state.log_history),
        "metrics": {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))},
    }


# --------------------------------------------------------------------------- loss curve


CURVE_KEYS = ("loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracies", "logps/chosen", "logps/rejected", "mean_token_accuracy")


def curve_points(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per logged training step (the trainer's log history survives resume)."""
    points = []
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            points.append({"step": entry["step"], "epoch": entry.get("epoch"),
                           **{k: entry[k] for k in CURVE_KEYS if k in entry}})
    return points


def write_loss_curve(log_history: Sequence[dict[str, Any]], out_dir: Path, stage: str, *, png: bool = True) -> dict[str, str]:
    points = curve_points(log_history)
    path = out_dir / LOSS_CURVE_JSON
    losses = [p["loss"] for p in points]
    write_json_atomic(path, {"stage": stage, "points": points,
                             "summary": {"steps": points[-1]["step"] if points else 0,
                                         "first_loss": losses[0] if losses else None,
                                         "last_loss": losses[-1] if losses else None}})
    out = {"json": str(path)}
    if png:
        out["png"] = str(plot_loss_curve(points, out_dir / LOSS_CURVE_PNG, stage))
    return out


def plot_loss_curve(points: Sequence[dict[str, Any]], path: Path, stage: str) -> Path:
    """Loss per step (DPO: and the reward margin). Agg canvas, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    margins = [p for p in points if "rewards/margins" in p]
    fig = Figure(figsize=(9 if margins else 5.5, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if margins else 1, squeeze=False)[0]
    axes[0].plot([p["step"] for p in points], [p["loss"] for p in points], marker=".", lw=1)
    axes[0].set(xlabel="step", ylabel="training loss", title=f"{stage.upper()} loss")
    if stage == "dpo":
        axes[0].axhline(math.log(2), color="grey", ls="--", lw=0.8, label="ln 2 (step 0)")
        axes[0].legend(loc="best", fontsize=8)
    if margins:
        axes[1].plot([p["step"] for p in margins], [p["rewards/margins"] for p in margins], marker=".", lw=1, color="C2")
        axes[1].axhline(0.0, color="grey", ls="--", lw=0.8)
        axes[1].set(xlabel="step", ylabel="reward margin (chosen - rejected)", title="DPO reward margin")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def loss_curve_callback(out_dir: Path, stage: str):
    """TrainerCallback that rewrites loss_curve.json at every checkpoint, so an
    interrupted run keeps its curve (the PNG is drawn when training ends)."""
    from transformers import TrainerCallback

    class LossCurveCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            write_loss_curve(state.log_history, out_dir, stage, png=False)

    return LossCurveCallback()


# --------------------------------------------------------------------------- outputs


def save_adapter(peft_model, out_dir: Path, adapter: str = "default") -> Path:
    """Write only the trained adapter (DPO's frozen "ref" copy stays out)."""
    path = out_dir / ADAPTER_DIR
    peft_model.save_pretrained(str(path), selected_adapters=[adapter])
    return path


def write_merged(peft_model, tokenizer, out_dir: Path, adapter: str = "default") -> Path:
    """Base + adapter merged, written out of place: the resident base's weights are not
    touched (`merge_and_unload` would change them for every later use of the slot)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    state = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = f"{name}.weight"
            state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    path = out_dir / MERGED_DIR
    base.save_pretrained(str(path), state_dict=state)
    tokenizer.save_pretrained(str(path))  # template-free: the loader's tokenizer has none
    return path


def finish(*, stage: str, cfg: RunConfig, section: TrainConfig, trainer, run: dict[str, Any], out_dir: Path,
           started: float, n_records: int, adapter: str = "default", **trainer_extra) -> dict[str, Any]:
    """Save the adapter (and merged weights), assemble the manifest fields, write
    training.json. Returns the dict the lead puts in the stage manifest."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter_dir = save_adapter(model, out_dir, adapter)
    merged_dir = write_merged(model, trainer.processing_class, out_dir, adapter) if section.merge else None
    summary = {
        "stage": stage,
        "adapter_dir": str(adapter_dir),
        "merged_dir": str(merged_dir) if merged_dir else None,
        "checkpoint_dir": str(out_dir / CHECKPOINT_DIR),
        "trainer_config": trainer_config_record(cfg, section, trainer, **trainer_extra),
        "versions": library_versions(),
        "records": n_records,
        **run,
    }
    summary["timings"]["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(out_dir / SUMMARY_JSON, summary)
    return summary
