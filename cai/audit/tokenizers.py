"""Tokenizer and formats for `cai.audit.flow`: which values are tokenizers, whether their chat
template is disabled before they are used, how text is encoded (special-tokens-default) and what
renders chat templates (apply-chat-template, chat-messages-input, chat-template-not-disabled /
chat-template-latent)."""

from __future__ import annotations

import ast
import re
from typing import TYPE_CHECKING

from cai.audit.codebase import Codebase
from cai.audit.values import TokOrigin, Val, is_const, key_of, kwarg, looks_like_messages

if TYPE_CHECKING:
    from cai.audit.flow import FlowAnalyzer

ENCODE_METHODS = {"encode", "encode_plus", "batch_encode_plus", "__call__"}
TOK_NAME_RE = re.compile(r"^(tok|toks|tokenizer|tokenizers|tknzr|processing_class)$|_tok$|_tokenizer$|^tokenizer_")
# passing a tokenizer to these is not a use of its template
HARMLESS_FUNCS = {
    "len", "isinstance", "print", "type", "id", "repr", "str", "getattr", "hasattr", "vars",
    "dir", "bool", "callable", "issubclass", "setattr", "delattr", "debug", "info", "warning",
    "error", "exception", "log",
}
NO_SPECIAL_TOKENS_RE = re.compile(r"qwen|(^|/)(distil)?gpt2|pythia|gpt-neox", re.I)


def adds_no_special_tokens(o: TokOrigin) -> bool:
    """Whether the tokenizer's default encoding adds no BOS/EOS, as far as the load shows: a
    checkpoint named literally from a family that adds none (Qwen, GPT-2, Pythia/GPT-NeoX) or
    `add_bos_token=False` (with no `add_eos_token=True`) at the load."""
    if is_const(kwarg(o.node, "add_bos_token"), False) and not is_const(kwarg(o.node, "add_eos_token"), True):
        return True
    name = o.node.args[0] if o.node.args else kwarg(o.node, "pretrained_model_name_or_path")
    if isinstance(name, ast.Name):
        name = o.sf.consts.get(name.id)
    return isinstance(name, ast.Constant) and isinstance(name.value, str) and bool(NO_SPECIAL_TOKENS_RE.search(name.value))


def disables_in(tree, key: str) -> bool:
    """Whether `<key>.chat_template = None` (or the setattr form) appears anywhere in tree."""
    for node in ast.walk(tree) if isinstance(tree, ast.AST) else tree:
        if isinstance(node, ast.Assign) and is_const(node.value, None):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and t.attr == "chat_template" and key_of(t.value) == key:
                    return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 3
            and key_of(node.args[0]) == key
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "chat_template"
            and is_const(node.args[2], None)
        ):
            return True
    return False


def referenced_in_functions(nodes, name: str) -> bool:
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id == name and isinstance(sub.ctx, ast.Load):
                    return True
    return False


def renderer(cb: Codebase) -> tuple | None:
    """(file, line, what) of the first thing in the audited code that renders chat templates:
    apply_chat_template (a call, or lm-eval's `apply_chat_template=True`), vLLM `LLM.chat`, or
    a TRL trainer in a file building conversational ("messages") data."""
    for sf in cb.parsed:
        trl = bool({"SFTTrainer", "DPOTrainer"} & sf.names)
        for n in sf.nodes:
            if isinstance(n, ast.Attribute) and n.attr == "apply_chat_template":
                return (sf, n.lineno, "apply_chat_template()")
            if isinstance(n, ast.keyword) and n.arg == "apply_chat_template" and not is_const(n.value, False):
                return (sf, n.value.lineno, "apply_chat_template=")
            if isinstance(n, ast.Attribute) and n.attr == "chat" and "LLM" in sf.names:
                return (sf, n.lineno, "vLLM LLM.chat()")
            if trl and isinstance(n, ast.Constant) and n.value == "messages":
                return (sf, n.lineno, "a TRL trainer on conversational data")
    return None


def _template_kept(o: TokOrigin) -> str | None:
    """Why the tokenizer loaded at o keeps a template that matters (None: it does not)."""
    if o.unsafe_use is not None:
        path, line, what = o.unsafe_use
        return f"it is {what} at {path}:{line} with the template still set"
    if o.returned_by and o.consumers == 0:
        return f"{o.returned_by}() returns it with the template still set and no caller in the audited code disables it"
    for sf, cls, attr in o.attr_escapes:
        if not disables_in(cls, f"self.{attr}"):
            return f"it is kept as self.{attr} and {cls.name} never sets self.{attr}.chat_template = None"
    for sf, name in o.global_escapes:
        if not disables_in(sf.nodes, name) and referenced_in_functions(sf.nodes, name):
            return f"the module-level `{name}` is used by functions of the module and never has its template disabled"
    return None


def template_findings(A: FlowAnalyzer) -> None:
    """Reports each tokenizer load whose template is kept: an error where the codebase renders
    templates somewhere, the latent warning where nothing does."""
    found = None  # the renderer, looked up on the first report
    for o in A.origins.values():
        if o.sf.is_test:
            continue
        reason = _template_kept(o)
        if not reason:
            continue
        fix = (
            "Fix: set `tokenizer.chat_template = None` right after loading (or pass chat_template=None, or "
            "load through one project loader that does)."
        )
        if found is None:
            found = (renderer(A.cb),)
        if found[0] is None:
            A.add(
                "chat-template-latent",
                o.sf,
                o.node,
                f"{o.how} loads a tokenizer and leaves the checkpoint's chat template set: {reason}. Nothing in "
                "the audited code renders templates (apply_chat_template, a TRL trainer on conversational data, "
                "lm-eval's apply_chat_template, vLLM's LLM.chat) and `tokenizer(text)` itself never applies one, "
                "so the hazard is latent: the first such call added later silently wraps a base model's prompts. "
                + fix,
            )
            continue
        rsf, rline, what = found[0]
        A.add(
            "chat-template-not-disabled",
            o.sf,
            o.node,
            f"{o.how} loads a tokenizer and keeps the checkpoint's chat template: {reason}, and {what} "
            f"({rsf.rel}:{rline}) renders chat templates in this codebase. A base model prompted or trained "
            "through a chat template is no longer a base model, so base-vs-trained comparisons are void. " + fix,
        )


class TokenizerChecks:
    """Mixed into `cai.audit.flow.Scope`: tokenizer values, their templates and encodings."""

    def tokish(self, v, k: str | None) -> bool:
        if isinstance(v, Val):
            if v.kind == "tok":
                return True
            if v.kind == "param":
                return bool(TOK_NAME_RE.search(v.name))
            return False
        # by name only for values this scope did not bind (parameters, attributes, globals):
        # `tokenizer = tiktoken.get_encoding(...)` is not a transformers tokenizer
        return bool(k and k not in self.opaque and TOK_NAME_RE.search(k.split(".")[-1]))

    def tok_load(self, node: ast.Call, fk: str | None) -> Val:
        o = self.A.origin(self.sf, node, f"`{fk}(...)`")
        disabled = node.keywords and is_const(kwarg(node, "chat_template"), None)
        return Val("tok", site=self._site(node), origin=o, disabled=bool(disabled), label=fk or "")

    def tok_method(self, recv: Val, meth: str, node: ast.Call, f: ast.Attribute) -> None:
        # save_pretrained / push_to_hub are not uses: a faithful copy of a checkpoint (a conversion cache)
        # keeps its template on disk; what matters is that no prompt is rendered or encoded through it.
        if meth == "apply_chat_template":
            self.apply_ct(node, recv)
        elif meth in ENCODE_METHODS:
            self.encode(node, f"{key_of(f.value) or 'tokenizer'}.{meth}")
            self.use(recv, node, f"used by .{meth}()")

    def disable(self, k: str | None) -> None:
        if k and k.startswith("self."):
            self.attr_disables.add(k)
        v = self.env.get(k) if k else None
        if isinstance(v, Val):
            v.disabled = True
            if v.kind == "param":
                self.disables.add(v.name)

    def use(self, v, node, what: str) -> None:
        if self.suppress or not isinstance(v, Val):
            return
        if v.kind == "param":
            self.param_uses.add(v.name)
            return
        if not self.final:
            return
        if v.kind == "tok" and not v.disabled and v.origin is not None and v.origin.unsafe_use is None:
            v.origin.unsafe_use = (self.sf.rel, node.lineno, what)

    def encode(self, node: ast.Call, desc: str, tok=None) -> None:
        if not node.args and not any(kw.arg in ("text", "text_pair", "text_target") for kw in node.keywords):
            return
        names = {kw.arg for kw in node.keywords}
        val = kwarg(node, "add_special_tokens")
        if val is None and None in names:
            return  # **kwargs may carry it
        if val is not None:
            return  # passed explicitly (False, True as a deliberate choice, or decided elsewhere)
        if isinstance(tok, Val) and tok.origin is not None and adds_no_special_tokens(tok.origin):
            return  # the default adds nothing for this tokenizer
        self.finding(
            "special-tokens-default",
            node,
            f"`{desc}(...)` encodes text with the tokenizer's default add_special_tokens=True, which prepends "
            "BOS (and may append EOS) that the prompt format does not declare, so training and evaluation see "
            "different token sequences. Fix: pass add_special_tokens=False (or encode through one helper that does) "
            "and add only the special tokens the format declares.",
        )

    def apply_ct(self, node: ast.Call, v) -> None:
        if isinstance(v, Val) and v.kind == "tok" and v.disabled and kwarg(node, "chat_template") is None:
            return  # raises on a disabled tokenizer: no template can leak
        self.use(v, node, "used by apply_chat_template()")
        self.finding(
            "apply-chat-template",
            node,
            "apply_chat_template() wraps the prompt in the checkpoint's chat template; a base model never saw "
            "that format, so its scores (and any base-vs-trained comparison) are void. Fix: render prompts "
            "with the project's own format function, shared by training and evaluation, and encode with "
            "add_special_tokens=False.",
        )

    def check_messages(self, node: ast.Call, args: list, what: str) -> None:
        first = node.args[0] if node.args else kwarg(node, "text_inputs")
        val = args[0] if args else None
        if (first is not None and looks_like_messages(first)) or (isinstance(val, Val) and val.kind == "messages"):
            self.finding(
                "chat-messages-input",
                node,
                f"{what} called with {{role, content}} messages applies the tokenizer's chat template; a base "
                "model must get the raw prompt string in the project's format. Fix: render the prompt with "
                "the shared format function and pass the string.",
            )

    def vllm_chat(self, node: ast.Call) -> None:
        self.finding(
            "chat-messages-input",
            node,
            "vLLM's LLM.chat() renders the tokenizer's chat template around the messages; a base model "
            "must get raw prompts in the project's format. Fix: render the prompt with the shared format "
            "function and call LLM.generate() on the string.",
        )
