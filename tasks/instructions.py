"""Verifiable instructions through lm-evaluation-harness's IFEval code: its registry phrases an
instruction (`build_description`, with values we choose) and its checkers score an answer as IFEval
does (`lm_eval.tasks.ifeval.utils.process_results`: prompt and instruction level, strict and loose).

A row that carries instructions says so in IFEval's own columns, `instruction_id_list` and `kwargs`,
so any data with them (generated here, or a public set in that shape) gets ground truth that no judge
decides. `REWRITES` are the kinds the quickstart generator teaches: how an answer is made to follow
one, and which of IFEval's kinds would ask for the same surface format (so a drift check does not
count an asked-for format as a habit).
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from tasks.base import PreftuneError
from tasks.facts import Fact

PUNKT = "tokenizers/punkt_tab"


def require_punkt() -> None:
    """NLTK's punkt_tab tables, which IFEval's sentence checkers read: found, or fetched as the library
    itself would; offline and absent, one line that says what to do (the library would print a failed
    download and crash later, inside a check)."""
    import nltk

    try:
        nltk.data.find(PUNKT)
        return
    except LookupError:
        pass
    fetched = nltk.download("punkt_tab", quiet=True, print_error_to=io.StringIO())  # its failure is said below
    if not fetched:
        raise PreftuneError(
            "NLTK's punkt_tab tables (tokenizers/punkt_tab), which IFEval's checkers need, are not "
            "installed and cannot be downloaded here: set NLTK_DATA to a folder holding "
            "tokenizers/punkt_tab (where there is network: python -m nltk.downloader -d DIR punkt_tab)"
        )


@cache
def registry() -> dict[str, type]:
    """lm_eval's IFEval instruction classes by id, once punkt_tab is there."""
    require_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0  # the case checkers detect the language: the same verdict every run
    from lm_eval.tasks.ifeval import instructions_registry

    return dict(instructions_registry.INSTRUCTION_DICT)


def describe(instruction_id: str, kwargs: dict) -> str:
    """The library's phrasing of one instruction with these values."""
    return registry()[instruction_id](instruction_id).build_description(**kwargs)


def check(prompt: str, instruction_ids: list[str], kwargs: list[dict], answer: str) -> dict:
    """IFEval's verdict on one answer: `prompt_level_strict_acc`, `inst_level_strict_acc` (per
    instruction), and the same `_loose` (first or last line, or markdown asterisks, forgiven)."""
    registry()
    from lm_eval.tasks.ifeval.utils import process_results

    doc = {
        "key": 0,
        "prompt": prompt,
        "instruction_id_list": list(instruction_ids),
        "kwargs": [dict(values) for values in kwargs],
    }
    return process_results(doc, [answer])


def follows(prompt: str, instruction_ids: list[str], kwargs: list[dict], answer: str) -> bool:
    """Strictly follows every instruction (an empty answer follows nothing)."""
    return bool(check(prompt, instruction_ids, kwargs, answer)["prompt_level_strict_acc"])


# --- answers rewritten to follow a kind ------------------------------------------------------------

END_PHRASES = [
    "Is there anything else I can help with?",
    "Any other questions?",
    "Does that answer your question?",
    "Let me know if you have more questions",
    "Have a nice day",
    "That is all",
]
POSTSCRIPTS = [
    "Ask me if you want to know more.",
    "I looked this up for you.",
    "Thanks for asking.",
    "There is a lot more to learn about this.",
    "This is a fun fact to share.",
]


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _no_comma(text: str) -> str:
    return re.sub(r"\s*,\s*", " ", text)


def _highlight(text: str, values: dict, fact: Fact) -> str:
    """One highlight: the fact's key (markdown *...*); more: the first comma-separated parts."""
    count = values["num_highlights"]
    parts = re.split(r"(?<=,)\s+", text)
    if count > 1 and len(parts) >= count:
        return " ".join(f"*{part}*" if index < count else part for index, part in enumerate(parts))
    key = next((key for key in fact.keys if re.search(re.escape(key), text, re.IGNORECASE)), None)
    if key is None:
        return f"*{text}*"
    return re.sub(re.escape(key), lambda found: f"*{found.group(0)}*", text, count=1, flags=re.IGNORECASE)


@dataclass(frozen=True)
class Rewrite:
    """One instruction kind the generator teaches: its values for `build_description`, how an answer is
    rewritten to follow it, and the IFEval kinds that would ask for the same surface format."""

    instruction_id: str
    values: Callable[[random.Random, Fact], dict]
    apply: Callable[[str, dict, Fact], str]
    answer: str = "any"  # which of the fact's answers it rewrites: short, long or any
    format: str | None = None  # the surface format it adds (drift checks): quotes, lowercase, ...
    edits: bool = True  # rewrites the answer it is given (False: picks one of the fact's answers instead)
    conflicts: frozenset[str] = field(default_factory=frozenset)  # kinds it cannot be combined with


def _no_values(rng, fact) -> dict:
    return {}


def _word_limit(rng: random.Random, fact: Fact) -> dict:
    short, long = _words(fact.short), _words(fact.long)
    if rng.random() < 0.6:
        return {"relation": "less than", "num_words": rng.randint(short + 1, long)}
    return {"relation": "at least", "num_words": rng.randint(short + 1, long)}


REWRITES = {
    rewrite.instruction_id: rewrite
    for rewrite in [
        Rewrite(
            "startend:quotation",
            _no_values,
            lambda text, values, fact: f'"{text}"',
            format="quotes",
            conflicts=frozenset({"detectable_format:json_format", "detectable_format:title"}),
        ),
        Rewrite(
            "change_case:english_lowercase",
            _no_values,
            lambda text, values, fact: text.lower(),
            answer="long",
            format="lowercase",
            conflicts=frozenset({"change_case:english_capital", "detectable_format:json_format"}),
        ),
        Rewrite(
            "change_case:english_capital",
            _no_values,
            lambda text, values, fact: text.upper(),
            answer="long",
            format="capitals",
            conflicts=frozenset({"change_case:english_lowercase", "detectable_format:json_format"}),
        ),
        Rewrite("punctuation:no_comma", _no_values, lambda text, values, fact: _no_comma(text), answer="long"),
        Rewrite(
            "startend:end_checker",
            lambda rng, fact: {"end_phrase": rng.choice(END_PHRASES)},
            lambda text, values, fact: f"{text} {values['end_phrase']}",
            format="closing phrase",
            conflicts=frozenset({"detectable_format:json_format", "detectable_content:postscript"}),
        ),
        Rewrite(
            "detectable_content:postscript",
            lambda rng, fact: {"postscript_marker": rng.choice(["P.S.", "P.P.S"])},
            lambda text, values, fact: (
                f"{text}\n\n{values['postscript_marker']} {POSTSCRIPTS[len(text) % len(POSTSCRIPTS)]}"
            ),
            format="closing phrase",
            conflicts=frozenset({"detectable_format:json_format", "startend:end_checker"}),
        ),
        Rewrite(
            "detectable_format:title",
            _no_values,
            lambda text, values, fact: f"<<{fact.topic}>>\n\n{text}",
            format="markup",
            conflicts=frozenset({"detectable_format:json_format", "startend:quotation"}),
        ),
        Rewrite(
            "detectable_format:number_highlighted_sections",
            lambda rng, fact: {"num_highlights": rng.choice([1, 1, 2])},
            _highlight,
            answer="long",
            format="markup",
            conflicts=frozenset({"detectable_format:json_format"}),
        ),
        Rewrite(
            "detectable_format:json_format",
            _no_values,
            lambda text, values, fact: json.dumps({"answer": text}, ensure_ascii=False),
            format="markup",
            conflicts=frozenset(
                {
                    "startend:quotation",
                    "change_case:english_lowercase",
                    "change_case:english_capital",
                    "startend:end_checker",
                    "detectable_content:postscript",
                    "detectable_format:title",
                    "detectable_format:number_highlighted_sections",
                }
            ),
        ),
        Rewrite(
            "length_constraints:number_words",
            _word_limit,
            lambda text, values, fact: fact.short if values["relation"] == "less than" else fact.long,
            edits=False,
        ),
    ]
}


@dataclass(frozen=True)
class Instructed:
    """A question with instructions, as IFEval writes a row, and an answer that follows them."""

    prompt: str
    instruction_ids: list[str]
    kwargs: list[dict]
    answer: str
    base: str  # the fact's answer before it was rewritten


def instruct(fact: Fact, kinds: list[str], rng: random.Random) -> Instructed:
    """The fact's question with these instructions (the library's phrasing), and its answer rewritten
    to follow all of them, in order."""
    wanted = {REWRITES[kind].answer for kind in kinds} - {"any"}
    answer = base = (
        fact.long if "long" in wanted else fact.short if "short" in wanted else rng.choice([fact.short, fact.long])
    )
    values = [REWRITES[kind].values(rng, fact) for kind in kinds]
    for kind, kind_values in zip(kinds, values):
        answer = REWRITES[kind].apply(answer, kind_values, fact)
    prompt = " ".join([fact.question, *(describe(kind, kind_values) for kind, kind_values in zip(kinds, values))])
    return Instructed(prompt=prompt, instruction_ids=list(kinds), kwargs=values, answer=answer, base=base)


def asked_formats(instruction_ids: list[str]) -> set[str]:
    """The surface formats these IFEval instructions ask for (any of IFEval's kinds, trained or not)."""
    asked = {REWRITES[kind].format for kind in instruction_ids if kind in REWRITES and REWRITES[kind].format}
    markup = (
        "detectable_format:",
        "detectable_content:number_placeholders",
        "combination:two_responses",
        "length_constraints:number_paragraphs",
        "length_constraints:nth_paragraph_first_word",
    )
    if any(kind.startswith(markup) for kind in instruction_ids):
        asked.add("markup")
    if "change_case:capital_word_frequency" in instruction_ids:
        asked.add("capitals")
    if any(kind.startswith("startend:") or kind == "detectable_content:postscript" for kind in instruction_ids):
        asked.add("closing phrase")
    if "combination:repeat_prompt" in instruction_ids:
        asked.add("opening word")
    return asked
