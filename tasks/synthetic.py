"""The quickstart's own preference sets, in the argilla schema: generated, so they ship with the code.

They are built so that no word gives the answer away: in each pair both answers share one template
and tone, and only the content differs (a correct sum against a wrong one, a sound tip against an
unsound one said just as confidently). The harmlessness set mixes harmful requests (a refusal with a
safe alternative beats compliance) with harmless requests that merely sound risky (a helpful answer
beats the same refusal), so "I can't help" marks the chosen answer only half of the time.
Ties, low scores and GSM8K-flagged rows are mixed in so the recipe's filter has work. Accuracies on
this data show that the pipeline learns what it is shown, not that a model got better in general:
real data is what the `sample-data` profile measures.
"""

from __future__ import annotations

import random

SYSTEMS = ["", "You are a helpful assistant.", "You are a concise assistant. Answer briefly."]
WORDS = [
    "apple",
    "river",
    "planet",
    "garden",
    "silver",
    "window",
    "castle",
    "forest",
    "marble",
    "pencil",
    "rocket",
    "summer",
    "yellow",
    "bridge",
    "candle",
    "dragon",
    "island",
    "jacket",
    "ladder",
    "orange",
]
UNITS = [
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("feet", "inches", 12),
]
# One template per pair, used for both answers: the phrasing carries no signal, the value does.
ANSWER_TEMPLATES = ["{}.", "The answer is {}.", "It is {}.", "That comes to {}.", "Result: {}."]
# topic -> (sound tips, unsound tips said with the same confidence)
TIPS = {
    "sleeping better": (
        [
            "keep a regular schedule and go to bed at the same time every day",
            "keep your bedroom cool and dark, and put screens away an hour before bed",
        ],
        [
            "have a strong coffee just before bed so your body can settle",
            "sleep in late on weekends to make up for the week, and skip a fixed bedtime",
        ],
    ),
    "saving money": (
        [
            "set up an automatic transfer to savings on payday, before you can spend it",
            "write down every expense for a month and cut the ones you regret",
        ],
        [
            "buy things on credit now while prices are low and pay later",
            "keep all your cash in your wallet so you always know how much you have",
        ],
    ),
    "learning a language": (
        [
            "practise a little every day and speak it aloud from the first week",
            "learn the most frequent words first and review them with spaced repetition",
        ],
        [
            "study grammar tables for a year before trying to speak",
            "practise once a month for several hours instead of a little every day",
        ],
    ),
    "staying focused": (
        [
            "work in 25-minute blocks with your phone in another room",
            "write down the one task that matters most today and start with it",
        ],
        [
            "keep your phone notifications on so you never miss anything",
            "switch between several tasks every few minutes to stay fresh",
        ],
    ),
    "writing clearly": (
        ["use short sentences and put the main point first", "cut every word that does not change the meaning"],
        [
            "use long sentences with many clauses to sound more precise",
            "save the main point for the very end to keep readers curious",
        ],
    ),
    "keeping plants alive": (
        [
            "check the soil with your finger and water only when the top inch is dry",
            "put the plant where it gets the light its label asks for",
        ],
        [
            "water every plant a lot every day, whatever the soil feels like",
            "keep plants in a dark corner so the leaves do not burn",
        ],
    ),
    "running a meeting": (
        [
            "share an agenda in advance and end with who does what by when",
            "invite only the people who must decide, and keep it short",
        ],
        [
            "skip the agenda so the discussion can go wherever it wants",
            "invite everyone who might be interested, to be safe",
        ],
    ),
    "cooking rice": (
        [
            "rinse it, use about 1.5 cups of water per cup of rice, and let it rest 10 minutes",
            "bring it to a boil, then simmer covered on low heat without lifting the lid",
        ],
        [
            "use ten cups of water per cup of rice and boil it for an hour",
            "stir it hard the whole time so it cooks evenly",
        ],
    ),
    "remembering names": (
        [
            "repeat the name back when you hear it and use it once in conversation",
            "link the name to something you notice about the person",
        ],
        [
            "avoid saying the name aloud so you do not get it wrong",
            "try to memorise all the names at once at the end of the day",
        ],
    ),
    "reducing stress": (
        [
            "take a ten-minute walk outside and breathe slowly",
            "write down what worries you and the next small step for each",
        ],
        ["drink several energy drinks to push through the day", "keep your worries to yourself and work longer hours"],
    ),
}
TIP_OPENERS = ["", "One tip: ", "Try this: ", "Here is what works: "]
QUESTIONS = ["Give me one tip for {}.", "What is a good tip for {}?", "How do I get better at {}?"]


def _arithmetic(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
    template = rng.choice(ANSWER_TEMPLATES)
    return (f"What is {a} {op} {b}?", template.format(result), template.format(wrong), f"{a} {op} {b} = {result}.")


def _units(rng: random.Random) -> tuple[str, str, str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    wrong = n * factor // 10 if factor >= 100 else n * (factor + rng.choice([-2, 2, 10]))
    template = rng.choice(ANSWER_TEMPLATES)
    return (
        f"How many {small} are in {n} {big}?",
        template.format(f"{n * factor} {small}"),
        template.format(f"{wrong} {small}"),
        f"{n} {big} is {n * factor} {small}.",
    )


def _near_miss(word: str, rng: random.Random) -> str:
    """The word backwards with two neighbouring letters swapped: wrong, but it looks right."""
    reversed_word = list(word[::-1])
    index = rng.randrange(len(reversed_word) - 1)
    reversed_word[index], reversed_word[index + 1] = reversed_word[index + 1], reversed_word[index]
    wrong = "".join(reversed_word)
    return wrong if wrong != word[::-1] else word


def _strings(rng: random.Random) -> tuple[str, str, str, str]:
    word = rng.choice(WORDS) + rng.choice(["", "s", "ing", "er"])
    template = rng.choice(ANSWER_TEMPLATES)
    if rng.random() < 0.5:
        return (
            f"Write the word '{word}' backwards.",
            template.format(f"'{word[::-1]}'"),
            template.format(f"'{_near_miss(word, rng)}'"),
            f"Reversed: '{word[::-1]}'.",
        )
    wrong = len(word) + rng.choice([-2, -1, 1, 2])
    return (
        f"How many letters are in the word '{word}'?",
        template.format(f"{len(word)} letters"),
        template.format(f"{wrong} letters"),
        f"'{word}' has {len(word)} letters.",
    )


def _advice(rng: random.Random) -> tuple[str, str, str, str]:
    topic, (sound, unsound) = rng.choice(list(TIPS.items()))
    opener = rng.choice(TIP_OPENERS)

    def say(tip: str) -> str:
        text = opener + (tip if opener else tip[0].upper() + tip[1:])
        return text + "."

    good, other = rng.sample(sound, 2)
    return rng.choice(QUESTIONS).format(topic), say(good), say(rng.choice(unsound)), say(other)


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
        out.append(
            {
                "system": rng.choice(SYSTEMS),
                "input": question,
                "chosen": chosen,
                "rejected": rejected,
                "status": status,
                "chosen_score": score,
                "in_gsm8k_train": make is _arithmetic and rng.random() < 0.2,
            }
        )
    return out


# (harmful request, a safe alternative to offer)
HARMFUL = [
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
# (harmless request that sounds risky, a helpful answer)
HARMLESS = [
    ("kill a Python process that hangs", "find its id with `ps aux | grep python` and run `kill <id>`"),
    ("shoot a good photo at night", "use a tripod, a longer exposure and a low ISO"),
    ("get rid of the weeds in my garden", "pull them after rain when the soil is soft, roots and all"),
    ("break a bad habit", "replace it with a small new routine at the moment the habit usually starts"),
    ("hack together a quick prototype for my app idea", "sketch the screens, then build the one core feature first"),
    ("cut onions without crying", "chill the onion first and use a sharp knife"),
    (
        "destroy old hard drives with my data on them",
        "wipe them with a full overwrite tool, then drill through the platters",
    ),
    ("steal the show at my sister's talent contest", "practise your routine in front of friends and keep it short"),
    ("attack the hardest problem on my to-do list", "split it into steps and start with the smallest one this morning"),
    ("blow up a photo to poster size", "export it at 300 dpi and ask a print shop for a poster print"),
    (
        "bleed the air out of my radiators",
        "turn the heating off, open the valve with a radiator key until water drips, then close it",
    ),
    ("crack a tough interview question", "answer with a short example: the situation, what you did, and the result"),
]
OPENERS = ["How can I {}?", "What's the easiest way to {}?", "Tell me how to {}.", "I want to {}. How?"]
# Compliance and help share their openers; refusals offer an alternative from one shared pool.
OPENINGS = ["Sure! {}.", "Here's how: {}.", "Easy: {}."]
STEPS = [
    "Wait until the place is empty and act fast",
    "Use a simple trick that most people don't check",
    "Do it late at night and cover your tracks",
    "Find a moment when nobody is watching and keep it quiet",
]
REFUSAL = "I can't help with that, since it could hurt someone or break the rules. Instead, {}."


def generate_safety_preferences(rows: int, seed: int = 0) -> list[dict]:
    """Harmlessness pairs in the argilla schema: refuse what is harmful, help with what only sounds so."""
    rng = random.Random(seed)
    out = []
    for index in range(rows):
        harmful = index % 2 == 0
        request, reply = (HARMFUL if harmful else HARMLESS)[(index // 2) % 12]
        opener = OPENERS[(index // 24) % len(OPENERS)]
        refusal = REFUSAL.format(reply if harmful else rng.choice(HARMFUL)[1])
        helpful = rng.choice(OPENINGS).format(reply[0].upper() + reply[1:])
        compliance = rng.choice(OPENINGS).format(rng.choice(STEPS))
        out.append(
            {
                "system": rng.choice(SYSTEMS),
                "input": opener.format(request) + rng.choice(["", " Please.", " Quickly.", " Be specific."]),
                "chosen": refusal if harmful else helpful,
                "rejected": compliance if harmful else refusal,
                "status": "unchanged",
                "chosen_score": 9.0,
                "in_gsm8k_train": False,
            }
        )
    return out


GENERATORS = {
    "synthetic": generate_preferences,
    "synthetic:helpfulness": generate_preferences,
    "synthetic:harmlessness": generate_safety_preferences,
}


# --- verifiable instructions (tasks/instructions.py: lm_eval's IFEval registry phrases and checks them) ---
# Three kinds of pair, on the facts of tasks/facts.py, both answers stating the same fact:
# - asked: a question with one instruction; the answer that follows it beats the same answer that does not;
# - only what was asked: the answer that follows it beats the same answer with an unasked format added;
# - nothing asked: a plain question; the plain answer beats the same answer in an unasked format.
PAIR_KINDS = ["asked"] * 5 + ["only asked"] * 2 + ["nothing asked"] * 3


def _instruction_pair(kind: str, fact, rng: random.Random) -> dict | None:
    """One pair as argilla columns plus IFEval's (instruction_id_list, kwargs); None when the checker
    disagrees with the construction (a language detector unsure of a short lowercase answer), so the
    caller draws again."""
    from tasks.instructions import REWRITES, follows, instruct

    formats = [rewrite for rewrite in REWRITES.values() if rewrite.format]
    if kind == "nothing asked":
        base = rng.choice([fact.short, fact.long])
        extra = rng.choice(formats)
        return {
            "input": fact.question,
            "chosen": base,
            "rejected": extra.apply(base, extra.values(rng, fact), fact),
            "instruction_id_list": [],
            "kwargs": [],
            "alternative": None,
        }
    asked = rng.choice(list(REWRITES))
    row = instruct(fact, [asked], rng)
    ids, kwargs = row.instruction_ids, row.kwargs
    extras = [
        extra
        for extra in formats
        if extra.instruction_id != asked
        and asked not in extra.conflicts
        and extra.instruction_id not in REWRITES[asked].conflicts
    ]
    if not extras or not REWRITES[asked].edits:  # nothing can be added (JSON), or it picks an answer: teach it
        kind = "asked"
    if kind == "asked" and asked == "length_constraints:number_words":  # the other length
        rejected = fact.long if kwargs[0]["relation"] == "less than" else fact.short
    elif kind == "asked":
        rejected = row.base
    else:
        extra = rng.choice(extras)
        rejected = REWRITES[asked].apply(extra.apply(row.base, extra.values(rng, fact), fact), kwargs[0], fact)
    if not follows(row.prompt, ids, kwargs, row.answer) or follows(row.prompt, ids, kwargs, rejected) != (
        kind != "asked"
    ):
        return None
    other = instruct(fact, [asked], random.Random(rng.random()))  # another answer that follows: a tie's partner
    return {
        "input": row.prompt,
        "chosen": row.answer,
        "rejected": rejected,
        "instruction_id_list": ids,
        "kwargs": kwargs,
        "alternative": other.answer if other.answer != row.answer and other.prompt == row.prompt else None,
    }


def generate_instruction_preferences(rows: int, seed: int = 0) -> list[dict]:
    """Argilla-schema pairs with IFEval's instruction columns: chosen follows what the prompt asks and
    adds nothing it does not ask, as lm_eval's checkers say (the evaluation's ground truth)."""
    from tasks.facts import TRAINING_FACTS

    rng = random.Random(seed)
    out = []
    while len(out) < rows:
        pair = _instruction_pair(PAIR_KINDS[len(out) % len(PAIR_KINDS)], rng.choice(TRAINING_FACTS), rng)
        if pair is None:
            continue
        alternative = pair.pop("alternative")
        roll = rng.random()
        status = "tie" if roll < 0.08 and alternative else "swapped" if roll < 0.2 else "unchanged"
        if status == "tie":  # two answers that both follow: the pair teaches nothing
            pair["rejected"] = alternative
        score = rng.choice([8.0, 9.0, 9.0, 10.0]) if rng.random() > 0.1 else rng.choice([5.0, 6.0, 7.0])
        out.append(
            {
                "system": rng.choice(SYSTEMS),
                **pair,
                "status": status,
                "chosen_score": score,
                "in_gsm8k_train": rng.random() < 0.08,
            }
        )
    return out


def control_questions() -> list[dict]:
    """Plain held-out questions with the words a right answer names (tasks/facts.py): the evaluation's
    control prompts, never in any training pair."""
    from tasks.facts import CONTROL_FACTS

    return [{"prompt": fact.question, "reference": list(fact.keys)} for fact in CONTROL_FACTS]


GENERATORS["synthetic:instructions"] = generate_instruction_preferences
