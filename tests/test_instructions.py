"""The rule checker of verifiable instructions: planted answers that follow each kind and answers that
do not, prompts without an instruction, and the generated set's labels agreeing with it."""
from __future__ import annotations

import pytest

from tasks.instructions import KINDS, kinds_of, parse, verify
from tasks.synthetic import GENERATORS, generate_instruction_preferences

Q = "What is the capital of France?"

CASES = [  # (instruction, an answer that follows it, answers that do not)
    ("Answer in at most 5 words.", "The capital is Paris.",
     ["The capital of France is Paris, a large city.", ""]),
    ("Answer in at most 12 words.", "The capital of France is Paris, a large city.",
     ["The capital of France is Paris, a large city on the river Seine in the north."]),
    ("Write your whole answer in lowercase letters, with no capital letters at all.", "the capital is paris.",
     ["The capital is paris.", "the capital is Paris.", "42."]),
    ("Wrap your entire answer in double quotation marks.", '"The capital is Paris."',
     ["The capital is Paris.", '"The capital is Paris.', 'The "capital" is Paris.', '""']),
    ('Start your answer with the word "Sure".', "Sure, the capital is Paris.",
     ["The capital is Paris, sure.", "Surely the capital is Paris."]),
    ('End your answer with the exact phrase "I hope this helps."', "The capital is Paris. I hope this helps.",
     ["I hope this helps. The capital is Paris.", "The capital is Paris. I hope this helps you."]),
]


@pytest.mark.parametrize("instruction, follows, breaks", CASES, ids=[c[0][:24] for c in CASES])
def test_each_kind_passes_what_follows_it_and_fails_what_does_not(instruction, follows, breaks):
    prompt = f"{Q} {instruction}"
    assert len(parse(prompt)) == 1
    assert verify(prompt, follows) is True
    for answer in breaks:
        assert verify(prompt, answer) is False, answer


def test_every_kind_is_covered_by_a_planted_case():
    assert {kinds_of(f"{Q} {instruction}")[0] for instruction, _, _ in CASES} == set(KINDS)


def test_values_are_read_from_the_prompt():
    assert verify(f"{Q} Answer in at most 3 words.", "Paris, in France.") is True
    assert verify(f"{Q} Answer in at most 2 words.", "Paris, in France.") is False
    assert verify(f'{Q} Start your answer with the word "Well".', "Well, Paris.") is True
    assert verify(f'{Q} Start your answer with the word "Okay".', "Well, Paris.") is False
    assert verify(f'{Q} End your answer with the exact phrase "Any questions?"', "Paris. any questions?") is True


def test_a_prompt_without_an_instruction_is_none():
    assert verify(Q, "Paris.") is None
    assert verify("Tell me about words and quotation marks, in at most a few lines.", "Sure.") is None
    assert parse("") == []


def test_the_system_prompt_and_the_chat_template_around_the_user_turn_change_nothing():
    rendered = ("<|im_start|>system\nYou are a concise assistant. Answer briefly.<|im_end|>\n"
                f"<|im_start|>user\n{Q} Wrap your entire answer  in double\nquotation marks.<|im_end|>\n")
    assert kinds_of(rendered) == ["quotes"]
    assert verify(rendered, '"Paris."') is True and verify(rendered, "Paris.") is False


def test_two_instructions_must_both_hold():
    prompt = f"{Q} Answer in at most 4 words. Write your whole answer in lowercase letters, with no capital letters at all."
    assert kinds_of(prompt) == ["max_words", "lowercase"]
    assert verify(prompt, "paris, in france.") is True
    assert verify(prompt, "Paris, in France.") is False and verify(prompt, "it is paris in france.") is False


def test_generated_pairs_are_labelled_by_the_checker():
    rows = generate_instruction_preferences(240, seed=7)
    assert GENERATORS["synthetic:instructions"] is generate_instruction_preferences
    assert {kinds_of(row["input"])[0] for row in rows} == set(KINDS)
    for row in rows:
        assert verify(row["input"], row["chosen"]) is True
        assert verify(row["input"], row["rejected"]) is (True if row["status"] == "tie" else False)
    assert generate_instruction_preferences(60, seed=7) == rows[:60]  # seeded: the same rows every time
