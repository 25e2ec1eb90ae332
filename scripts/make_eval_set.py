"""Write cai/data/eval/stage1_eval.jsonl: cai's hand-written Stage-1 evaluation set.

Every prompt below was written by hand for cai from short templates and topic lists; no
model and no external data set is involved, and the output is deterministic (no
randomness), so rerunning this script reproduces the committed file byte for byte:

    python scripts/make_eval_set.py            # rewrite the file
    python scripts/make_eval_set.py --check    # exit 1 if the committed file differs

Schema (IFEval): key, prompt, instruction_id_list, kwargs, plus instruction (the bare
instruction text, equal to prompt) and source. Only instruction ids from lm-eval's IFEval
registry are used, with every checker argument given explicitly (a missing one would be
drawn at random by the checker). Tasks are short, so a small model can attempt them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "cai" / "data" / "eval" / "stage1_eval.jsonl"
SOURCE = "cai-handwritten-stage1-v1"

ITEMS: list[tuple[str, list[str], list[dict]]] = []  # (prompt, ids, kwargs)


def add(prompt: str, ids: list[str] | str, kwargs: list[dict] | dict | None = None) -> None:
    ids = [ids] if isinstance(ids, str) else ids
    if kwargs is None:
        kwargs = [{} for _ in ids]
    kwargs = [kwargs] if isinstance(kwargs, dict) else kwargs
    ITEMS.append((prompt, ids, kwargs))


# --- change_case:english_lowercase
for topic in ["rain", "the sea", "cats", "fresh bread", "autumn leaves", "a quiet library",
              "trains", "the moon", "a vegetable garden", "morning coffee"]:
    add(f"Write one sentence about {topic} in all lowercase letters. No capital letters are allowed.",
        "change_case:english_lowercase")

# --- change_case:english_capital
for topic in ["a thunderstorm", "a football match", "a birthday party", "a fire drill", "the ocean",
              "a big sale at a shop", "a rocket launch", "winter", "a lost dog"]:
    add(f"Write two short sentences about {topic} in English, using only capital letters.",
        "change_case:english_capital")

# --- punctuation:no_comma
for topic in ["your favourite meal", "a walk in the park", "how to make tea", "the city at night",
              "a rainy afternoon", "learning to swim", "a visit to the zoo", "the first day of spring",
              "a busy kitchen", "mountains"]:
    add(f"Describe {topic} in two or three sentences. Do not use any commas.", "punctuation:no_comma")

# --- detectable_format:number_bullet_lists
for n, things in [(3, "fruits"), (2, "colors of the sky at sunset"), (4, "farm animals"),
                  (3, "things to pack for a beach trip"), (5, "vegetables"), (3, "musical instruments"),
                  (2, "ways to save water"), (4, "planets in the solar system"), (3, "kinds of trees"),
                  (5, "things found in a kitchen")]:
    add(f"List exactly {n} {things} as bullet points using markdown '* '. Write nothing else.",
        "detectable_format:number_bullet_lists", {"num_bullets": n})

# --- length_constraints:number_words (less than / at least)
for n, q in [(20, "Why is the sky blue?"), (15, "What is a noun?"), (20, "What do bees make?"),
             (25, "How do plants get water?"), (10, "What is the capital of France?"),
             (30, "Why do people sleep?")]:
    add(f"Answer in fewer than {n} words: {q}", "length_constraints:number_words",
        {"num_words": n, "relation": "less than"})
for n, topic in [(40, "your favourite season"), (50, "why reading is useful"), (30, "a day at the beach"),
                 (60, "how to look after a houseplant"), (40, "the history of bicycles")]:
    add(f"Write at least {n} words about {topic}.", "length_constraints:number_words",
        {"num_words": n, "relation": "at least"})

# --- length_constraints:number_sentences
for n, topic in [(3, "how a rainbow forms"), (2, "what a library is"), (4, "how to brush your teeth"),
                 (3, "why the moon changes shape")]:
    add(f"Explain {topic} in fewer than {n} sentences.", "length_constraints:number_sentences",
        {"num_sentences": n, "relation": "less than"})
for n, topic in [(3, "a dog you would like to own"), (4, "your ideal weekend"), (5, "a famous invention"),
                 (3, "the water cycle"), (4, "a city you would like to visit"), (3, "why exercise matters")]:
    add(f"Write at least {n} sentences about {topic}.", "length_constraints:number_sentences",
        {"num_sentences": n, "relation": "at least"})

# --- keywords:existence
for topic, words in [("the beach", ["sand", "waves"]), ("a school day", ["teacher", "lunch"]),
                     ("a forest", ["owl", "moss"]), ("cooking dinner", ["onion", "pan"]),
                     ("a football game", ["goal", "crowd"]), ("the night sky", ["stars", "quiet"]),
                     ("a train journey", ["window", "ticket"]), ("a picnic", ["basket", "sunshine"]),
                     ("a rainy day", ["umbrella", "puddle"])]:
    add(f'Write a short paragraph about {topic} that includes the words "{words[0]}" and "{words[1]}".',
        "keywords:existence", {"keywords": words})

# --- keywords:forbidden_words
for topic, words in [("the sun", ["hot", "bright"]), ("a cat", ["fur", "meow"]), ("winter", ["cold", "snow"]),
                     ("a car", ["wheels", "drive"]), ("the ocean", ["water", "blue"]),
                     ("a birthday", ["cake", "gift"]), ("a library", ["books", "read"]),
                     ("music", ["song", "sound"]), ("a garden", ["flowers", "green"])]:
    add(f'Describe {topic} in two sentences without using the words "{words[0]}" or "{words[1]}".',
        "keywords:forbidden_words", {"forbidden_words": words})

# --- keywords:frequency
for topic, kw, n in [("apples", "apple", 3), ("the rain", "rain", 2), ("your home town", "town", 3),
                     ("a good friend", "friend", 2), ("the moon", "moon", 3), ("coffee", "coffee", 2),
                     ("a river", "river", 3), ("summer", "summer", 2)]:
    add(f'Write a few sentences about {topic}. Use the word "{kw}" at least {n} times.',
        "keywords:frequency", {"keyword": kw, "frequency": n, "relation": "at least"})

# --- startend:end_checker
for topic, phrase in [("your weekend plans", "Is there anything else I can help with?"),
                      ("a new recipe you tried", "Enjoy your meal."), ("a trip to the mountains", "See you soon."),
                      ("learning a new language", "Thank you for reading."),
                      ("a favourite book", "That is all."), ("a football match", "Any other questions?"),
                      ("the weather today", "Have a nice day."), ("a small garden", "Happy gardening."),
                      ("a visit to a museum", "The end.")]:
    add(f'Write a short note about {topic}. End your response with the exact phrase "{phrase}" '
        "and nothing after it.", "startend:end_checker", {"end_phrase": phrase})

# --- startend:quotation
for topic in ["friendship", "the ocean", "a busy market", "a snowy morning", "a cup of tea",
              "a mountain lake", "the first day of school", "a lighthouse", "the stars"]:
    add(f"Write one sentence about {topic} and wrap your entire response in double quotation marks.",
        "startend:quotation")

# --- detectable_format:title
for topic in ["the wind", "a small boat", "an old tree", "a city park", "the rain", "a red kite",
              "a sleeping cat", "the morning sun", "a winding river"]:
    add(f"Write a four-line poem about {topic}. Give it a title wrapped in double angular brackets, "
        "such as <<title>>.", "detectable_format:title")

# --- detectable_content:postscript
for topic in ["a holiday you enjoyed", "a new puppy", "a concert you went to", "moving to a new house",
              "a school play", "a camping trip", "your new job", "a family dinner", "a bike ride"]:
    add(f"Write a short message to a friend about {topic}. At the end, add a postscript starting with P.S.",
        "detectable_content:postscript", {"postscript_marker": "P.S."})

# --- detectable_format:json_format
for thing in ["a banana", "a fire truck", "grass", "a lemon", "the night sky", "a strawberry",
              "snow", "a carrot", "an orange"]:
    add(f'Give the name and the usual color of {thing} as a JSON object with the keys "name" and '
        '"color". Output only the JSON.', "detectable_format:json_format")

# --- detectable_format:constrained_response
for q in ["Is water wet?", "Can penguins fly?", "Is the sun a star?", "Do fish live in water?",
          "Is ice colder than steam?", "Can a cat bark?", "Is a tomato a fruit?", "Will it rain tomorrow?",
          "Is the moon made of cheese?"]:
    add(f'{q} Answer with one of the following options: "My answer is yes.", "My answer is no.", '
        '"My answer is maybe."', "detectable_format:constrained_response")

# --- detectable_format:number_highlighted_sections
for n, topic in [(2, "healthy breakfasts"), (1, "why sleep matters"), (3, "tips for studying"),
                 (2, "a trip to the seaside"), (2, "caring for a pet fish"), (1, "the best time to plant seeds"),
                 (3, "how to stay safe on a bike"), (2, "making a sandwich")]:
    add(f"Write a short text about {topic}. Highlight at least {n} "
        f"{'part' if n == 1 else 'parts'} with markdown, for example *highlighted section*.",
        "detectable_format:number_highlighted_sections", {"num_highlights": n})

# --- length_constraints:number_paragraphs
for n, topic in [(2, "dogs and cats"), (3, "the four seasons"), (2, "the sea"), (3, "a good breakfast"),
                 (2, "trains and buses"), (2, "day and night"), (3, "a school trip"), (2, "tea and coffee")]:
    add(f"Write {n} short paragraphs about {topic}. Separate the paragraphs with the markdown divider ***",
        "length_constraints:number_paragraphs", {"num_paragraphs": n})

# --- detectable_content:number_placeholders
for n, what in [(2, "a party invitation"), (3, "a thank-you note"), (2, "a lost-and-found notice"),
                (3, "a meeting reminder"), (2, "a birthday card"), (1, "a welcome message"),
                (2, "a delivery note"), (3, "an order confirmation")]:
    add(f"Write {what} as a template with at least {n} "
        f"{'placeholder' if n == 1 else 'placeholders'} in square brackets, such as [name].",
        "detectable_content:number_placeholders", {"num_placeholders": n})

# --- combination:repeat_prompt
for request in ["Name a color that you like.", "What is two plus two?", "Name an animal that can swim.",
                "Say something kind about the weather.", "What do you drink in the morning?",
                "Name a fruit that is yellow.", "What day comes after Monday?", "Name a musical instrument."]:
    add(f"{request}\nFirst repeat the request word for word without change, then give your answer "
        "(do not say anything before repeating the request; the request you need to repeat does not "
        "include this sentence)", "combination:repeat_prompt", {"prompt_to_repeat": request})

# --- two instructions at once
for topic in ["a summer evening", "a small village", "the smell of rain", "a quiet beach"]:
    add(f"Write two sentences about {topic} in all lowercase letters and without any commas.",
        ["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}])
for n, things in [(3, "sports"), (3, "breakfast foods"), (4, "school subjects")]:
    add(f"List exactly {n} {things} as bullet points using markdown '* '. Do not use any commas.",
        ["detectable_format:number_bullet_lists", "punctuation:no_comma"], [{"num_bullets": n}, {}])
for topic in ["the river", "a rainy morning", "the old bridge"]:
    add(f"Write one sentence about {topic} in fewer than 15 words and wrap it in double quotation marks.",
        ["length_constraints:number_words", "startend:quotation"],
        [{"num_words": 15, "relation": "less than"}, {}])


def records() -> list[dict]:
    out = []
    for i, (prompt, ids, kwargs) in enumerate(ITEMS, start=1):
        out.append({
            "key": i,
            "prompt": prompt,
            "instruction_id_list": ids,
            "kwargs": kwargs,
            "instruction": prompt,
            "source": SOURCE,
        })
    return out


def render() -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = ap.parse_args()
    text = render()
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT} differs from the generator's output")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    counts = Counter(i for _, ids, _ in ITEMS for i in ids)
    print(f"wrote {len(ITEMS)} items, {sum(counts.values())} instructions, {len(counts)} ids to {OUT}")
    for iid, c in sorted(counts.items()):
        print(f"  {iid}: {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
