"""What SFT and DPO share, in one place: records -> canonical examples, the LoRA config and
trainer arguments from one config section, borrowing the slot's base model (and giving it
back untouched), the pre-step-1 gate (first-batch sentinel, ...), the loss curve (JSON +
PNG), checkpoints and resume, saving the adapter / merged weights, and the manifest fields.

sft.py and dpo.py only build their dataset and their TRL trainer; everything else is here,
so the two trainers cannot drift apart (the audit found several near-duplicate trainers
whose LoRA rank and quantization differed without reason).

The same code runs in one process (`cai run`) and in every process of an `accelerate launch`
(`cai train`): each rank trains on its shard of every batch, checks its own first batch
inside the training loop, and the verdict is shared, so one bad rank stops all of them;
outputs are written once, by the main process.

Layout of a training output directory:

    out_dir/
      adapter/            the trained LoRA adapter (adapter_config.json, adapter_model.safetensors)
      merged/             base + adapter merged (only with `merge: true`; not for quantized bases)
      checkpoints/        trainer checkpoints every `save_steps` (resume points); each carries
                          cai_gate.json, the pre-step-1 gate results a resumed run reports
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
from cai.invariants.base import Result, Status, raise_on_failures
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
GATE_JSON = "cai_gate.json"
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


def gradient_checkpointing(cfg: RunConfig, section: TrainConfig) -> bool:
    """`<stage>.gradient_checkpointing`, resolved: it trades compute for activation memory,
    which a 32B model on one GPU needs and a CPU run does not (there it only adds the
    recomputed forward pass to every step)."""
    if section.gradient_checkpointing is not None:
        return section.gradient_checkpointing
    return cfg.model.device != "cpu" or cfg.model.quantization != "none"


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
        gradient_checkpointing=gradient_checkpointing(cfg, section),
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


def configured_trainer_settings(cfg: RunConfig, stage: str, n_records: int, world_size: int) -> dict[str, Any]:
    """What `trainer_config_record` must read back from the `stage` trainer, derived from the
    config alone through the resolutions the trainer was built with (`trainer_args`,
    `gradient_checkpointing`, DPO's `precompute_reference`): a run whose trainer got other
    values than its config (a setting not wired through, a config edited afterwards) differs."""
    section = getattr(cfg, stage)
    dtype = cfg.model.dtype
    want: dict[str, Any] = {
        "format": cfg.format, "lora": section.lora.model_dump(), "quantization": cfg.model.quantization,
        "dtype": dtype, "precision": {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32"),
        "learning_rate": section.learning_rate, "epochs": section.epochs, "max_steps": section.max_steps,
        "batch_size": section.batch_size, "grad_accum": section.grad_accum,
        "effective_batch_size": section.batch_size * section.grad_accum * world_size,
        "max_length": section.max_length, "save_steps": section.save_steps, "seed": cfg.seed,
        "gradient_checkpointing": gradient_checkpointing(cfg, section), "merge": section.merge,
    }
    if stage == "dpo":
        from cai.pipeline.dpo import precompute_reference

        want.update(beta=section.beta, precompute_ref_log_probs=precompute_reference(section, n_records, world_size),
                    loss_type=["sigmoid"])  # the DPO loss; TRL's other losses (IPO, hinge, ...) are other methods
    return want


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
    if section.merge and sharded_engine():
        raise BadInputError(f"merge: true under {sharded_engine()}: every rank holds a shard of the base, so "
                            "merged weights are not written; keep the adapter and merge after, in one process")
    if section.merge and cfg.model.quantization != "none":
        raise BadInputError(
            f"merge: true with a {cfg.model.quantization} base: adapter deltas cannot be merged into quantized "
            "weights; keep the adapter (the pipeline attaches it to the base) or merge later on an unquantized load")


# --------------------------------------------------------------------------- processes


def process_state(model_cfg):
    """accelerate's view of this process, made before any weights are read. Under a launch
    it initialises torch.distributed (gloo for a CPU model: accelerate joins CPU processes
    only when told `cpu=True`), so that transformers sees the launch when it loads weights;
    a plain process is rank 0 of 1 with nothing initialised."""
    from accelerate import PartialState

    return PartialState(cpu=model_cfg.device == "cpu")


def sharded_engine() -> str | None:
    """"fsdp" or "deepspeed" when the launch shards parameters (accelerate's own flags), else None."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


def rank_model_config(model_cfg, state):
    """Where this rank's base model is loaded. One process: as configured. DDP: the rank's
    own device (`cuda:LOCAL_RANK`; a full copy per rank, which is what DDP is). FSDP /
    DeepSpeed: the CPU, since the trainer shards and places it in `train()` (with
    `fsdp_cpu_ram_efficient_loading` transformers reads real weights on local rank 0 only)."""
    if state.num_processes == 1:
        return model_cfg
    device = "cpu" if sharded_engine() else str(state.device)
    return model_cfg.model_copy(update={"device": device})


def all_ranks(accelerator, value):
    """`value` from every rank, in rank order, on every rank (one all-gather; [value] alone)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def agree(accelerator, local: Sequence[Result]) -> list[Result]:
    """Every rank's results, known to every rank, as one result per check: it passes only if
    it passed on every rank, its evidence names each rank. All ranks reach the same verdict,
    so a failure on any rank stops every rank at the same point (no rank waits forever in a
    collective the others left)."""
    per_rank = all_ranks(accelerator, [r.to_json() for r in local])
    if len(per_rank) == 1:
        return list(local)
    combined = []
    for i, first in enumerate(per_rank[0]):
        own = [Result.from_json(results[i]) for results in per_rank]
        failed = [(rank, r) for rank, r in enumerate(own) if r.status != Status.PASS]
        status = next((r.status for _, r in failed if r.status == Status.FAIL), failed[0][1].status if failed else Status.PASS)
        shown = failed or list(enumerate(own))
        evidence = "; ".join(f"rank {rank}: {r.evidence}" for rank, r in shown)
        combined.append(Result(first["name"], status, own[0].severity,
                               (f"failed on rank(s) {', '.join(str(k) for k, _ in failed)} of {len(own)}: " if failed
                                else f"all {len(own)} ranks: ") + evidence,
                               details={"ranks": [r.to_json() for r in own]}))
    return combined


# --------------------------------------------------------------------------- the base model


@contextlib.contextmanager
def borrowed_base(slot, cfg: RunConfig, section: TrainConfig):
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
        if cfg.model.quantization != "none":
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing(cfg, section))
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
    """The newest complete `checkpoint-N` directory under `directory` (by step), or None.
    Complete: the trainer wrote its state and cai its gate record (a rank killed between the
    two leaves a checkpoint that is not resumed from)."""
    if not directory.is_dir():
        return None
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit():
            if (p / "trainer_state.json").is_file() and (p / GATE_JSON).is_file():
                found.append((int(p.name.split("-", 1)[1]), p))
    return max(found)[1] if found else None


def pre_step_gate(trainer, checks: Callable[[Any, dict[str, Any]], list[Result]], *, resumed_from: Path | None,
                  results: Iterable[Result] = ()):
    """TrainerCallback: the pre-step-1 gate inside the training loop, on every rank.

    At `on_train_begin` the model is prepared (DDP-wrapped, FSDP-sharded) and the dataloader
    is the rank's own shard; its first batch is the one step 1 trains on (accelerate's
    seedable sampler reseeds per epoch, so peeking does not change the order). `checks` run on
    it, the ranks agree (`agree`), and any error-severity failure raises InvariantError on
    every rank before a single forward pass of training, let alone an optimizer update.
    Resumed from a checkpoint, the policy is no longer the step-0 one: the gate results
    recorded in that checkpoint (by the launch that took step 1) are carried instead."""
    from transformers import TrainerCallback

    carried = list(results)

    class PreStepGate(TrainerCallback):
        def __init__(self):
            self.results: list[Result] = []

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            if resumed_from is None:
                batch = next(iter(train_dataloader))
                local = list(checks(trainer, batch))
                del batch
            else:
                local = [Result.from_json(r) for r in json.loads((resumed_from / GATE_JSON).read_text())]
            self.results = carried + (agree(trainer.accelerator, local) if resumed_from is None else local)
            raise_on_failures(self.results)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # after the trainer wrote the checkpoint
                gate = [r.to_json() for r in self.results if r not in carried]
                write_json_atomic(Path(args.output_dir) / f"checkpoint-{state.global_step}" / GATE_JSON, gate)

    gate = PreStepGate()
    trainer.add_callback(gate)
    return gate


def run_trainer(trainer, *, stage: str, out_dir: Path, resume: bool,
                checks: Callable[[Any, dict[str, Any]], list[Result]], results: Iterable[Result] = ()) -> dict[str, Any]:
    """Train behind the pre-step-1 gate (`pre_step_gate`: `checks` on every rank's first
    batch, any failure stops every rank before step 1). With `resume`, training continues
    from the newest checkpoint in out_dir/checkpoints (TRL's `checkpoint-N` directories,
    written every `save_steps`: adapter, optimizer, scheduler, RNG states, trainer state).
    Returns the summary fields on every rank; only the main process writes files."""
    accelerator = trainer.accelerator
    ckpt_dir = out_dir / CHECKPOINT_DIR
    checkpoint = latest_checkpoint(ckpt_dir)
    if checkpoint is not None and not resume:
        raise ArtifactError(f"{ckpt_dir}: checkpoints of an earlier run exist ({checkpoint.name}); "
                            "resume it (--resume) or train into a new directory")
    gate = pre_step_gate(trainer, checks, resumed_from=checkpoint, results=results)

    start_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    steps = trainer.state.global_step
    ran = steps - start_step
    memory = memory_snapshot()  # this rank's peaks, measured by its open slot
    per_rank = all_ranks(accelerator, {"rank": accelerator.process_index, **memory})
    curve = write_loss_curve(trainer.state.log_history, out_dir, stage) if accelerator.is_main_process else {}
    return {
        "steps": steps,
        "steps_this_run": ran,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "world_size": accelerator.num_processes,
        "timings": {"train_seconds": round(train_seconds, 3),
                    "seconds_per_step": round(train_seconds / ran, 4) if ran else None},
        "memory": memory,
        "memory_per_rank": per_rank,
        "invariants": [r.to_json() for r in gate.results],
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
            if state.is_world_process_zero:
                write_loss_curve(state.log_history, out_dir, stage, png=False)

    return LossCurveCallback()


# --------------------------------------------------------------------------- outputs


def save_adapter(trainer, out_dir: Path, adapter: str = "default") -> Path:
    """Write only the trained adapter (DPO's frozen "ref" copy stays out), once. The state
    dict comes through accelerate, which gathers FSDP / ZeRO-3 shards: every rank takes
    part in that, the main process writes."""
    path = out_dir / ADAPTER_DIR
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(path), state_dict=state_dict, selected_adapters=[adapter])
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
    training.json: on the main process, the others waiting until it is on disk. Returns
    the dict the lead puts in the stage manifest (on every rank)."""
    accelerator = trainer.accelerator
    adapter_dir = save_adapter(trainer, out_dir, adapter)
    merged_dir = None
    if section.merge and accelerator.is_main_process:
        merged_dir = write_merged(accelerator.unwrap_model(trainer.model), trainer.processing_class, out_dir, adapter)
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
    if accelerator.is_main_process:
        write_json_atomic(out_dir / SUMMARY_JSON, summary)
    accelerator.wait_for_everyone()
    return summary
