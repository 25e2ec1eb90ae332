"""Supervised fine-tuning: TRL's SFTTrainer with a LoRA adapter on the slot's base model.

Data reach the trainer as string `prompt` / `completion` pairs (the project's own format,
`formats.render`), so TRL applies no chat template, adds no BOS for these tokenizers,
masks the prompt (`completion_only_loss=True`) and appends `tokenizer.eos_token` as text:
that EOS is the declared end of a training completion. The first-batch sentinel checks
all of it on the batch the trainer really builds, before step 1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cai.config import RunConfig
from cai.invariants.training import FirstBatchSentinel
from cai.pipeline import training


def sft_dataset(records: list[dict]):
    """Non-conversational prompt-completion dataset: strings only, nothing TRL could
    mistake for chat messages."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])


def build_sft_trainer(cfg: RunConfig, model, tokenizer, records: list[dict], out_dir: Path):
    """SFTTrainer over `model` (the slot's base; peft adds the LoRA adapter "default")."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**training.trainer_args(cfg, cfg.sft, out_dir), completion_only_loss=True, packing=False,
                     eos_token=tokenizer.eos_token)
    return SFTTrainer(model=model, args=args, train_dataset=sft_dataset(records), processing_class=tokenizer,
                      peft_config=training.lora_config(cfg.sft),
                      callbacks=[training.loss_curve_callback(out_dir, "sft")])


def train_sft(cfg: RunConfig, slot, records: list[dict], out_dir: Path, *, resume: bool = False) -> dict[str, Any]:
    """Train a LoRA adapter on SFT records `{id, instruction, format, prompt, completion}`.

    Stops before step 1 with InvariantError if the first batch is not canonical prompt +
    completion + EOS. Writes out_dir/adapter (+ merged/ with `sft.merge`), checkpoints,
    loss_curve.json/.png and training.json; returns the manifest fields. The slot's base
    model is left as it was (no LoRA layers): attach the adapter with
    `slot.add_adapter("sft", result["adapter_dir"])`."""
    started = time.perf_counter()
    tok = slot.tokenizer
    out_dir, eos, examples, truncation = training.prepare("sft", cfg, cfg.sft, records, tok, out_dir)

    def checks(trainer, batch):
        subject = training.first_batch_subject("sft", batch, examples, tok, eos, cfg.sft.max_length)
        return [FirstBatchSentinel().check(subject)]

    with training.borrowed_base(slot, cfg, cfg.sft) as base:
        trainer = build_sft_trainer(cfg, base, tok, records, out_dir)
        try:
            run = training.run_trainer(trainer, stage="sft", out_dir=out_dir, resume=resume, checks=checks,
                                       results=[truncation])
            return training.finish(stage="sft", cfg=cfg, section=cfg.sft, trainer=trainer, run=run, out_dir=out_dir,
                                   started=started, n_records=len(records), completion_only_loss=True)
        finally:
            del trainer
