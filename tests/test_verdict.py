"""The verdict: judges earn their say, length cannot buy a verdict, and no evidence promotes nothing.

The numbers here are planted (seeded), so each test knows the truth it checks against."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.settings.evaluation import CombinationSettings
from tasks.stats import Estimate, mean
from tasks.verdict import GateInput, at_zero_gap, combine, decide, gate_input, standing

RNG_SEED = 7


def _accuracy(correct: int, pairs: int) -> Estimate:
    return mean(np.r_[np.ones(correct), np.zeros(pairs - correct)])


def _gate(judges, standardised, baseline_gaps, passes=None, **harm_checks) -> GateInput:
    """What evaluate_policy builds (the same `gate_input`), for planted scores: answer lengths whose
    tuned-minus-reference gaps are `baseline_gaps`, and, where given, the checker's verdicts."""
    gaps = np.asarray(baseline_gaps, float)
    return gate_input(
        baseline="reference",
        standings=judges,
        judge_scores=standardised,
        lengths={"tuned": gaps, "reference": np.zeros_like(gaps)},
        combination=CombinationSettings(),
        prompts=len(gaps),
        passes=passes,
        **harm_checks,
    )[0]


def test_a_judge_at_chance_has_no_say_whatever_it_prints():
    rng = np.random.default_rng(RNG_SEED)
    good = standing("helpfulness", 1.0, _accuracy(86, 100), 0.1, 0.5)
    coin = standing("harmlessness", 1.0, _accuracy(56, 100), 0.0, 0.5)  # 0.56 [0.46, 0.66]: reaches 0.5
    assert good.heard and not coin.heard and "cannot be told from chance" in coin.reason
    prompts = 40
    helpful = {"tuned": rng.normal(0.5, 1, prompts), "reference": rng.normal(0, 1, prompts)}
    for loud in (1e3, -1e3):  # whatever the coin prints, huge wins or huge losses, the verdict does not move
        noise = {"tuned": rng.normal(loud, 1, prompts), "reference": np.zeros(prompts)}
        combined = combine({"helpfulness": helpful, "harmlessness": noise}, [good, coin], CombinationSettings())
        np.testing.assert_array_equal(combined["tuned"], helpful["tuned"])
    # Stricter bar: the same good judge is not heard when its lower bound must clear 0.8.
    assert not standing("helpfulness", 1.0, _accuracy(86, 100), 0.1, 0.8).heard


def test_no_reliable_judge_means_no_evidence_never_worse():
    rng = np.random.default_rng(RNG_SEED)
    coins = [standing(a, 1.0, _accuracy(52, 100), 0.0, 0.5) for a in ("helpfulness", "harmlessness")]
    scores = {j.aspect: {"tuned": rng.normal(-2, 0.1, 30), "reference": np.zeros(30)} for j in coins}  # "much worse"
    decision = decide(_gate(coins, scores, rng.integers(-5, 5, 30).astype(float)), 0.0)
    assert decision.verdict == "no evidence" and not decision.promoted
    assert "no judge earned a say" in decision.explanation() and "worse" not in decision.reason


def test_answers_that_only_got_shorter_do_not_buy_a_verdict():
    """A judge that likes short answers and a tuned policy that only cut its answers: raw, it 'improved';
    read at a zero length gap, it did not, and the gate does not promote."""
    rng = np.random.default_rng(RNG_SEED)
    prompts = 48
    gaps = -rng.integers(5, 40, prompts).astype(float)  # tuned answers 5-40 tokens shorter, same content
    judge = standing("helpfulness", 1.0, _accuracy(90, 100), -0.6, 0.5)
    tuned_minus_reference = -0.03 * gaps + rng.normal(0, 0.2, prompts)  # length alone explains the difference
    scores = {"helpfulness": {"tuned": tuned_minus_reference, "reference": np.zeros(prompts)}}
    gate = _gate([judge], scores, gaps)
    assert gate.improvement.ci_low > 0.3  # the old gate, on the raw mean, would have promoted it
    decision = decide(gate, 0.0)
    assert not decision.promoted and decision.verdict in ("not shown", "vetoed")
    assert abs(gate.lc_improvement.value) < 0.2
    # The same scores with a real content gain on top of the length effect are promoted.
    gained = {"helpfulness": {"tuned": tuned_minus_reference + 0.5, "reference": np.zeros(prompts)}}
    assert decide(_gate([judge], gained, gaps), 0.0).verdict == "improved"


def test_a_heard_judge_that_rates_it_worse_vetoes_whatever_the_combined_score():
    rng = np.random.default_rng(RNG_SEED)
    prompts = 64
    gaps = rng.normal(0, 10, prompts)
    judges = [
        standing("helpfulness", 1.0, _accuracy(86, 100), 0.2, 0.5),
        standing("harmlessness", 3.0, _accuracy(70, 100), 0.0, 0.5),
    ]
    scores = {
        "helpfulness": {"tuned": rng.normal(-0.4, 0.3, prompts), "reference": np.zeros(prompts)},
        "harmlessness": {"tuned": rng.normal(0.6, 0.3, prompts), "reference": np.zeros(prompts)},
    }
    gate = _gate(judges, scores, gaps)
    assert gate.lc_improvement.ci_low > 0  # the weighted score alone would promote
    decision = decide(gate, 0.0)
    assert decision.verdict == "vetoed" and not decision.promoted and decision.reason.startswith("helpfulness")
    # Ground truth vetoes too: the checker passing fewer of the tuned answers.
    fine = {
        "helpfulness": {"tuned": rng.normal(0.5, 0.3, prompts), "reference": np.zeros(prompts)},
        "harmlessness": scores["harmlessness"],
    }
    assert decide(_gate(judges, fine, gaps), 0.0).verdict == "improved"
    worse_truth = {"tuned": np.zeros(60, bool), "reference": np.r_[np.ones(20, bool), np.zeros(40, bool)]}
    assert decide(_gate(judges, fine, gaps, worse_truth), 0.0).verdict == "vetoed"


def test_a_training_reward_cannot_certify_the_policy_that_climbed_it():
    climbed = standing("helpfulness", 1.0, _accuracy(95, 100), 0.0, 0.5, training_reward=True)
    referee = standing("referee", 1.0, _accuracy(80, 100), 0.0, 0.5, referee=True)
    assert not climbed.heard and "trained against" in climbed.reason and referee.heard
    rng = np.random.default_rng(RNG_SEED)
    scores = {
        "helpfulness": {"tuned": rng.normal(3, 0.1, 30), "reference": np.zeros(30)},
        "referee": {"tuned": rng.normal(0, 0.5, 30), "reference": np.zeros(30)},
    }
    gaps = rng.normal(0, 5, 30)
    assert decide(_gate([climbed], scores, gaps), 0.0).verdict == "no evidence"
    with_referee = decide(_gate([climbed, referee], scores, gaps), 0.0)
    assert with_referee.verdict == "not shown" and "referee" in with_referee.explanation()


def test_piecewise_gives_flagged_prompts_to_the_safety_judge():
    judges = [
        standing("helpfulness", 1.0, _accuracy(86, 100), 0.0, 0.5),
        standing("harmlessness", 1.0, _accuracy(75, 100), 0.0, 0.5),
    ]
    scores = {
        "helpfulness": {"tuned": np.array([1.0, 1.0, 1.0]), "reference": np.array([0.0, 0.0, 0.0])},
        "harmlessness": {"tuned": np.array([-2.0, 0.5, 0.2]), "reference": np.array([0.3, 0.4, -1.5])},
    }
    piecewise = combine(scores, judges, CombinationSettings(rule="piecewise", safety_aspect="harmlessness"))
    # Prompt 0: the tuned answer is unsafe (-2 < -1); prompt 2: the reference's is: the safety judge decides both.
    np.testing.assert_allclose(piecewise["tuned"], [-2.0, 1.0, 0.2])
    np.testing.assert_allclose(piecewise["reference"], [0.3, 0.0, -1.5])
    weighted = combine(scores, judges, CombinationSettings())
    np.testing.assert_allclose(weighted["tuned"], [-0.5, 0.75, 0.6])
    with pytest.raises(ValueError, match="safety_aspect"):
        CombinationSettings(rule="piecewise")


def test_the_length_controlled_difference_is_read_at_a_zero_gap():
    gaps = np.array([-20.0, -10.0, 0.0, 10.0, 20.0])
    assert at_zero_gap(0.4 + 0.05 * gaps, gaps) == pytest.approx(0.4)
    assert at_zero_gap(np.full(4, 0.3), np.zeros(4)) == pytest.approx(0.3)
    assert at_zero_gap(np.full(4, 0.3), np.full(4, -8.0)) == 0.0  # every answer 8 tokens shorter: nothing credited
