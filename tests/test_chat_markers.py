"""The one chat-marker module: every family is found in the real template text it comes from,
ordinary prose that merely looks similar is not, and the instruction/response filters use
the same list."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.invariants.markers import MARKER_FAMILIES, control_token_ids, find_chat_markers
from cai.pipeline import formats
from cai.pipeline.instructions import holds_marker

# (family, real template text, [(family, marker), ...] expected in order). The texts are the
# formats' own renderings of a short conversation (system / user / assistant turns).
TEMPLATES = {
    "ChatML": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n",
        [("ChatML", "<|im_start|>"), ("ChatML", "<|im_end|>"), ("ChatML", "<|im_start|>"), ("ChatML", "<|im_end|>"),
         ("ChatML", "<|im_start|>")]),
    "Llama 2": (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello [/INST] Hi there </s><s>[INST] Thanks [/INST]",
        [("<s>/</s>", "<s>"), ("Llama 2 / Mistral", "[INST]"), ("Llama 2", "<<SYS>>"), ("Llama 2", "<</SYS>>"),
         ("Llama 2 / Mistral", "[/INST]"), ("<s>/</s>", "</s>"), ("<s>/</s>", "<s>"), ("Llama 2 / Mistral", "[INST]"),
         ("Llama 2 / Mistral", "[/INST]")]),
    "Llama 3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        [("Llama 3", m) for m in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>",
                                  "<|end_header_id|>")]),
    "Mistral": (  # v7 (Mistral-Small-2501) with a tool list; the JSON inside is not a marker
        '<s>[SYSTEM_PROMPT]You are helpful.[/SYSTEM_PROMPT][AVAILABLE_TOOLS][{"type": "function"}][/AVAILABLE_TOOLS]'
        "[INST]Hello[/INST][TOOL_CALLS]</s>",
        [("<s>/</s>", "<s>"), ("Mistral", "[SYSTEM_PROMPT]"), ("Mistral", "[/SYSTEM_PROMPT]"),
         ("Mistral", "[AVAILABLE_TOOLS]"), ("Mistral", "[/AVAILABLE_TOOLS]"), ("Llama 2 / Mistral", "[INST]"),
         ("Llama 2 / Mistral", "[/INST]"), ("Mistral", "[TOOL_CALLS]"), ("<s>/</s>", "</s>")]),
    "Gemma": (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi<end_of_turn>\n",
        [("<bos>/<eos>", "<bos>"), ("Gemma", "<start_of_turn>"), ("Gemma", "<end_of_turn>"),
         ("Gemma", "<start_of_turn>"), ("Gemma", "<end_of_turn>")]),
    "Phi": (  # Phi-3
        "<|system|>\nYou are helpful.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n",
        [("Phi / Zephyr / GLM", "<|system|>"), ("Phi", "<|end|>"), ("Phi / Zephyr / GLM", "<|user|>"),
         ("Phi", "<|end|>"), ("Phi / Zephyr / GLM", "<|assistant|>")]),
    "GLM": (  # GLM-4 with a tool observation
        '[gMASK]<sop><|system|>\nYou are helpful.<|user|>\nWeather?<|assistant|>\nget_weather<|observation|>\n'
        '{"temp": 20}<|assistant|>\nIt is 20 degrees.',
        [("GLM", "[gMASK]"), ("GLM", "<sop>"), ("Phi / Zephyr / GLM", "<|system|>"), ("Phi / Zephyr / GLM", "<|user|>"),
         ("Phi / Zephyr / GLM", "<|assistant|>"), ("GLM", "<|observation|>"), ("Phi / Zephyr / GLM", "<|assistant|>")]),
    "Vicuna": (  # v1.1: one line; its system text says "user" and "assistant" in prose
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT: Hi there.</s>USER: Thanks "
        "ASSISTANT:",
        [("Vicuna", "USER:"), ("Vicuna", "ASSISTANT:"), ("<s>/</s>", "</s>"), ("Vicuna", "USER:"),
         ("Vicuna", "ASSISTANT:")]),
    "Alpaca": (
        "Below is an instruction that describes a task, paired with an input. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Input:\nsky\n\n### Response:\nBlue.",
        [("Alpaca", "### Instruction:"), ("Alpaca", "### Input:"), ("Alpaca", "### Response:")]),
    "Alpaca (Vicuna v0 / Koala)": (
        "A chat between a human and an assistant.\n### Human: Hello\n### Assistant: Hi",
        [("Alpaca", "### Human:"), ("Alpaca", "### Assistant:")]),
    "Human/Assistant turns": (  # Anthropic HH-RLHF
        "\n\nHuman: Hello\n\nAssistant: Hi",
        [("Human/Assistant turns", "Human:"), ("Human/Assistant turns", "Assistant:")]),
    "<s>/</s>": (  # SentencePiece documents (Llama / TinyLlama pretraining text)
        "<s> The quick brown fox.</s>", [("<s>/</s>", "<s>"), ("<s>/</s>", "</s>")]),
    "<bos>/<eos>": (  # Gemma documents
        "<bos>The quick brown fox.<eos>", [("<bos>/<eos>", "<bos>"), ("<bos>/<eos>", "<eos>")]),
    "DeepSeek": (  # fullwidth bars (U+FF5C) and U+2581 in the names
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hello<｜Assistant｜>Hi<｜end▁of▁sentence｜>",
        [("DeepSeek", m) for m in ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")]),
    "Command-R": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are helpful.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        [("Command-R", m) for m in ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                                    "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                                    "<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>")]),
    "special-token syntax": (  # GPT-2 / SmolLM2 end of text, a FIM token
        "Hello<|endoftext|><|fim_prefix|>def f():", [("special-token syntax", "<|endoftext|>"),
                                                      ("special-token syntax", "<|fim_prefix|>")]),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_family_is_found_in_its_real_template_text(name):
    text, expected = TEMPLATES[name]
    found = find_chat_markers(text)
    assert [(f, m) for f, m, _ in found] == expected
    assert all(text[pos:pos + len(m)] == m for _, m, pos in found)  # offsets point at the markers


def test_every_family_has_a_template_test():
    tested = {f for _, expected in TEMPLATES.values() for f, _ in expected}
    assert tested == {f.name for f in MARKER_FAMILIES}


def test_line_start_marker_offset_excludes_indent():
    assert find_chat_markers("hi\n  Assistant: yes") == [("Human/Assistant turns", "Assistant:", 5)]


NEAR_MISSES = [
    "the user: said hello, and the assistant: replied.",  # role words in lower case, mid-line
    "User: admin\nPassword: hunter2",  # a field label, not Vicuna's upper-case USER:
    "### Notes\nSome notes here.",  # markdown heading that is no role header
    "### Instructions:\n1. Preheat the oven.",  # plural: a recipe heading
    "### Response time is 20 ms",  # no colon after the role word
    "## Response\nMarkdown heading without colon",
    "The Assistant: a tool that helps. Assistant said hello.",  # not at a line start
    "TEACHING_ASSISTANT: Jane; SUPERUSER: root; USERS: 3",  # upper-case words that merely end in USER/ASSISTANT
    formats.render("instruction_response", "Describe the seasons."),  # cai's own format
    formats.render_example("instruction_response", "List three primes.", "2, 3 and 5."),
    "Use <b>bold</b>, <strong>x</strong>, <span>y</span>, <sup>2</sup>, a | b | table, x <| y and <3.",
    "Press [Enter], not [INSTALL]; see [1], [inst] and the <<SYSTEM>> block.",
    "Shift: x << 2 >> 1, a<b and b>c, <start_of_turn without its bracket, <|end| unclosed.",
    "Full-width bars in CJK text: 甲｜乙｜丙.",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_ordinary_prose_is_not_a_marker(text):
    assert find_chat_markers(text) == []


# One literal marker of every family (as an output would carry it).
SINGLE_MARKERS = sorted({m for _, expected in TEMPLATES.values() for _, m in expected})
_prose = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789 \n\t.,;:!?'\"()-/|>_=+*%&"), max_size=80)


@settings(max_examples=300, deadline=None)
@given(_prose, st.sampled_from(SINGLE_MARKERS), st.integers(min_value=0))
def test_a_marker_inserted_anywhere_in_prose_is_found_there(prose, marker, where):
    # On its own line, so the line-start families (Human:/Assistant:) qualify too.
    at = where % (len(prose) + 1)
    text = prose[:at] + "\n" + marker + "\n" + prose[at:]
    assert [(m, pos) for _, m, pos in find_chat_markers(text)] == [(marker, at + 1)]


@settings(max_examples=300, deadline=None)
@given(_prose)
def test_lowercase_prose_without_brackets_holds_no_marker(text):
    # every marker starts with "<", "[" or "#", or is an upper-case role word
    assert find_chat_markers(text) == []


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>[]#|｜"), min_size=1, max_size=80))
def test_rendering_never_introduces_markers(instruction):
    # text without marker characters stays marker-free once cai renders it
    instruction = instruction.strip()
    if not instruction or find_chat_markers(instruction):
        return
    try:
        prompt = formats.render("instruction_response", instruction)
    except formats.FormatError:
        return
    assert find_chat_markers(prompt) == []


@pytest.mark.parametrize("name", TEMPLATES)
def test_instruction_and_response_filters_use_the_same_markers(name):
    assert holds_marker(TEMPLATES[name][0])


@pytest.mark.parametrize("text", NEAR_MISSES[:8] + NEAR_MISSES[10:])
def test_filters_pass_prose_but_refuse_the_format_labels(text):
    assert not holds_marker(text)
    assert holds_marker(text + " Response: more")  # would read as a second example


def test_control_token_ids_of_the_embedded_tokenizer(smol_tokenizer):
    ids = control_token_ids(smol_tokenizer)
    # BOS/EOS/PAD/UNK are <|im_start|>/<|im_end|>/<|im_end|>/<|endoftext|>; 14 more added tokens are special
    assert ids[smol_tokenizer.bos_token_id] == smol_tokenizer.bos_token == "<|im_start|>"
    assert ids[smol_tokenizer.eos_token_id] == "<|im_end|>" and ids[0] == "<|endoftext|>"
    assert len(ids) == 17 and "<repo_name>" in ids.values()
    assert list(ids) == sorted(ids)
