"""Findings and the rule catalogue of `cai audit`.

Every rule belongs to one of seven categories (the names are part of the CLI contract):
`chat-template`, `special-tokens`, `memory-sequencing`, `format-parity`,
`unused-implementation`, `remote-code`, `config-drift`; plus the `audit` category for
files the audit could not read.

Severities. `error` marks a defect that silently voids a result or a run; `warning`
marks something that is often a defect but has legitimate uses, so a person must look:

- chat-template (error): a base model evaluated through a chat template is not a base model;
  every base-vs-trained comparison built on it is void, and nothing crashes to say so.
- special-tokens (warning): a default `add_special_tokens=True` prepends BOS (Llama, Gemma,
  Mistral) to a prompt the format did not declare, shifting train and eval inputs; for
  tokenizers with no BOS (Qwen) it is a no-op, hence a warning, not an error.
- memory-sequencing (error): two large models resident at once is an out-of-memory at the
  scale this toolkit targets (32B), usually hours into a run.
- format-parity (error): evaluating on prompts in another format than training measures the
  distribution shift, not the training.
- unused-implementation (warning): a module nobody imports is dead code or an un-wired stage;
  only a person can tell which (it may be public API).
- remote-code (error): `trust_remote_code=True` executes code shipped with a checkpoint.
- config-drift (warning): two scripts choosing different LoRA ranks or quantization may be
  deliberate (an ablation); the finding asks for one shared, named source.
  quantization-default-override (a caller's flag left next to a wrapper default that turns the
  other flag on) is in this category: the effective quantization is not what the caller reads.
- audit/parse-error (warning): the file was skipped; the rest of the audit is still valid.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

CATEGORIES = (
    "chat-template",
    "special-tokens",
    "memory-sequencing",
    "format-parity",
    "unused-implementation",
    "remote-code",
    "config-drift",
    "scoring",
    "data-overlap",
    "orchestration",
    "reproducibility",
    "audit",
)


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    severity: str  # "error" | "warning"
    summary: str
    help: str


RULES: dict[str, Rule] = {
    r.id: r
    for r in [
        Rule(
            "chat-template-not-disabled",
            "chat-template",
            "error",
            "Tokenizer used without disabling its chat template",
            "Set `tokenizer.chat_template = None` right after loading (or pass `chat_template=None` "
            "to from_pretrained, or load through one project loader that does), so no code path can "
            "render the checkpoint's chat template around a base model's prompts.",
        ),
        Rule(
            "chat-template-latent",
            "chat-template",
            "warning",
            "Tokenizer keeps its chat template, though nothing renders templates yet",
            "Set `tokenizer.chat_template = None` right after loading, so a template renderer added later "
            "(apply_chat_template, TRL conversational data, lm-eval, vLLM chat) cannot wrap a base model's prompts.",
        ),
        Rule(
            "apply-chat-template",
            "chat-template",
            "error",
            "apply_chat_template used in a base-model pipeline",
            "Render prompts with the project's own prompt format (one function shared by training and "
            "evaluation) and encode them with add_special_tokens=False; a base model has no chat template.",
        ),
        Rule(
            "chat-messages-input",
            "chat-template",
            "error",
            "Chat messages passed to a generation API that applies the chat template",
            "Pass the rendered prompt string, not a list of {role, content} messages: text-generation "
            "pipelines and vLLM's LLM.chat apply the tokenizer's chat template to messages.",
        ),
        Rule(
            "special-tokens-default",
            "special-tokens",
            "warning",
            "Text encoded without add_special_tokens=False",
            "Pass add_special_tokens=False (or encode through one helper that does), and add only the "
            "special tokens the prompt format declares, e.g. EOS ending a training completion.",
        ),
        Rule(
            "model-load-while-resident",
            "memory-sequencing",
            "error",
            "Model loaded while another is still referenced",
            "Release the earlier model first (`del model; gc.collect(); torch.cuda.empty_cache()`), or keep "
            "one base model and switch LoRA adapters in place (PeftModel / set_adapter / disable_adapter).",
        ),
        Rule(
            "models-accumulated",
            "memory-sequencing",
            "error",
            "Models collected in a container, one load per item",
            "Load, use and release one model per iteration (`del model; gc.collect()`); keep results, "
            "not models, in the container.",
        ),
        Rule(
            "eval-format-mismatch",
            "format-parity",
            "error",
            "Generation prompt in a different format from the training data",
            "Render evaluation prompts with the same function that renders training prompts (one "
            "prompt-format module imported by both sides).",
        ),
        Rule(
            "unused-module",
            "unused-implementation",
            "warning",
            "Module implements functions or classes that nothing imports",
            "Wire the module into the pipeline (import and call it where the data is produced) or delete "
            "it; do not let docs describe a stage the code never runs.",
        ),
        Rule(
            "trust-remote-code",
            "remote-code",
            "error",
            "trust_remote_code=True executes code shipped with the checkpoint",
            "Drop trust_remote_code=True and use an architecture transformers implements natively; if "
            "unavoidable, pin the revision (commit hash) and review the code it runs.",
        ),
        Rule(
            "quantization-drift",
            "config-drift",
            "warning",
            "Quantization chosen differently across scripts",
            "Choose the quantization once (run config or a shared constants module) and read it everywhere.",
        ),
        Rule(
            "quantization-default-override",
            "config-drift",
            "warning",
            "Caller's quantization flag combined with a wrapper default that turns the other one on",
            "Give the wrapper one quantization parameter (None | '4bit' | '8bit') instead of two flags, or "
            "pass the other flag as False at the call.",
        ),
        Rule(
            "lora-rank-drift",
            "config-drift",
            "warning",
            "LoRA rank chosen differently across scripts",
            "Choose the LoRA rank once (run config or a shared constants module) and read it everywhere.",
        ),
        Rule(
            "dpo-beta-drift",
            "config-drift",
            "warning",
            "DPO beta chosen differently across scripts",
            "Choose DPO beta once (run config or a shared constants module) and read it everywhere.",
        ),
        Rule(
            "heuristic-scoring",
            "scoring",
            "warning",
            "Scorer decides success from length, refusal keywords or non-emptiness",
            "Score with a verifier of what the instruction asked (IFEval-style checkers, `cai score`): one "
            "canonical scorer shared by every evaluation.",
        ),
        Rule(
            "heuristic-scoring-decides",
            "scoring",
            "error",
            "Heuristic scorer whose verdicts feed a significance test or a gate",
            "Replace the heuristic with a verifier of the instruction's constraint before testing or gating on "
            "its verdicts; a length cut-off tested with McNemar ships as a significant 'improvement'.",
        ),
        Rule(
            "incomparable-scorers",
            "scoring",
            "warning",
            "Evaluation entry points score the same data with different scorers",
            "Make one canonical scorer (a shared module or `cai score`) and call it from every evaluation.",
        ),
        Rule(
            "eval-on-training-data",
            "data-overlap",
            "error",
            "Evaluation reads a data file that training also reads",
            "Evaluate on a held-out file that no training or pair-building script reads.",
        ),
        Rule(
            "dangling-reference",
            "orchestration",
            "error",
            "Orchestrator runs or imports a script/module that does not exist",
            "Point the orchestrator at the current script (or restore it) and delete copies no longer run.",
        ),
        Rule(
            "duplicate-entry-points",
            "orchestration",
            "warning",
            "Near-duplicate training or evaluation scripts with no status",
            "Keep one script configured per variant, or mark the others deprecated (module docstring) or move "
            "them to archive/.",
        ),
        Rule(
            "unseeded-sampling",
            "reproducibility",
            "warning",
            "Sampled evaluation (do_sample=True / temperature > 0) with no seed set",
            "Call transformers.set_seed(seed) (vLLM: SamplingParams(seed=...)) and record the seed, or evaluate "
            "greedily.",
        ),
        Rule(
            "parse-error",
            "audit",
            "warning",
            "File could not be parsed; it was not audited",
            "Fix the syntax error (or exclude the file) so the audit can cover it.",
        ),
    ]
}


SENTENCE_END = re.compile(r"\.\s+(?=[A-Z`(])")


@dataclass(frozen=True)
class Finding:
    """One finding. `message` says what and why; `fix` says how to fix it (split off a message's
    trailing "Fix: ..." or, without one, the rule's help), so the text output can stay one short
    line while JSON/SARIF carry both. `suppressed` is the reason of an inline
    `# cai: ignore[rule] reason` on the reported line (None when not suppressed); `fingerprint`
    identifies the finding across edits that move lines (see `cai.audit.static.fingerprint`)."""

    rule: str
    path: str  # relative to the audited root, POSIX separators
    line: int
    message: str
    column: int = 1
    category: str = field(default="")
    severity: str = field(default="")
    fix: str = ""
    suppressed: str | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        rule = RULES[self.rule]
        if not self.category:
            object.__setattr__(self, "category", rule.category)
        if not self.severity:
            object.__setattr__(self, "severity", rule.severity)
        if not self.fix:
            what, sep, fix = self.message.partition(" Fix: ")
            object.__setattr__(self, "message", what.strip() if sep else self.message)
            object.__setattr__(self, "fix", fix.strip() if sep else rule.help)

    @property
    def short(self) -> str:
        """The message's first sentence: what the text output prints."""
        head = SENTENCE_END.split(self.message, maxsplit=1)[0].rstrip(".")
        return head + "."

    def to_dict(self) -> dict:
        d = asdict(self)
        keys = ("rule", "category", "severity", "path", "line", "column", "message", "fix", "fingerprint")
        out = {k: d[k] for k in keys}
        if self.suppressed is not None:
            out["suppressed"] = {"reason": self.suppressed}
        return out

    @property
    def sort_key(self) -> tuple:
        return (self.path, self.line, self.column, self.rule)
