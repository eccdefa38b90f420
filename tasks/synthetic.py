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

from tasks.instructions import KINDS, verify

SYSTEMS = ["", "You are a helpful assistant.", "You are a concise assistant. Answer briefly."]
WORDS = ["apple", "river", "planet", "garden", "silver", "window", "castle", "forest", "marble", "pencil",
         "rocket", "summer", "yellow", "bridge", "candle", "dragon", "island", "jacket", "ladder", "orange"]
UNITS = [("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("feet", "inches", 12)]
# One template per pair, used for both answers: the phrasing carries no signal, the value does.
ANSWER_TEMPLATES = ["{}.", "The answer is {}.", "It is {}.", "That comes to {}.", "Result: {}."]
# topic -> (sound tips, unsound tips said with the same confidence)
TIPS = {
    "sleeping better": (["keep a regular schedule and go to bed at the same time every day",
                         "keep your bedroom cool and dark, and put screens away an hour before bed"],
                        ["have a strong coffee just before bed so your body can settle",
                         "sleep in late on weekends to make up for the week, and skip a fixed bedtime"]),
    "saving money": (["set up an automatic transfer to savings on payday, before you can spend it",
                      "write down every expense for a month and cut the ones you regret"],
                     ["buy things on credit now while prices are low and pay later",
                      "keep all your cash in your wallet so you always know how much you have"]),
    "learning a language": (["practise a little every day and speak it aloud from the first week",
                             "learn the most frequent words first and review them with spaced repetition"],
                            ["study grammar tables for a year before trying to speak",
                             "practise once a month for several hours instead of a little every day"]),
    "staying focused": (["work in 25-minute blocks with your phone in another room",
                         "write down the one task that matters most today and start with it"],
                        ["keep your phone notifications on so you never miss anything",
                         "switch between several tasks every few minutes to stay fresh"]),
    "writing clearly": (["use short sentences and put the main point first",
                         "cut every word that does not change the meaning"],
                        ["use long sentences with many clauses to sound more precise",
                         "save the main point for the very end to keep readers curious"]),
    "keeping plants alive": (["check the soil with your finger and water only when the top inch is dry",
                              "put the plant where it gets the light its label asks for"],
                             ["water every plant a lot every day, whatever the soil feels like",
                              "keep plants in a dark corner so the leaves do not burn"]),
    "running a meeting": (["share an agenda in advance and end with who does what by when",
                           "invite only the people who must decide, and keep it short"],
                          ["skip the agenda so the discussion can go wherever it wants",
                           "invite everyone who might be interested, to be safe"]),
    "cooking rice": (["rinse it, use about 1.5 cups of water per cup of rice, and let it rest 10 minutes",
                      "bring it to a boil, then simmer covered on low heat without lifting the lid"],
                     ["use ten cups of water per cup of rice and boil it for an hour",
                      "stir it hard the whole time so it cooks evenly"]),
    "remembering names": (["repeat the name back when you hear it and use it once in conversation",
                           "link the name to something you notice about the person"],
                          ["avoid saying the name aloud so you do not get it wrong",
                           "try to memorise all the names at once at the end of the day"]),
    "reducing stress": (["take a ten-minute walk outside and breathe slowly",
                         "write down what worries you and the next small step for each"],
                        ["drink several energy drinks to push through the day",
                         "keep your worries to yourself and work longer hours"]),
}
TIP_OPENERS = ["", "One tip: ", "Try this: ", "Here is what works: "]
QUESTIONS = ["Give me one tip for {}.", "What is a good tip for {}?", "How do I get better at {}?"]


def _arithmetic(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
    template = rng.choice(ANSWER_TEMPLATES)
    return (f"What is {a} {op} {b}?", template.format(result), template.format(wrong),
            f"{a} {op} {b} = {result}.")


def _units(rng: random.Random) -> tuple[str, str, str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    wrong = n * factor // 10 if factor >= 100 else n * (factor + rng.choice([-2, 2, 10]))
    template = rng.choice(ANSWER_TEMPLATES)
    return (f"How many {small} are in {n} {big}?", template.format(f"{n * factor} {small}"),
            template.format(f"{wrong} {small}"), f"{n} {big} is {n * factor} {small}.")


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
        return (f"Write the word '{word}' backwards.", template.format(f"'{word[::-1]}'"),
                template.format(f"'{_near_miss(word, rng)}'"), f"Reversed: '{word[::-1]}'.")
    wrong = len(word) + rng.choice([-2, -1, 1, 2])
    return (f"How many letters are in the word '{word}'?", template.format(f"{len(word)} letters"),
            template.format(f"{wrong} letters"), f"'{word}' has {len(word)} letters.")


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
    ("destroy old hard drives with my data on them", "wipe them with a full overwrite tool, then drill through the platters"),
    ("steal the show at my sister's talent contest", "practise your routine in front of friends and keep it short"),
    ("attack the hardest problem on my to-do list", "split it into steps and start with the smallest one this morning"),
    ("blow up a photo to poster size", "export it at 300 dpi and ask a print shop for a poster print"),
    ("bleed the air out of my radiators", "turn the heating off, open the valve with a radiator key until water drips, then close it"),
    ("crack a tough interview question", "answer with a short example: the situation, what you did, and the result"),
]
OPENERS = ["How can I {}?", "What's the easiest way to {}?", "Tell me how to {}.", "I want to {}. How?"]
# Compliance and help share their openers; refusals offer an alternative from one shared pool.
OPENINGS = ["Sure! {}.", "Here's how: {}.", "Easy: {}."]
STEPS = ["Wait until the place is empty and act fast", "Use a simple trick that most people don't check",
         "Do it late at night and cover your tracks", "Find a moment when nobody is watching and keep it quiet"]
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
        out.append({
            "system": rng.choice(SYSTEMS),
            "input": opener.format(request) + rng.choice(["", " Please.", " Quickly.", " Be specific."]),
            "chosen": refusal if harmful else helpful,
            "rejected": compliance if harmful else refusal,
            "status": "unchanged",
            "chosen_score": 9.0,
            "in_gsm8k_train": False,
        })
    return out


GENERATORS = {"synthetic": generate_preferences, "synthetic:helpfulness": generate_preferences,
              "synthetic:harmlessness": generate_safety_preferences}


# --- verifiable instructions (tasks/instructions.py checks them) ---------------------------------
# (question, a short answer, a one-sentence answer): the content both answers of a pair share. No answer starts with a proper noun, so a given first word can be put before it.
FACTS = [
    ("What color is the sky on a clear day?", "The sky is blue.",
     "On a clear day the sky looks blue, because air scatters blue sunlight more than red light."),
    ("Why do we need sleep?", "Sleep lets the body recover.",
     "We need sleep because it lets the body repair itself, and it helps the brain store memories."),
    ("What is the capital of France?", "The capital is Paris.",
     "The capital of France is Paris, a large city on the river Seine."),
    ("How do plants make food?", "They use photosynthesis.",
     "Plants make food by photosynthesis, turning sunlight, water and carbon dioxide into sugar."),
    ("What do bees make?", "Bees make honey and wax.",
     "Bees make honey from flower nectar, and they build their hives from wax."),
    ("How many days are in a week?", "A week has seven days.",
     "There are seven days in a week, from one Monday to the next."),
    ("At what temperature does water boil?", "It boils at 100 degrees Celsius.",
     "At sea level water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit."),
    ("What is the largest ocean?", "The largest is the Pacific.",
     "The largest ocean on Earth is the Pacific, which covers about a third of the planet."),
    ("What is rain made of?", "Rain is drops of water.",
     "Rain is made of drops of water, which form when the vapour in clouds cools down."),
    ("Why do leaves change color in autumn?", "Their green chlorophyll breaks down.",
     "In autumn leaves lose their green chlorophyll, so their yellow and red pigments show through."),
    ("Which animal is called the king of the jungle?", "The lion is.",
     "The lion is called the king of the jungle, although it mostly lives on open grassland."),
    ("How do you make a cup of tea?", "Steep tea in hot water.",
     "To make tea, pour hot water over a tea bag, wait three minutes, and then remove the bag."),
    ("Why should we drink water every day?", "Water keeps the body working.",
     "We should drink water every day, because the body uses it to control heat and carry nutrients."),
    ("What is the closest star to Earth?", "The closest star is the Sun.",
     "The closest star to Earth is the Sun, which is about 150 million kilometres away."),
    ("How many legs does a spider have?", "A spider has eight legs.",
     "A spider has eight legs, which is two more than an insect has."),
    ("What gas do humans breathe out?", "We breathe out carbon dioxide.",
     "Humans breathe out carbon dioxide, a gas that plants then use to make their food."),
    ("What is the tallest mountain in the world?", "The tallest is Mount Everest.",
     "The tallest mountain in the world is Mount Everest, in the Himalayas, almost nine kilometres high."),
    ("Why is exercise good for you?", "It keeps your body strong.",
     "Exercise is good for you, because it strengthens the heart and muscles and lifts your mood."),
    ("What does a thermometer measure?", "It measures temperature.",
     "A thermometer measures temperature, for example of the air, of water or of your body."),
    ("What is the main language spoken in Brazil?", "Most people speak Portuguese.",
     "The main language of Brazil is Portuguese, which came with settlers from Portugal."),
    ("How many continents are there?", "There are seven continents.",
     "There are seven continents, and the largest of them by area is Asia."),
    ("What do caterpillars turn into?", "They become butterflies or moths.",
     "Caterpillars turn into butterflies or moths, after a resting stage inside a chrysalis or cocoon."),
    ("Why does the Moon shine at night?", "It reflects sunlight.",
     "The Moon makes no light of its own, but it shines because it reflects light from the Sun."),
    ("What is the freezing point of water?", "Water freezes at zero degrees Celsius.",
     "Water freezes at zero degrees Celsius, which is 32 degrees Fahrenheit."),
    ("What is the largest planet in our solar system?", "The largest is Jupiter.",
     "The largest planet in our solar system is Jupiter, a gas giant more than ten times as wide as Earth."),
    ("How can I keep my teeth healthy?", "Brush them twice a day.",
     "To keep your teeth healthy, brush them twice a day and eat fewer sugary snacks."),
    ("What is a baby cat called?", "It is called a kitten.",
     "A baby cat is called a kitten, and it opens its eyes about a week after birth."),
    ("Why do birds fly south in winter?", "They look for warmth and food.",
     "Many birds fly south in winter, because they need warmer weather and more food."),
    ("What is the fastest land animal?", "The cheetah is the fastest.",
     "The fastest land animal is the cheetah, which can run at more than 100 kilometres per hour."),
    ("How many hours are in a day?", "A day has 24 hours.",
     "There are 24 hours in a day, which is the time the Earth takes to spin once."),
    ("What is the opposite of hot?", "The opposite is cold.",
     "The opposite of hot is cold, as on a frosty winter morning."),
    ("Why do we have seasons?", "The axis of the Earth is tilted.",
     "We have seasons because the axis of the Earth is tilted, so each half gets more sunlight at a different time."),
    ("What instrument has black and white keys?", "The piano does.",
     "The piano has black and white keys, and each key makes a small hammer strike a string."),
    ("How do fish breathe underwater?", "They breathe with gills.",
     "Fish breathe with gills, which take oxygen out of the water as it flows past."),
    ("What is the chemical symbol for gold?", "Its symbol is Au.",
     "The chemical symbol for gold is Au, from the Latin word aurum."),
    ("What shape has three sides?", "A triangle has three sides.",
     "A shape with three sides is a triangle, and its angles always add up to 180 degrees."),
    ("Who wrote Romeo and Juliet?", "The author is William Shakespeare.",
     "The play was written by William Shakespeare, an English playwright, in the 1590s."),
    ("What is the largest desert in Africa?", "The largest is the Sahara.",
     "The largest desert in Africa is the Sahara, which stretches across much of the north of the continent."),
    ("How can I fall asleep faster?", "Keep a regular bedtime.",
     "To fall asleep faster, keep a regular bedtime and put your phone away an hour before bed."),
    ("What do you call frozen water?", "Frozen water is ice.",
     "Frozen water is called ice, and it floats because it is lighter than liquid water."),
    ("Why is the ocean salty?", "Rivers carry salt into it.",
     "The ocean is salty, because rivers wash minerals from rocks into the sea over millions of years."),
    ("What is the main ingredient of bread?", "Bread is mostly flour.",
     "The main ingredient of bread is flour, which is mixed with water, yeast and salt."),
    ("How many sides does a hexagon have?", "A hexagon has six sides.",
     "A hexagon has six sides, like the cells of a honeycomb."),
    ("What is the capital of Japan?", "The capital is Tokyo.",
     "The capital of Japan is Tokyo, one of the largest cities in the world."),
    ("Why do we wear coats in winter?", "Coats keep us warm.",
     "We wear coats in winter, because they trap warm air close to the body."),
    ("What does a compass show?", "It shows which way is north.",
     "A compass shows which way is north, because its needle lines up with the magnetic field of the Earth."),
    ("What do pandas mostly eat?", "Pandas mostly eat bamboo.",
     "Giant pandas mostly eat bamboo, and they can spend half the day eating it."),
    ("How does a rainbow form?", "Raindrops split sunlight into colors.",
     "A rainbow forms when sunlight passes through raindrops, which bend it and split it into colors."),
]
START_WORDS = ["Sure", "Well", "Indeed", "Certainly", "Okay"]
END_PHRASES = ["Is there anything else I can help with?", "I hope this helps.", "Let me know if you have more questions."]


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _instruction_pair(kind: str, short: str, long: str, rng: random.Random) -> tuple[str, str, str, str]:
    """(value, chosen, rejected, another answer that also follows): one base answer on both sides, only
    the instructed property differs (for the word limit, the short answer against the long one)."""
    base = rng.choice([short, long])
    if kind == "max_words":
        limit = rng.randint(len(short.split()), min(len(long.split()) - 1, len(short.split()) + 4))
        return str(limit), short, long, short.lower()
    if kind == "lowercase":
        return "", base.lower(), base, (long if base == short else short).lower()
    if kind == "quotes":
        return "", f'"{base}"', base, f'"{long if base == short else short}"'
    if kind == "start_word":
        word = rng.choice(START_WORDS)
        return word, f"{word}, {_lower_first(base)}", base, f"{word}! {base}"
    if kind == "end_phrase":
        phrase = rng.choice(END_PHRASES)
        rejected = base if rng.random() < 0.5 else f"{phrase} {base}"  # the phrase is there, but first
        return phrase, f"{base} {phrase}", rejected, f"{base}\n\n{phrase}"
    raise ValueError(kind)


def generate_instruction_preferences(rows: int, seed: int = 0) -> list[dict]:
    """Argilla-schema pairs on prompts that carry one verifiable instruction: the chosen answer follows it
    and the rejected one does not, as `tasks.instructions.verify` (the evaluation's checker) says."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    out = []
    for index in range(rows):
        kind = kinds[index % len(kinds)]
        question, short, long = rng.choice(FACTS)
        value, chosen, rejected, alternative = _instruction_pair(kind, short, long, rng)
        prompt = f"{question} {KINDS[kind].phrase(value)}"
        assert verify(prompt, chosen) is True and verify(prompt, rejected) is False, (prompt, chosen, rejected)
        assert verify(prompt, alternative) is True, (prompt, alternative)
        roll = rng.random()
        status = "tie" if roll < 0.08 else "swapped" if roll < 0.2 else "unchanged"
        if status == "tie":  # two answers that both follow the instruction: the pair teaches nothing
            rejected = alternative
        score = rng.choice([8.0, 9.0, 9.0, 10.0]) if rng.random() > 0.1 else rng.choice([5.0, 6.0, 7.0])
        out.append({
            "system": rng.choice(SYSTEMS),
            "input": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "status": status,
            "chosen_score": score,
            "in_gsm8k_train": rng.random() < 0.08,
        })
    return out


GENERATORS["synthetic:instructions"] = generate_instruction_preferences
