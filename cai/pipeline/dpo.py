"""Direct preference optimisation from the SFT policy: TRL's DPOTrainer.

DPO must start from, and be regularised towards, the SFT policy. With `peft_config` and
`ref_model=None`, TRL's reference would be the base with the adapter disabled - not the
SFT policy. So the SFT adapter is loaded trainable as "default"
(`PeftModel.from_pretrained(base, sft_dir, is_trainable=True)`) and no `peft_config` is
passed; TRL then adds a frozen "ref" adapter copied from it and uses that as the
reference. Only "default" is saved. The step-0 reference-identity invariant proves it on
the first batch (loss = ln 2, rewards 0) before step 1; the first-batch sentinel checks
prompt + chosen / prompt + rejected + EOS exactly as for SFT.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cai.config import RunConfig
from cai.errors import BadInputError, ConfigError
from cai.invariants.training import FirstBatchSentinel, ReferenceIdentity, ReferenceLogps
from cai.pipeline import training

REFERENCE_TOLERANCE = 1e-3  # |step-0 loss - ln 2| and max |reward|


def preference_dataset(pairs: list[dict]):
    """Non-conversational preference dataset: string prompt / chosen / rejected."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])


def load_sft_policy(base, sft_adapter_dir: Path, cfg: RunConfig):
    """The SFT adapter on the resident base, trainable, as adapter "default". DPO goes on
    training this adapter, so `dpo.lora` must describe it (one LoRA setting per run)."""
    from peft import PeftConfig, PeftModel

    sft_adapter_dir = Path(sft_adapter_dir)
    if not (sft_adapter_dir / "adapter_config.json").is_file():
        raise BadInputError(f"{sft_adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    found = PeftConfig.from_pretrained(str(sft_adapter_dir))
    want = cfg.dpo.lora
    mismatch = {k: (getattr(found, a), w) for k, a, w in (
        ("r", "r", want.r), ("alpha", "lora_alpha", want.alpha), ("dropout", "lora_dropout", want.dropout),
        ("target_modules", "target_modules", sorted(want.target_modules)))
        if (sorted(getattr(found, a)) if k == "target_modules" else getattr(found, a)) != w}
    if mismatch:
        detail = ", ".join(f"{k}: adapter {a!r} vs dpo.lora {b!r}" for k, (a, b) in mismatch.items())
        raise ConfigError(f"{sft_adapter_dir}: DPO continues the SFT adapter, so dpo.lora must match it ({detail})")
    return PeftModel.from_pretrained(base, str(sft_adapter_dir), is_trainable=True)


def precompute_reference(section, n_pairs: int, world_size: int = 1) -> bool:
    """`dpo.precompute_ref_log_probs`, resolved. Precomputing costs one reference forward pass
    per pair before training; computing per step costs one per pair per step it is drawn.
    They are equal when training draws every pair once, so precompute (the cheaper step)
    unless `max_steps` stops training before one pass over the pairs."""
    if section.precompute_ref_log_probs is not None:
        return section.precompute_ref_log_probs
    if section.max_steps <= 0:
        return True
    return section.max_steps * section.batch_size * section.grad_accum * world_size >= n_pairs


def build_dpo_trainer(cfg: RunConfig, policy, tokenizer, pairs: list[dict], out_dir: Path):
    """DPOTrainer over the SFT policy with no peft_config and no ref_model: TRL adds the
    frozen "ref" adapter (a copy of "default") and uses it as the reference. With the
    reference precomputed (`precompute_reference`) its log-probs are computed here, once."""
    from trl import DPOConfig, DPOTrainer

    world_size = training.process_state(cfg.model).num_processes
    args = DPOConfig(**training.trainer_args(cfg, cfg.dpo, out_dir), beta=cfg.dpo.beta,
                     precompute_ref_log_probs=precompute_reference(cfg.dpo, len(pairs), world_size))
    return DPOTrainer(model=policy, ref_model=None, args=args, train_dataset=preference_dataset(pairs),
                      processing_class=tokenizer, callbacks=[training.loss_curve_callback(out_dir, "dpo")])


def describe_reference(trainer) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is not None:
        how = "a separate reference model"
    elif "ref" in getattr(model, "peft_config", {}):
        how = "the frozen 'ref' adapter (copy of the SFT adapter)"
    else:
        how = "the base model with adapters disabled"
    return how + (", log-probs precomputed" if trainer.precompute_ref_logps else "")


def reference_logps(trainer, batch: dict[str, Any], *, tolerance: float = REFERENCE_TOLERANCE) -> ReferenceLogps:
    """Policy and reference completion log-probs of the first batch, both live on the same
    padded batch through TRL's own path: the reference via `trainer.compute_ref_log_probs`
    (TRL's choice of reference: the "ref" adapter, adapters disabled, or a ref model), the
    policy via the same fused forward with the trained adapter active (what the loss uses).
    Precomputed reference columns, if the batch has them, are carried for comparison."""
    import torch
    from trl.models.utils import disable_gradient_checkpointing

    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        ref_c, ref_r = trainer.compute_ref_log_probs(model, batch)
        kwargs = {k: v for k, v in batch.items() if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with torch.no_grad(), disable_gradient_checkpointing(model, trainer.args.gradient_checkpointing_kwargs), \
                trainer.accelerator.autocast():
            per_token = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
        policy = per_token[:, -(batch["completion_mask"].size(1) - 1):].sum(dim=1)
    finally:
        model.train(was_training)
    pol_c, pol_r = policy.chunk(2, dim=0)
    pre = {}
    if "ref_chosen_logps" in batch:
        pre = {"precomputed_chosen": [float(x) for x in batch["ref_chosen_logps"]],
               "precomputed_rejected": [float(x) for x in batch["ref_rejected_logps"]]}
    return ReferenceLogps([float(x) for x in pol_c], [float(x) for x in pol_r], [float(x) for x in ref_c],
                          [float(x) for x in ref_r], beta=trainer.beta, tolerance=tolerance,
                          reference=describe_reference(trainer), **pre)


def train_dpo(cfg: RunConfig, slot, pairs: list[dict], sft_adapter_dir: Path, out_dir: Path, *,
              resume: bool = False) -> dict[str, Any]:
    """Continue the SFT adapter with DPO on preference records
    `{id, instruction, format, prompt, chosen, rejected, margin}`; beta from `dpo.beta`.

    Before step 1: the first-batch sentinel and the step-0 reference-identity check (raise
    InvariantError on failure). Writes out_dir/adapter (the "default" adapter only),
    checkpoints, loss_curve.json/.png (with reward margins) and training.json; returns the
    manifest fields. The slot's base is left bare, as for SFT."""
    started = time.perf_counter()
    tok = slot.tokenizer
    out_dir, eos, examples, truncation = training.prepare("dpo", cfg, cfg.dpo, pairs, tok, out_dir)

    def checks(trainer, batch):
        subject = training.first_batch_subject("dpo", batch, examples, tok, eos, cfg.dpo.max_length)
        return [FirstBatchSentinel().check(subject), ReferenceIdentity().check(reference_logps(trainer, batch))]

    with training.borrowed_base(slot, cfg, cfg.dpo) as base:
        trainer = build_dpo_trainer(cfg, load_sft_policy(base, sft_adapter_dir, cfg), tok, pairs, out_dir)
        try:
            reference = describe_reference(trainer)
            run = training.run_trainer(trainer, stage="dpo", out_dir=out_dir, resume=resume, checks=checks,
                                       results=[truncation])
            return training.finish(stage="dpo", cfg=cfg, section=cfg.dpo, trainer=trainer, run=run, out_dir=out_dir,
                                   started=started, n_records=len(pairs), beta=trainer.beta,
                                   precompute_ref_log_probs=bool(trainer.precompute_ref_logps),
                                   loss_type=list(trainer.loss_types), reference=reference,
                                   sft_adapter=str(Path(sft_adapter_dir).resolve()))
        finally:
            del trainer

