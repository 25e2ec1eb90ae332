"""Chat and control markers: the one place that knows what chat formatting looks like, as
text (`find_chat_markers`, used by the leakage invariants and by the instruction and
response filters) and as token ids (`control_token_ids`, used by every id-level check).

A text marker is the literal form a chat template writes around turns. The families, with
the real template text each is taken from, are below. Decisions on the ambiguous ones:

- `[INST]`/`[/INST]` are shared by Llama 2 and Mistral and reported as "Llama 2 / Mistral";
  `<<SYS>>` is Llama 2 only, `[SYSTEM_PROMPT]`/`[AVAILABLE_TOOLS]`/... Mistral (v3+) only.
- `<|system|>`/`<|user|>`/`<|assistant|>` are shared by Phi-3, Zephyr and GLM-4 and reported
  as "Phi / Zephyr / GLM"; `<|end|>` is Phi's, `[gMASK]`/`<sop>`/`<|observation|>` GLM's.
- Role words count only in a template's own form, case-sensitive: Vicuna's upper-case
  `USER:`/`ASSISTANT:` at a line start or after whitespace or `>` (v1.1 writes
  "... USER: hi ASSISTANT: hello</s>USER: ..." on one line); the Anthropic HH
  `Human:`/`Assistant:` at a line start; Alpaca's `### Instruction:` (`Input`, `Response`,
  `Assistant`, `Human`, `System`, `User`) header with its colon. So "the user: said",
  "User: admin", "### Notes", "### Instructions:" and a markdown "## Response" heading are
  ordinary prose, and so is cai's own "Instruction: x\\nResponse:".
- `<s>`/`</s>` (SentencePiece BOS/EOS) and `<bos>`/`<eos>` (Gemma) count in text: an HTML
  strike-through `<s>` is flagged too, a price worth paying in model outputs.
- Any other `<|name|>` (`<|endoftext|>`, `<|fim_prefix|>`, ...) is "special-token syntax".
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MarkerFamily:
    name: str
    pattern: str  # regex, matched case-sensitively, MULTILINE (^ is a line start)


MARKER_FAMILIES: tuple[MarkerFamily, ...] = (
    # "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" (Qwen, SmolLM2; <|im_sep|>: Phi-4)
    MarkerFamily("ChatML", r"<\|im_(?:start|end|sep)\|>"),
    # "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    MarkerFamily("Llama 3", r"<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id|python_tag)\|>"),
    # "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s>"
    MarkerFamily("Llama 2 / Mistral", r"\[/?INST\]"),
    MarkerFamily("Llama 2", r"<</?SYS>>"),
    # "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS][INST]Hi[/INST]"
    MarkerFamily("Mistral", r"\[/?(?:SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_RESULTS)\]|\[TOOL_CALLS\]"),
    # "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    MarkerFamily("Gemma", r"<(?:start|end)_of_turn>"),
    # Phi-3 "<|user|>\nHi<|end|>\n<|assistant|>\n"; Zephyr "<|user|>\nHi</s>"; GLM-4 "<|user|>\nHi<|assistant|>"
    MarkerFamily("Phi / Zephyr / GLM", r"<\|(?:system|user|assistant)\|>"),
    MarkerFamily("Phi", r"<\|end\|>"),
    # "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello<|observation|>"
    MarkerFamily("GLM", r"\[[gs]MASK\]|<[se]op>|<\|observation\|>"),
    # "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>" (fullwidth bars)
    MarkerFamily("DeepSeek", r"<｜[^｜\n]{1,40}｜>"),
    # "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    MarkerFamily("Command-R", r"<\|(?:START_OF_TURN|END_OF_TURN|USER|CHATBOT|SYSTEM)_TOKEN\|>|<BOS_TOKEN>"),
    # "Below is an instruction ...\n\n### Instruction:\nHi\n\n### Response:\n"; Vicuna v0 "### Human: Hi\n### Assistant:"
    MarkerFamily("Alpaca", r"###[ \t]*(?:Instruction|Input|Response|Assistant|Human|System|User)[ \t]*:"),
    # "A chat between a curious user and ... USER: Hi ASSISTANT: Hello</s>USER: ..."
    MarkerFamily("Vicuna", r"(?<![^\s>])(?:USER|ASSISTANT):"),
    # "\n\nHuman: Hi\n\nAssistant: Hello" (Anthropic HH)
    MarkerFamily("Human/Assistant turns", r"^[ \t]*(?:Human|Assistant)[ \t]*:"),
    MarkerFamily("<s>/</s>", r"</?s>"),
    MarkerFamily("<bos>/<eos>", r"<[be]os>"),
    MarkerFamily("special-token syntax", r"<\|[A-Za-z0-9_▁]{1,40}\|>"),  # last: the specific families win
)

_MARKER_RE = re.compile("|".join(f"(?P<g{i}>{f.pattern})" for i, f in enumerate(MARKER_FAMILIES)), re.MULTILINE)


def find_chat_markers(text: str) -> list[tuple[str, str, int]]:
    """(family, marker, offset) for every chat marker in `text`, in order; offset is where
    the marker itself starts (leading blanks of a line-start marker excluded)."""
    found = []
    for m in _MARKER_RE.finditer(text):
        raw = m.group(0)
        marker = raw.strip()
        found.append((MARKER_FAMILIES[int(m.lastgroup[1:])].name, marker, m.start() + raw.index(marker)))
    return found


def control_token_ids(tokenizer) -> dict[int, str]:
    """{id: token} for every special/control id of a (Hugging Face) tokenizer: BOS/EOS/PAD/UNK
    and the other `all_special_ids`, plus every added token marked special - SmolLM2 has 17
    of those (`<|im_start|>`, `<repo_name>`, ...), only 3 of them in `all_special_ids`."""
    ids = {int(i): tokenizer.convert_ids_to_tokens(int(i)) for i in tokenizer.all_special_ids}
    ids.update({int(i): tok.content for i, tok in tokenizer.added_tokens_decoder.items() if tok.special})
    return dict(sorted(ids.items()))
