"""`cai preflight CONFIG`: check the configuration against the declared methodology, then
rehearse the whole pipeline on a small sample with every invariant on, and project the
cost of the full run. A large run should not start before this passes.

The compliance matrix is checked first (it is free); a failing row stops before any model
work. The rehearsal is `cai run` itself on a scaled-down copy of the config (same model,
format, critic and training settings; fewer items and steps), so it exercises the very
code the real run will.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.config import RunConfig, load_config
from cai.errors import CaiError

DEFAULT_SAMPLE = 8


@dataclass
class Row:
    requirement: str
    passed: bool
    observed: str

    def to_json(self) -> dict[str, Any]:
        return {"requirement": self.requirement, "passed": self.passed, "observed": self.observed}


def compliance(cfg: RunConfig) -> list[Row]:
    """The declared methodology (DESIGN.md), row by row, against this config."""
    from cai.invariants import evaluate, offline_invariants

    eval_format = cfg.eval.format or cfg.format
    rows = [
        Row("instructions are model-generated (the methodology; templates are a labelled fallback, not it)",
            cfg.instructions.source == "model", f"instructions.source = {cfg.instructions.source}"),
        Row("critic filtering on, with a positive confidence threshold",
            cfg.critic.enabled and cfg.critic.threshold > 0,
            f"critic.enabled = {cfg.critic.enabled}, threshold = {cfg.critic.threshold}, swap = {cfg.critic.swap}"),
        Row("over-generation before the critic keeps the best",
            cfg.instructions.overgenerate > 1.0, f"instructions.overgenerate = {cfg.instructions.overgenerate}"),
        Row("few-shot completion prompting for responses", cfg.responses.shots > 0,
            f"responses.shots = {cfg.responses.shots}, best-of-{cfg.responses.n_candidates}"),
        Row("evaluation in the training format (train/eval parity)", eval_format == cfg.format,
            f"train format = {cfg.format}, eval format = {eval_format}"),
        Row("DPO beta in the documented range 0.1-0.3", 0.1 <= cfg.dpo.beta <= 0.3, f"dpo.beta = {cfg.dpo.beta}"),
        Row("one LoRA setting for SFT and DPO (DPO continues the SFT adapter)", cfg.sft.lora == cfg.dpo.lora,
            f"sft r={cfg.sft.lora.r} alpha={cfg.sft.lora.alpha}; dpo r={cfg.dpo.lora.r} alpha={cfg.dpo.lora.alpha}"),
        Row("a generation backend `cai run` drives (hf; vLLM is not wired in)", cfg.generation.backend == "hf",
            f"generation.backend = {cfg.generation.backend}"),
        Row("remote code off", not cfg.model.trust_remote_code, f"trust_remote_code = {cfg.model.trust_remote_code}"),
    ]
    for result in evaluate(offline_invariants(cfg.model), None):
        rows.append(Row(f"offline readiness: {result.name}", result.status.value != "fail", result.evidence))
    return rows


def weights_row(cfg: RunConfig, run_dir: Path) -> Row:
    """After the rehearsal: every artifact's model was loaded with the declared quantization
    and dtype, as observed on the loaded modules (`weights_as_declared`)."""
    from cai.invariants.check import find_artifacts
    from cai.invariants.provenance import WeightsAsDeclared

    results = [WeightsAsDeclared().check(a) for a in find_artifacts(run_dir)]
    failed = [r for r in results if r.blocking]
    observed = failed[0].evidence if failed else (results[0].evidence if results else "no artifact was written")
    return Row(f"weights loaded as declared (quantization {cfg.model.quantization}, dtype {cfg.model.dtype})",
               bool(results) and not failed, observed)


def rehearsal_config(cfg: RunConfig, sample: int) -> RunConfig:
    """The same run, scaled down to `sample` instructions and a few training steps."""
    data = cfg.model_dump()
    data["name"] = f"{cfg.name}-preflight"
    data["instructions"].update(n=sample, max_rounds=max(cfg.instructions.max_rounds, 10))
    for section in ("sft", "dpo"):
        data[section].update(max_steps=2, save_steps=2)
    data["eval"].update(limit=sample)
    return RunConfig.model_validate(data)


def projection(cfg: RunConfig, run_dir: Path, sample: int, target: int) -> dict[str, Any]:
    """Seconds per instruction of each data stage and seconds per training step, scaled to
    `target` examples. Assumptions are returned with the numbers."""
    from cai.pipeline.store import read_manifest

    stages: dict[str, Any] = {}
    for stage in ("candidates", "instructions", "responses", "pairs", "sft", "dpo", "eval"):
        path = run_dir / stage
        if (path / "manifest.json").is_file():
            m = read_manifest(path)
            stages[stage] = {"seconds": m["timings"]["wall_seconds"], "records": m["outputs"]["records"]}
    scale = target / sample
    data_seconds = sum(stages.get(s, {}).get("seconds", 0) for s in ("candidates", "instructions", "responses", "pairs"))
    steps = {s: math.ceil(target * cfg_section.epochs / (cfg_section.batch_size * cfg_section.grad_accum))
             for s, cfg_section in (("sft", cfg.sft), ("dpo", cfg.dpo))}
    per_step = {s: stages[s]["seconds"] / 2 for s in ("sft", "dpo") if s in stages}
    train_seconds = sum(per_step.get(s, 0) * steps[s] for s in steps)
    total = data_seconds * scale + train_seconds
    return {
        "stages": stages, "target": target, "sample": sample,
        "projected_hours": {"data": round(data_seconds * scale / 3600, 2), "training": round(train_seconds / 3600, 2),
                            "total": round(total / 3600, 2)},
        "assumptions": [
            f"data stages scale linearly from {sample} to {target} instructions (x{scale:.0f}) on the same hardware",
            f"training: {steps['sft']} SFT and {steps['dpo']} DPO steps (target x epochs / effective batch), at the "
            "rehearsal's seconds per step (2 steps each, including trainer start-up: an upper bound)",
            "GPU-hours = wall hours x GPUs used; the rehearsal ran on this machine's device",
            "`cai run --shard I/N` on N devices divides the data hours by about N (units go round robin); "
            "training is not sharded by cai (docs/multi_gpu.md)",
        ],
    }


def projection_table(p: dict[str, Any]) -> list[str]:
    """The projection as a markdown table: stage, items measured, measured rate, projected
    hours at the target (data stages scale per item, training per step; eval is not projected)."""
    lines = [f"| stage | items (rehearsal) | measured rate | projected hours at {p['target']} |", "|---|---|---|---|"]
    scale = p["target"] / p["sample"]
    for stage, s in p["stages"].items():
        seconds, records = s["seconds"], s["records"]
        if stage in ("sft", "dpo"):
            rate, hours = f"{seconds / 2:.2f} s/step", "see training"
        elif stage == "eval":
            rate, hours = f"{seconds / max(records, 1):.2f} s/response", "not projected"
        else:
            rate, hours = f"{seconds / max(records, 1):.2f} s/item", f"{seconds * scale / 3600:.2f}"
        lines.append(f"| {stage} | {records} | {rate} | {hours} |")
    h = p["projected_hours"]
    lines += [f"| data (total) | | | {h['data']:.2f} |", f"| training (sft + dpo) | | | {h['training']:.2f} |",
              f"| **total** | | | **{h['total']:.2f}** |"]
    return lines


def cli_main(args) -> int:
    from cai.pipeline.runner import check_output_path, check_runnable, log, run_pipeline, stage_fault

    cfg = load_config(args.config)
    sample = args.sample or DEFAULT_SAMPLE
    out_dir = Path(args.out) if args.out else Path("reports") / "preflight"
    # what `cai run` would refuse is refused before a report is written; offline readiness is a compliance row
    check_output_path(out_dir, "--out")
    check_runnable(cfg, config_path=args.config, offline=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = compliance(cfg)
    report: dict[str, Any] = {"config": str(args.config), "sample": sample, "target": args.target,
                              "compliance": [r.to_json() for r in rows]}
    rehearsal_ok = False
    if all(r.passed for r in rows):
        with tempfile.TemporaryDirectory(prefix="cai-preflight-") as tmp:
            run_dir = Path(tmp) / "run"
            try:
                run_pipeline(rehearsal_config(cfg, sample), run_dir)
                rehearsal_ok = True
            except CaiError as err:
                report["rehearsal_error"] = str(err).splitlines()[0]
            except Exception as err:
                if (fault := stage_fault(err, cfg, run_dir, args.config)) is None:
                    raise
                report["rehearsal_error"] = str(fault)
            rows.append(weights_row(cfg, run_dir))
            report["compliance"] = [r.to_json() for r in rows]
            report["projection"] = projection(cfg, run_dir, sample, args.target)
    else:
        report["rehearsal_error"] = "skipped: compliance rows failed"
    report["passed"] = rehearsal_ok and all(r.passed for r in rows)
    name = Path(args.config).stem
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    md = [f"# cai preflight: {name}", "", f"**{'PASS' if report['passed'] else 'FAIL'}**", "",
          "| requirement | status | observed |", "|---|---|---|"]
    md += [f"| {r.requirement} | {'pass' if r.passed else '**FAIL**'} | {r.observed} |" for r in rows]
    if "rehearsal_error" in report:
        md += ["", f"Rehearsal: {report['rehearsal_error']}"]
    if "projection" in report:
        p = report["projection"]
        md += ["", f"## Projection for {args.target} examples", ""] + projection_table(p) + [""]
        md += [f"- {a}" for a in p["assumptions"]]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    for r in rows:
        log(f"{'pass' if r.passed else 'FAIL'}  {r.requirement}: {r.observed}")
    if "projection" in report:
        print("\n".join(projection_table(report["projection"])))
    log(f"preflight {'PASS' if report['passed'] else 'FAIL'}: {out_dir / (name + '.md')}")
    return 0 if report["passed"] else 1
