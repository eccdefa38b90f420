"""What else changed: control prompts that ask for nothing special, answered by the candidate and its
baseline, read for habits nobody asked for.

On each control prompt, a format counts only where the prompt does not ask for it (a benchmark prompt
asking for capitals may get capitals). Reported per model, with the candidate's paired difference and
its 95 % interval: unasked formats (quote-wrapped, all lowercase, all capitals, a filler or taught
opening word, a filler or taught closing phrase or postscript, added markup, and any of them),
degenerate repetition, length, and, where a control prompt has a reference answer, whether the answer
names the fact.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
from pydantic import BaseModel

from tasks.stats import Estimate, mean

FORMATS = ("quotes", "lowercase", "capitals", "opening word", "closing phrase", "markup")
MARKUP = re.compile(
    r"<<[^\n]+>>|\*[^\n*]+\*|^\s*(?:[-*+]|\d+\.)\s|^\s*#|^\s*[{\[]|```|\*\*\*|^\s*p\.\s?p?\.?\s?s\b",
    re.MULTILINE | re.IGNORECASE,
)
POSTSCRIPT = re.compile(r"^\s*p\.\s?(?:p\.\s?)?s\b", re.MULTILINE | re.IGNORECASE)


def _letters(answer: str) -> str:
    return "".join(character for character in answer if character.isalpha())


def _words(answer: str) -> list[str]:
    return re.findall(r"[\w']+", answer.lower())


def repeats(answer: str, n: int = 5, times: int = 3) -> bool:
    """Degenerate repetition: some run of `n` words comes back at least `times` times."""
    words = _words(answer)
    return any(count >= times for count in Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)).values())


def names_fact(answer: str, keys: list[str]) -> bool:
    return any(re.search(re.escape(key), answer, re.IGNORECASE) for key in keys)


# Openers and closers that assistants pick up as habits; the run's own taught phrases are added to them.
FILLER_OPENINGS = (
    "sure",
    "certainly",
    "of course",
    "absolutely",
    "okay",
    "ok",
    "well",
    "indeed",
    "great question",
    "as an ai",
)
FILLER_CLOSINGS = (
    "i hope this helps",
    "hope this helps",
    "let me know if",
    "is there anything else",
    "any other questions",
    "have a nice day",
    "does that answer your question",
    "that is all",
    "feel free to ask",
)


class Habits:
    """The formats to look for in an answer: fixed lists (quotes, case, markup, filler openers and closers,
    postscripts), with the opening words and closing phrases the run's training pairs asked for added."""

    def __init__(self, first_words: list[str] = (), end_phrases: list[str] = ()):
        self.openings = tuple(FILLER_OPENINGS) + tuple(word.lower() for word in first_words)
        self.closings = tuple(FILLER_CLOSINGS) + tuple(" ".join(_words(phrase)) for phrase in end_phrases)

    def present(self, answer: str) -> dict[str, bool]:
        text, letters = answer.strip(), _letters(answer)
        words = " ".join(_words(text))
        return {
            "quotes": text[:1] in '"\u201c',
            "lowercase": len(letters) >= 3 and letters == letters.lower(),
            "capitals": len(letters) >= 3 and letters == letters.upper(),
            "opening word": any(words == opener or words.startswith(opener + " ") for opener in self.openings),
            "closing phrase": bool(POSTSCRIPT.search(text))
            or any(phrase in " ".join(words.split()[-12:]) for phrase in self.closings if phrase),
            "markup": bool(MARKUP.search(text)),
        }


def stem(check: str) -> str:
    """A check's MLflow metric stem (`drift.<stem>_<model>`, `drift.<stem>.difference`): "unasked format (any)"
    -> unasked_format_any, "length (tokens)" -> length."""
    return re.sub(r"\W+", "_", check.replace(" (tokens)", "")).strip("_")


class DriftResult(BaseModel):
    differences: dict[str, Estimate]  # check -> candidate minus baseline (a rate, or tokens for length)
    metrics: dict[str, float]
    prompts: int


def drift(
    controls: pd.DataFrame,
    answers: dict[str, list[str]],
    lengths: dict[str, np.ndarray],
    baseline: str,
    habits: Habits | None = None,
    seed: int = 0,
) -> DriftResult:
    """`controls`: the control prompts (`asked`: the formats each asks for; `reference`: the words a right
    answer names, or empty); `answers`/`lengths` per model, "tuned" the candidate."""
    habits = habits or Habits()
    found = {model: pd.DataFrame([habits.present(answer) for answer in texts]) for model, texts in answers.items()}
    unasked = pd.DataFrame({name: [name not in asked for asked in controls.asked] for name in FORMATS})
    factual = [index for index, keys in enumerate(controls.reference) if len(keys)]
    values: dict[str, dict[str, np.ndarray]] = {}  # per model, per check: one value per control prompt
    for model, present in found.items():
        shown = present & unasked
        values[model] = {f"unasked {name}": shown[name].to_numpy(float) for name in FORMATS}
        values[model]["unasked format (any)"] = shown.any(axis=1).to_numpy(float)
        values[model]["repetition"] = np.array([repeats(answer) for answer in answers[model]], float)
        values[model]["length (tokens)"] = np.asarray(lengths[model], float)
        if factual:
            values[model]["facts named"] = np.array(
                [names_fact(answers[model][i], list(controls.reference[i])) for i in factual], float
            )
    metrics, differences = {"drift.prompts": float(len(controls))}, {}
    if factual:
        metrics["drift.factual_prompts"] = float(len(factual))
    for check in values["tuned"]:
        for model in values:
            metrics[f"drift.{stem(check)}_{model}"] = float(values[model][check].mean())
        differences[check] = mean(values["tuned"][check] - values[baseline][check], seed)
        metrics |= differences[check].metrics(f"drift.{stem(check)}.difference")
    return DriftResult(differences=differences, metrics=metrics, prompts=len(controls))
