"""Verifiable instructions, in the spirit of IFEval: a prompt asks for a checkable property of the
answer (a word limit, all lowercase, double quotes around it, a given first word or closing phrase)
and a rule says whether an answer has it. The generator of `synthetic:instructions` writes
its prompts with `phrase` and labels its pairs with `verify`; evaluation calls `verify` on the
policy's own answers, so the pass rate is ground truth that no judge decides.

Each kind is one phrasing (what the generator writes), one pattern that finds it again in a prompt,
and one check; `verify` parses the user's text, so a system prompt kept apart changes nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

# Straight or typographic double quotes around an answer, or around a quoted value in a prompt.
OPENING_QUOTES, CLOSING_QUOTES = '"\u201c', '"\u201d'


def words(answer: str) -> list[str]:
    return answer.split()


def _first_word(answer: str) -> str:
    found = re.search(r"[A-Za-z']+", answer)
    return found.group(0).lower() if found else ""


def _ends_with(answer: str, phrase: str) -> bool:
    """IFEval's rule: the answer, without surrounding quotes, ends with the phrase (case aside)."""
    return answer.strip().strip(OPENING_QUOTES + CLOSING_QUOTES).strip().lower().endswith(phrase.strip().lower())


@dataclass(frozen=True)
class Kind:
    """One kind of instruction: how the generator says it, how to find it, and how to check it."""

    name: str
    template: str  # the phrasing, with `{value}` where the kind has a parameter
    check: Callable[[str, str], bool]  # (answer, value) -> follows the instruction

    @property
    def pattern(self) -> re.Pattern:
        """The template as a regex: its own words (spacing and case aside), the value captured."""
        parts = [r"\s+".join(map(re.escape, part.split())) for part in self.template.split("{value}")]
        return re.compile(r"(?P<value>[^\"\u201c\u201d]+?)".join(parts), re.IGNORECASE)

    def phrase(self, value: str | int = "") -> str:
        return self.template.format(value=value)


KINDS = {kind.name: kind for kind in [
    Kind("max_words", "Answer in at most {value} words.",
         lambda answer, value: 0 < len(words(answer)) <= int(value)),
    Kind("lowercase", "Write your whole answer in lowercase letters, with no capital letters at all.",
         lambda answer, value: answer.islower()),
    Kind("quotes", "Wrap your entire answer in double quotation marks.",
         lambda answer, value: len(answer.strip()) > 2 and answer.strip()[0] in OPENING_QUOTES
         and answer.strip()[-1] in CLOSING_QUOTES),
    Kind("start_word", 'Start your answer with the word "{value}".',
         lambda answer, value: _first_word(answer) == value.lower()),
    Kind("end_phrase", 'End your answer with the exact phrase "{value}"',
         lambda answer, value: _ends_with(answer, value)),
]}


def parse(prompt: str) -> list[tuple[Kind, str]]:
    """The instructions a prompt carries, with their values, in the order they appear."""
    found = []
    for kind in KINDS.values():
        for match in kind.pattern.finditer(prompt):
            found.append((match.start(), kind, (match.groupdict().get("value") or "").strip()))
    return [(kind, value) for _, kind, value in sorted(found, key=lambda item: item[0])]


def kinds_of(prompt: str) -> list[str]:
    return [kind.name for kind, _ in parse(prompt)]


def verify(prompt: str, answer: str) -> bool | None:
    """Whether `answer` follows every verifiable instruction in `prompt` (its user text, or the whole
    rendered conversation); None when the prompt carries none. An empty answer follows nothing."""
    instructions = parse(prompt)
    if not instructions:
        return None
    return bool(answer.strip()) and all(kind.check(answer, value) for kind, value in instructions)
