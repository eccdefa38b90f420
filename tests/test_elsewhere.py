"""Not worse elsewhere: IFEval through lm-evaluation-harness on the dev half of its prompts, drift on control
prompts, and a gate that refuses a candidate that is better where asked but worse elsewhere, naming why.

The policies here are planted at the level of their answers (each test knows the truth it checks against);
scoring is lm_eval's own, on IFEval's own prompts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tasks import benchmark as bench
from tasks.base import PreftuneError
from tasks.drift import Habits, drift
from tasks.evaluate import control_prompts, control_questions
from tasks.instructions import REWRITES
from tasks.settings.evaluation import BenchmarkSettings, CombinationSettings, ControlSettings
from tasks.stats import mean
from tasks.verdict import decide, gate_input, standing

pytestmark = pytest.mark.usefixtures("punkt")
CASE_KINDS = {
    "change_case:english_capital",
    "change_case:capital_word_frequency",
    "detectable_format:constrained_response",
    "detectable_format:multiple_sections",
}


@pytest.fixture(scope="module")
def ifeval(shared_data) -> pd.DataFrame:
    return bench.load_prompts(BenchmarkSettings(data=str(shared_data / "ifeval_dev.jsonl")))


def _improved_by_a_heard_judge(prompts: int, **checks):
    """The asked-for gain, shown: a heard judge rating every tuned answer clearly better."""
    rng = np.random.default_rng(0)
    judge = standing("helpfulness", 1.0, mean(np.r_[np.ones(90), np.zeros(10)]), 0.0, 0.5)
    scores = {"helpfulness": {"tuned": rng.normal(1.0, 0.3, prompts), "reference": rng.normal(0, 0.3, prompts)}}
    lengths = {"tuned": np.full(prompts, 20.0), "reference": np.full(prompts, 20.0)}
    return gate_input(
        baseline="reference",
        standings=[judge],
        judge_scores=scores,
        lengths=lengths,
        combination=CombinationSettings(),
        prompts=prompts,
        **checks,
    )[0]


def test_ifeval_is_read_from_a_local_file_and_sampled_by_the_kinds_the_run_trained(ifeval):
    assert len(ifeval) == 262 and list(ifeval.columns) == bench.COLUMNS
    settings = BenchmarkSettings(trained_prompts=20, other_prompts=10)
    first, again = bench.sample(ifeval, set(REWRITES), settings), bench.sample(ifeval, set(REWRITES), settings)
    assert first.equals(again) and (first.subset == "trained kinds").sum() == 20 and len(first) == 30
    assert all(set(ids) <= set(REWRITES) for ids in first[first.subset == "trained kinds"].instruction_id_list)
    assert not any(set(ids) <= set(REWRITES) for ids in first[first.subset == "other kinds"].instruction_id_list)
    other_seed = bench.sample(ifeval, set(REWRITES), settings.model_copy(update={"seed": 1}))
    assert not other_seed.key.equals(first.key)
    assert (bench.sample(ifeval, set(), BenchmarkSettings()).subset == "other kinds").all()  # nothing trained


def test_a_bad_benchmark_file_is_named(tmp_path, shared_data):
    rows = [json.loads(line) for line in (shared_data / "ifeval_dev.jsonl").read_text().splitlines()[:3]]
    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in rows))
    with pytest.raises(PreftuneError, match=r"missing columns \['key', 'instruction_id_list', 'kwargs'\]"):
        bench.load_prompts(BenchmarkSettings(data=str(missing)))
    rows[1]["instruction_id_list"] = ["startend:smile"]
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(
        PreftuneError, match=r"row 1, column 'instruction_id_list': unknown IFEval instruction 'startend:smile'"
    ):
        bench.load_prompts(BenchmarkSettings(data=str(unknown)))


def test_the_hub_unreachable_is_one_line_before_anything_trains(tmp_path, prefect_api):
    """Offline (the Hub's offline mode stands in for a closed network), the default Hub benchmark stops the
    run at once with one line saying how to give a local copy."""
    env = {**__import__("os").environ, **prefect_api, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--profile",
            "smoke",
            "--set",
            f"runs_dir={tmp_path / 'runs'}",
            "--set",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set",
            "evaluation.benchmark={data: google/IFEval}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    message = run.stderr.strip().splitlines()[-1]
    assert "google/IFEval" in message and "IFEVAL=FILE" in message and "Traceback" not in run.stderr
    assert not list((tmp_path / "runs").glob("*/reward-*")) and not list((tmp_path / "runs").glob("*/dpo"))


def test_a_policy_that_wraps_every_answer_in_quotes_is_refused_with_the_drift_named(ifeval):
    suite = bench.sample(ifeval, set(REWRITES), BenchmarkSettings(trained_prompts=0, other_prompts=30))
    questions = control_questions(ControlSettings(), seed=0)
    sample = pd.DataFrame(
        {"prompt": [[{"role": "user", "content": "Why is the sky blue?"}]], "instruction_id_list": [[]], "kwargs": [[]]}
    )
    plain = {
        "held-out": ["Sunlight scatters in the air."],
        "controls": [f"It is {keys[0]}." for keys in questions.reference],
        "benchmark": ["Here is what I would write about that, in a few plain sentences."] * len(suite),
    }
    planted = {"reference": plain, "tuned": {name: [f'"{text}"' for text in texts] for name, texts in plain.items()}}
    answers = {
        name: {model: (planted[model][name], np.full(len(planted[model][name]), 12)) for model in planted}
        for name in plain
    }
    controls, texts, lengths = control_prompts(answers, sample, questions, suite)  # the evaluation's own assembly
    assert len(controls) == len(texts["tuned"]) == 1 + len(questions) + 30
    changed = drift(controls, texts, lengths, "reference", Habits())
    quoted = changed.differences["unasked quotes"]
    asked = sum("quotes" in formats for formats in controls.asked)  # benchmark prompts that ask for quotes
    assert quoted.value == pytest.approx(1 - asked / len(controls)) and quoted.ci_low > 0.05
    assert changed.differences["facts named"].value == 0  # the same facts, quoted
    decision = decide(_improved_by_a_heard_judge(40, drift=changed.differences, checks_run=["control prompts"]), 0.0)
    assert decision.verdict == "regressed" and not decision.promoted
    assert "unasked quotes rose on control prompts" in decision.reason and "unasked quotes" in decision.explanation()
    assert decision.record()["promotion.harms"].startswith("unasked quotes")
    # One answer in forty quoted is within the tolerance: the same candidate otherwise passes.
    few = {model: list(texts["reference"]) for model in texts}
    few["tuned"][3] = f'"{few["tuned"][3]}"'
    within = drift(controls, few, lengths, "reference", Habits())
    assert decide(_improved_by_a_heard_judge(40, drift=within.differences), 0.0).verdict == "improved"


def _follows_case(row) -> str:
    """An answer that follows the prompts where case matters: capitals, capital words, sections, a phrase."""
    ids, kwargs = row.instruction_id_list, row.kwargs
    if "change_case:english_capital" in ids:
        return "THIS IS MY ANSWER. I HAVE WRITTEN IT IN ENGLISH, IN CAPITAL LETTERS, AS YOU ASKED ME TO DO."
    if "detectable_format:multiple_sections" in ids:
        values = kwargs[ids.index("detectable_format:multiple_sections")]
        return "\n".join(
            f"{values['section_spliter']} {n}\nA part of the answer." for n in range(1, values["num_sections"] + 1)
        )
    if "detectable_format:constrained_response" in ids:
        return "My answer is yes."
    least = max(
        [
            values["capital_frequency"]
            for kind, values in zip(ids, kwargs)
            if kind == "change_case:capital_word_frequency" and values["capital_relation"] == "at least"
        ]
        or [0]
    )
    return "Here are some words, " + " ".join(["VERY"] * least) + " and the rest in plain case."


def test_a_policy_that_answers_only_in_lowercase_is_refused_by_the_benchmark(ifeval):
    """Planted: a reference that follows IFEval's prompts where case matters, and a candidate that writes the
    same answers in lowercase. lm_eval's checkers score both; the benchmark's drop blocks promotion."""
    suite = bench.sample(
        ifeval[ifeval.instruction_id_list.map(lambda ids: set(ids) <= CASE_KINDS)], set(), BenchmarkSettings()
    )
    reference = [_follows_case(row) for row in suite.itertuples()]
    verdicts = {"reference": bench.score(suite, reference), "tuned": bench.score(suite, [a.lower() for a in reference])}
    result = bench.compare(suite, verdicts, "reference")
    loose = result.differences["IFEval other kinds, prompt loose"]
    assert len(suite) == 16 and loose.value < -0.6 and loose.ci_high < 0
    assert result.metrics["benchmark.ifeval.other_kinds.prompt_level_loose_acc_reference"] > 0.8
    by_kind = {row["kind"]: row for row in result.by_kind}
    assert (
        by_kind["change_case:english_capital"]["tuned"] == 0
        and by_kind["change_case:english_capital"]["reference"] == 1
    )
    decision = decide(_improved_by_a_heard_judge(40, benchmark=result.differences, checks_run=["IFEval"]), 0.0)
    assert decision.verdict == "regressed" and "IFEval other kinds, prompt loose is lower" in decision.reason


def test_profiles_without_a_benchmark_say_which_checks_ran():
    gate = _improved_by_a_heard_judge(40, checks_run=["24 control prompts"])
    decision = decide(gate, 0.0)
    assert decision.verdict == "improved" and "checked on: 24 control prompts" in decision.explanation()
    assert "checked on: nothing" in _improved_by_a_heard_judge(40).evidence()
