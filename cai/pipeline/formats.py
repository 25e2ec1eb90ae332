"""The only place prompt strings are built.

Training data stores the format *name* and the rendered prompt; evaluation renders
through the same `render`, so train and eval prompts cannot drift apart (the audit's
second finding: training used "Instruction: {x}\\nResponse:" while evaluation fed raw
instructions). Few-shot generation and critic prompts live here too, so no stage
builds a prompt string of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# A completion is appended to the rendered prompt with one separating space:
# "Instruction: x\nResponse:" + " " + answer. Stored completions carry the space.
COMPLETION_PREFIX = " "
# Generation stops at the start of the next example block.
EXAMPLE_SEPARATOR = "\n\n"


class FormatError(ValueError):
    """An instruction that cannot be rendered unambiguously, or a prompt that does not parse."""


@dataclass(frozen=True)
class PromptFormat:
    name: str
    prefix: str
    suffix: str
    purpose: str  # "train" formats may train and evaluate; "probe" formats only evaluate, labelled
    stop: tuple[str, ...] = ()

    def render(self, instruction: str) -> str:
        _check_instruction(instruction, self)
        return f"{self.prefix}{instruction}{self.suffix}"

    def parse(self, prompt: str) -> str:
        if not (prompt.startswith(self.prefix) and prompt.endswith(self.suffix)) or len(prompt) < len(self.prefix) + len(self.suffix):
            raise FormatError(f"prompt does not match format {self.name!r}: {prompt[:80]!r}")
        return prompt[len(self.prefix): len(prompt) - len(self.suffix)]


FORMATS: dict[str, PromptFormat] = {
    f.name: f
    for f in (
        PromptFormat(
            name="instruction_response",
            prefix="Instruction: ",
            suffix="\nResponse:",
            purpose="train",
            stop=("\nInstruction:", EXAMPLE_SEPARATOR + "Instruction:"),
        ),
        PromptFormat(name="raw", prefix="", suffix="", purpose="probe"),
    )
}


def get_format(name: str) -> PromptFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown prompt format {name!r}; known: {sorted(FORMATS)}") from None


def render(format_name: str, instruction: str) -> str:
    """The canonical prompt for `instruction` in the named format."""
    return get_format(format_name).render(instruction)


def parse(format_name: str, prompt: str) -> str:
    """Inverse of `render`: parse(f, render(f, x)) == x."""
    return get_format(format_name).parse(prompt)


def stop_sequences(format_name: str) -> tuple[str, ...]:
    return get_format(format_name).stop


def _check_instruction(instruction: str, fmt: PromptFormat) -> None:
    if not isinstance(instruction, str) or not instruction.strip():
        raise FormatError(f"empty instruction cannot be rendered in format {fmt.name!r}")
    if instruction != instruction.strip():
        raise FormatError(f"instruction has leading/trailing whitespace (format {fmt.name!r}): {instruction[:60]!r}")
    for marker in fmt.stop:
        if marker in instruction:
            raise FormatError(f"instruction contains the format's boundary {marker!r}: {instruction[:60]!r}")


def render_example(format_name: str, instruction: str, response: str) -> str:
    """One solved example: prompt + completion, as the model sees it in training."""
    return render(format_name, instruction) + COMPLETION_PREFIX + response.strip()


def render_fewshot(format_name: str, examples: Sequence[tuple[str, str]], instruction: str) -> str:
    """Few-shot completion prompt (URIAL-style): solved examples, then the new prompt.

    Used for response generation and for the few-shot baseline suite. The context is
    scaffolding: the stored training prompt is `render(format_name, instruction)` alone.
    """
    blocks = [render_example(format_name, i, r) for i, r in examples]
    blocks.append(render(format_name, instruction))
    return EXAMPLE_SEPARATOR.join(blocks)


INSTRUCTION_LIST_HEADER = (
    "Below is a numbered list of diverse tasks a person asked a helpful assistant to do. "
    "Each task is one self-contained request, and many say exactly how the answer must look "
    "(a number of items, a word limit, a format, a keyword, lowercase or capital letters).\n\n"
)


def render_instruction_list(seeds: Sequence[str]) -> str:
    """Few-shot completion prompt for instruction generation: a numbered list the base
    model continues. The prompt ends with the next number so the continuation is a new item."""
    lines = [f"{i}. {s.strip()}" for i, s in enumerate(seeds, start=1)]
    return INSTRUCTION_LIST_HEADER + "\n".join(lines) + f"\n{len(seeds) + 1}."


CRITIC_ANSWER_CUE = "Answer: ("


def render_critic_instruction(option_a: str, option_b: str) -> str:
    """A/B instruction-quality judgement; the next token is 'A' or 'B' (ids scored directly)."""
    return (
        "Which of these two requests is clearer, more specific and answerable by a helpful assistant?\n\n"
        f"(A) {option_a}\n\n(B) {option_b}\n\n{CRITIC_ANSWER_CUE}"
    )


def render_critic_response(instruction: str, response_a: str, response_b: str) -> str:
    """A/B response-quality judgement for one instruction; the next token is 'A' or 'B'."""
    return (
        f"Request: {instruction}\n\n"
        "Which response follows the request better: correct, complete, and in exactly the asked form?\n\n"
        f"(A) {response_a}\n\n(B) {response_b}\n\n{CRITIC_ANSWER_CUE}"
    )
