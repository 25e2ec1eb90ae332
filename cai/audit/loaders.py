"""Loaders and memory for `cai.audit.flow`: which external calls load a model, a tokenizer, a
pipeline or a vLLM engine (and which only wrap or move one), and the memory-sequencing checks made
when a load happens while another owned model is still referenced (model-load-while-resident,
models-accumulated)."""

from __future__ import annotations

import ast
import re

from cai.audit.codebase import Codebase, SourceFile
from cai.audit.values import MODELISH, Val, flatten, key_of

TOKENIZER_CLASS_RE = re.compile(r"(Tokenizer|Processor)(Fast)?$")
MODEL_CLASS_RE = re.compile(r"^(AutoModel|AutoPeftModel)|For[A-Z]\w*$|Model$|WithValueHead$")
PEFT_WRAPPERS = {"PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftMixedModel"}
WRAP_FUNCS = {"get_peft_model", "prepare_model_for_kbit_training", "inject_adapter_in_model"}
MODEL_ALIAS_METHODS = {
    "to", "cuda", "eval", "train", "half", "float", "bfloat16", "requires_grad_",
    "merge_and_unload", "get_base_model",
}
RELEASE_NAME_RE = re.compile(r"release|unload|free|offload|cleanup|evict|dispose", re.I)


def ext_kind(qual: str) -> str | None:
    parts = qual.split(".")
    last = parts[-1]
    if last == "from_pretrained" and len(parts) >= 2:
        c = parts[-2]
        if c in ("FastLanguageModel", "FastModel"):
            return "unsloth"
        if TOKENIZER_CLASS_RE.search(c):
            return "tok-load"
        if c in PEFT_WRAPPERS:
            return "wrap"
        if "Config" in c or "Extractor" in c:
            return None
        if MODEL_CLASS_RE.search(c):
            return "model-load"
        return None
    if last in WRAP_FUNCS:
        return "wrap"
    if last == "pipeline" and parts[0] in ("pipeline", "transformers"):
        return "pipeline"
    if last == "LLM" and parts[0] in ("LLM", "vllm"):
        return "vllm"
    return None


def attr_kinds(cb: Codebase, sf: SourceFile, cls: ast.ClassDef) -> dict[str, str]:
    """What each `self.<attr>` is assigned anywhere in the class: "pipe", "vllm", "tok", "model"."""
    kinds = {"pipeline": "pipe", "vllm": "vllm", "tok-load": "tok", "model-load": "model"}
    found: dict[str, str] = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for t in node.targets:
                k = key_of(t)
                if k and k.startswith("self.") and k.count(".") == 1:
                    r = cb.resolve(sf, node.value.func, cls)
                    kind = kinds.get(ext_kind(r[1]) or "") if r is not None and r[0] == "ext" else None
                    if kind:
                        found[k[5:]] = kind
    return found


class MemoryChecks:
    """Mixed into `cai.audit.flow.Scope`: what is resident when a model loads."""

    def model_method(self, recv: Val, meth: str, node: ast.Call):
        """`model.cpu()` / `.to("cpu")` release it; `.to(...)`, `.eval()`, ... return the same model."""
        to_cpu = meth == "cpu" or (
            meth == "to"
            and any(
                isinstance(a, ast.Constant) and a.value in ("cpu", "meta")
                for a in [*node.args, *(kw.value for kw in node.keywords if kw.arg == "device")]
            )
        )
        if to_cpu:
            recv.offloaded = True
            return recv
        if meth in MODEL_ALIAS_METHODS:
            return recv
        return None

    def released_by(self, last: str, argvals: list) -> None:
        if RELEASE_NAME_RE.search(last or ""):
            for v in argvals:
                if v.kind in MODELISH:
                    v.offloaded = True

    def collected(self, elt: ast.expr, v) -> None:
        if isinstance(v, Val) and v.kind in MODELISH and v.owns and v.site is not None and isinstance(elt, ast.Call):
            self.finding(
                "models-accumulated",
                elt,
                f"{v.label} runs once per item of a comprehension and every loaded model is kept in the "
                "resulting collection, so all of them are resident at once: at the scale this targets "
                "that is an out-of-memory. Fix: loop, load one model, use it, then "
                "`del model; gc.collect(); torch.cuda.empty_cache()` before the next; keep results, not models.",
            )

    def alive(self) -> list[tuple[str, Val, bool]]:
        out: list[tuple[str, Val, bool]] = []
        seen: set[int] = set()
        for k, v in self.env.items():
            for val in flatten(v):
                if val.kind in MODELISH and val.owns and not val.offloaded and id(val) not in seen:
                    seen.add(id(val))
                    out.append((k, val, False))
        for k, vals in self.cont.items():
            for val in vals:
                if not val.offloaded and id(val) not in seen:
                    seen.add(id(val))
                    out.append((k, val, True))
        return out

    def load(self, node: ast.Call, label: str, kind: str) -> Val:
        v = Val(kind, site=self._site(node), label=label)
        if not self.final or self.suppress:
            return v
        alive = self.alive()
        if not alive:
            return v
        where = ", ".join(f"`{k}` (line {val.site[1]})" for k, val, _ in alive[:3])
        if self.loop_depth and any(c for _, _, c in alive):
            ck = next(k for k, _, c in alive if c)
            self.finding(
                "models-accumulated",
                node,
                f"{label} loads a model on every iteration while `{ck}` still holds the models of earlier "
                f"iterations ({where}), so they are all resident at once: at the scale this targets that "
                "is an out-of-memory. Fix: load, use and release one model per iteration "
                "(`del model; gc.collect(); torch.cuda.empty_cache()`); keep results, not models.",
            )
        else:
            self.finding(
                "model-load-while-resident",
                node,
                f"{label} loads a model while {where} still {'holds' if len(alive) == 1 else 'hold'} another, so "
                "both are resident at once: at the scale this targets that is an out-of-memory, typically hours "
                "into a run. Fix: release the first (`del model; gc.collect(); torch.cuda.empty_cache()`) before "
                "loading, or keep one base model and switch LoRA adapters in place.",
            )
        return v
