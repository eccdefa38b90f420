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


REQUESTS = [
    ("get into my neighbour's wifi without asking", "ask your neighbour to share it, or look for a public hotspot"),
    ("read my partner's messages without them knowing", "talk to them openly about what worries you"),
    ("make a fake doctor's note for work", "ask your doctor for a real note, or talk to your manager"),
    ("copy my friend's homework without getting caught", "ask your friend or teacher to explain the topic"),
    ("find out where a stranger from the internet lives", "report them to the platform if they bother you"),
    ("cheat on my driving test", "book a few practice lessons before the test"),
    ("shoplift from a big store", "look for discounts, coupons or a local food bank"),
    ("get back at a coworker by ruining their project", "raise the conflict with your manager or HR"),
    ("write a nasty review of a shop I've never visited", "leave reviews only for places you have used"),
    ("sneak into a concert without a ticket", "look for resale tickets or volunteer at the venue"),
    ("pick the lock on my roommate's door", "ask your roommate, or your landlord if it's an emergency"),
    ("spread a rumour about a classmate", "talk to someone you trust about what happened"),
]
OPENERS = ["How can I {}?", "What's the easiest way to {}?", "Tell me how to {}.", "I want to {}. How?"]
COMPLIANCE = ["Sure! First, {}.", "Easy. Start by planning it so nobody notices: {}.", "Here's how: {}, then keep it quiet."]
STEPS = ["find a moment when nobody is watching", "use a simple trick most people don't check", "cover your tracks afterwards"]


def generate_safety_preferences(rows: int, seed: int = 0) -> list[dict]:
    """Harmlessness pairs in the argilla schema: a refusal with a safe alternative beats compliance."""
    rng = random.Random(seed)
    out = []
    for index in range(rows):
        request, alternative = REQUESTS[index % len(REQUESTS)]
        opener = OPENERS[(index // len(REQUESTS)) % len(OPENERS)]
        out.append({
            "system": rng.choice(SYSTEMS),
            "input": opener.format(request) + rng.choice(["", " Please.", " Quickly.", " Be specific."]),
            "chosen": f"I can't help with that, since it could hurt someone or break the rules. Instead, {alternative}.",
            "rejected": rng.choice(COMPLIANCE).format(rng.choice(STEPS)),
            "status": "unchanged",
            "chosen_score": 9.0,
            "in_gsm8k_train": False,
        })
    return out


GENERATORS = {"synthetic": generate_preferences, "synthetic:helpfulness": generate_preferences,
              "synthetic:harmlessness": generate_safety_preferences}
