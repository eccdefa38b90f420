"""Verifiable instructions through lm-evaluation-harness: the library phrases and checks each kind the
quickstart teaches, the generated pairs agree with its checkers, no IFEval prompt reaches the training
data, and NLTK's missing tables are one clear line."""

from __future__ import annotations

import json
import random
import sys

import pytest

from tasks.base import PreftuneError
from tasks.drift import Habits
from tasks.facts import CONTROL_FACTS, TRAINING_FACTS
from tasks.instructions import REWRITES, check, follows, instruct, require_punkt
from tasks.synthetic import PAIR_KINDS, generate_instruction_preferences

pytestmark = pytest.mark.usefixtures("punkt")


@pytest.mark.parametrize("kind", sorted(REWRITES))
def test_the_library_phrases_each_kind_and_its_checker_passes_the_rewritten_answer(kind):
    rng = random.Random(3)
    passed = []
    for fact in rng.sample(TRAINING_FACTS, 6):
        row = instruct(fact, [kind], rng)
        assert row.prompt.startswith(fact.question) and len(row.prompt) > len(fact.question) + 10
        passed.append(follows(row.prompt, row.instruction_ids, row.kwargs, row.answer))
        plain = (
            (fact.long if row.kwargs[0].get("relation") == "less than" else fact.short)
            if kind == "length_constraints:number_words"
            else row.base
        )
        assert not follows(row.prompt, row.instruction_ids, row.kwargs, plain), (row.prompt, plain)
    # The case checkers also detect the language, and langdetect does not always call capitals English:
    # the generator draws again where it disagrees.
    assert all(passed) or (kind.startswith("change_case:") and sum(passed) >= 3), passed
    verdict = check(row.prompt, row.instruction_ids, row.kwargs, row.answer)
    assert set(verdict) == {
        "prompt_level_strict_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "inst_level_loose_acc",
    }  # lm_eval's own IFEval metrics


def test_checks_are_lm_evals_own_code():
    """The checkers are imported from lm_eval, not copied: scoring goes through its process_results."""
    from lm_eval.tasks.ifeval import utils

    prompt = "What is the capital of France? Wrap your entire response with double quotation marks."
    doc = {"key": 1, "prompt": prompt, "instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    for answer in ('"Paris."', "Paris."):
        assert check(prompt, ["startend:quotation"], [{}], answer) == utils.process_results(doc, [answer])
    assert "lm_eval.tasks.ifeval.instructions" in sys.modules


def test_generated_pairs_follow_what_is_asked_and_add_nothing_unasked():
    rows = generate_instruction_preferences(240, seed=5)
    assert len(rows) == 240
    kinds = {"asked": 0, "only asked": 0, "nothing asked": 0}
    habits = Habits()
    for row in rows:
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        tie = row["status"] == "tie"
        if not ids:  # nothing asked: the plain answer beats the same answer in a format
            kinds["nothing asked"] += 1
            assert any(habits.present(row["rejected"]).values()) and not any(habits.present(row["chosen"]).values())
            continue
        assert follows(row["input"], ids, kwargs, row["chosen"])
        rejected_follows = follows(row["input"], ids, kwargs, row["rejected"])
        kinds["only asked" if rejected_follows and not tie else "asked"] += 1
        if rejected_follows and not tie:  # only what was asked: the rejected answer adds an unasked format
            assert len(row["rejected"]) > len(row["chosen"]) or row["rejected"] != row["chosen"]
    assert all(kinds.values()) and kinds["asked"] > kinds["only asked"]
    assert {kind for row in rows for kind in row["instruction_id_list"]} == set(REWRITES)
    assert PAIR_KINDS.count("nothing asked") / len(PAIR_KINDS) == pytest.approx(
        kinds["nothing asked"] / len(rows), abs=0.01
    )


def test_no_ifeval_prompt_reaches_the_generated_training_data(shared_data):
    """IFEval's prompts are what the policy is measured on: nothing the project generates contains one, and
    the generated questions are the project's own."""
    from tasks.synthetic import GENERATORS

    ifeval = [json.loads(line)["prompt"] for line in (shared_data / "ifeval_dev.jsonl").read_text().splitlines()]
    generated = [row["input"] for name in GENERATORS for row in GENERATORS[name](480, 42)]
    assert len(generated) == 4 * 480
    normalised = [" ".join(text.lower().split()) for text in generated]
    for prompt in ifeval:
        head = " ".join(prompt.lower().split())[:80]
        assert not any(head in text for text in normalised), prompt[:80]
    questions = {fact.question for fact in TRAINING_FACTS} | {fact.question for fact in CONTROL_FACTS}
    assert not questions & {prompt.split("?")[0] + "?" for prompt in ifeval}
    assert not {fact.question for fact in TRAINING_FACTS} & {fact.question for fact in CONTROL_FACTS}


def test_missing_punkt_tables_offline_are_one_line(monkeypatch, tmp_path):
    """Offline, NLTK cannot fetch punkt_tab: one line naming it and NLTK_DATA, not the library's failed
    download and a LookupError later inside a checker."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: False)  # what nltk.download returns offline
    with pytest.raises(PreftuneError) as error:
        require_punkt()
    message = str(error.value)
    assert "\n" not in message and "punkt_tab" in message and "NLTK_DATA" in message
