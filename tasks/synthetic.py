"""The quickstart's own preference set, in the argilla schema, with a signal a small model can learn.

Chosen answers are correct and direct; rejected ones are wrong and unsure (arithmetic, units,
strings) or evasive. Ties, low scores and GSM8K-flagged rows are mixed in so the recipe's filter has work.
"""
from __future__ import annotations

import random

SYSTEMS = ["", "You are a helpful assistant.", "You are a concise assistant. Answer briefly."]
WORDS = ["apple", "river", "planet", "garden", "silver", "window", "castle", "forest", "marble", "pencil",
         "rocket", "summer", "yellow", "bridge", "candle", "dragon", "island", "jacket", "ladder", "orange"]
UNITS = [("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("feet", "inches", 12)]
TIPS = {
    "sleeping better": "Keep a regular schedule: go to bed and wake up at the same time every day.",
    "saving money": "Set up an automatic transfer to savings on payday, before you can spend it.",
    "learning a language": "Practise a little every day, and speak it aloud from the first week.",
    "staying focused": "Work in 25-minute blocks with your phone in another room.",
    "writing clearly": "Use short sentences and put the main point first.",
    "keeping plants alive": "Check the soil with your finger and water only when the top inch is dry.",
    "running a meeting": "Share an agenda in advance and end with who does what by when.",
    "cooking rice": "Rinse it, use about 1.5 cups of water per cup of rice, and let it rest 10 minutes.",
    "remembering names": "Repeat the name back when you hear it and use it once in conversation.",
    "reducing stress": "Take a ten-minute walk outside and breathe slowly.",
}
HEDGES = ["I think it's {}.", "Probably {}, but I'm not sure.", "Maybe {}? Hard to say.", "It might be {}."]
EVASIONS = [
    "I'm not sure about that. You should look it up somewhere else.",
    "That's a difficult question and I would rather not answer it.",
    "It depends on many things, so I can't really say.",
    "Sorry, I can't help with that.",
]


def _arithmetic(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
    tie = f"The answer is {result}."
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}.", rng.choice(HEDGES).format(wrong), tie


def _units(rng: random.Random) -> tuple[str, str, str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    wrong = n * factor // 10 if factor >= 100 else n * factor + factor
    question = f"How many {small} are in {n} {big}?"
    return (question, f"{n} {big} is {n * factor} {small}.", rng.choice(HEDGES).format(f"{wrong} {small}"),
            f"There are {n * factor} {small}.")


def _strings(rng: random.Random) -> tuple[str, str, str, str]:
    word = rng.choice(WORDS) + rng.choice(["", "s", "ing", "er"])
    if rng.random() < 0.5:
        return (f"Write the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'.",
                f"'{word}' backwards is '{word}'.", f"Reversed: '{word[::-1]}'.")
    return (f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters.",
            rng.choice(HEDGES).format(f"{len(word) + rng.choice([-2, -1, 1, 2])} letters"), f"{len(word)} letters.")


def _advice(rng: random.Random) -> tuple[str, str, str, str]:
    topic, tip = rng.choice(list(TIPS.items()))
    question = rng.choice(["Give me one tip for {}.", "What is a good tip for {}?", "How do I get better at {}?"])
    return question.format(topic), tip, rng.choice(EVASIONS), f"Here is one idea: {tip[0].lower()}{tip[1:]}"


TASKS = [_arithmetic, _units, _strings, _advice]


def generate_preferences(rows: int, seed: int = 0) -> list[dict]:
    """Argilla-schema rows: system, input, chosen, rejected, status, chosen_score, in_gsm8k_train."""
    rng = random.Random(seed)
    out = []
    for index in range(rows):
        make = TASKS[index % len(TASKS)]
        question, chosen, rejected, alternative = make(rng)
        roll = rng.random()
        status = "tie" if roll < 0.08 else "swapped" if roll < 0.2 else "unchanged"
        if status == "tie":  # two acceptable answers: the pair teaches nothing
            rejected = alternative
        score = rng.choice([8.0, 9.0, 9.0, 10.0]) if rng.random() > 0.1 else rng.choice([5.0, 6.0, 7.0])
        out.append({
            "system": rng.choice(SYSTEMS),
            "input": question,
            "chosen": chosen,
            "rejected": rejected,
            "status": status,
            "chosen_score": score,
            "in_gsm8k_train": make is _arithmetic and rng.random() < 0.2,
        })
    return out
