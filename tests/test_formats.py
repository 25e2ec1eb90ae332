"""formats.py is the only prompt builder: render/parse must be exact inverses, and
renders must be unambiguous (no format boundary inside an instruction)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cai.pipeline import formats
from cai.pipeline.formats import FormatError

instructions = st.text(min_size=1, max_size=200).map(str.strip).filter(
    lambda s: s and "\nInstruction:" not in s)


def test_training_format_is_the_documented_string():
    assert formats.render("instruction_response", "Name a color.") == "Instruction: Name a color.\nResponse:"


@given(instructions, st.sampled_from(sorted(formats.FORMATS)))
def test_parse_inverts_render(instruction, name):
    assert formats.parse(name, formats.render(name, instruction)) == instruction


@given(instructions)
def test_render_example_is_prompt_plus_spaced_completion(instruction):
    prompt = formats.render("instruction_response", instruction)
    example = formats.render_example("instruction_response", instruction, "  Blue.  ")
    assert example == prompt + formats.COMPLETION_PREFIX + "Blue."


@pytest.mark.parametrize("bad", ["", "   ", " padded", "two\nInstruction: blocks"])
def test_ambiguous_instructions_are_refused(bad):
    with pytest.raises(FormatError):
        formats.render("instruction_response", bad)


def test_unknown_format_names_the_known_ones():
    with pytest.raises(FormatError, match="instruction_response"):
        formats.render("chatml", "x")


def test_parse_rejects_prompt_in_another_format():
    with pytest.raises(FormatError):
        formats.parse("instruction_response", "Name a color.")


def test_fewshot_prompt_ends_with_the_canonical_prompt():
    shots = [("Name a fruit.", "Apple."), ("Name a tree.", "Oak.")]
    prompt = formats.render_fewshot("instruction_response", shots, "Name a bird.")
    assert prompt.endswith(formats.EXAMPLE_SEPARATOR + formats.render("instruction_response", "Name a bird."))
    assert prompt.count("Instruction: ") == 3


def test_instruction_list_prompt_ends_at_the_next_number():
    prompt = formats.render_instruction_list(["Say hi.", "Count to three."])
    assert prompt.endswith("1. Say hi.\n2. Count to three.\n3.")


def test_critic_prompts_end_at_the_answer_cue():
    assert formats.render_critic_instruction("a", "b").endswith(formats.CRITIC_ANSWER_CUE)
    assert formats.render_critic_response("q", "a", "b").endswith(formats.CRITIC_ANSWER_CUE)
