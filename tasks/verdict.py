"""The verdict on a candidate policy: which judges may speak, and what their evidence says.

A judge (a reward model) earns its say: the 95 % interval of its pairwise accuracy on its own held-out
pairs must lie above `min_judge_accuracy` (0.5: better than chance), and it must not be a reward the
policy was trained against (the reward an online method climbed cannot also certify it). The others
are reported, never heard. The gate reads the length-controlled improvement: the per-prompt
differences with the effect of the length gap regressed out and read at a zero gap (as AlpacaEval's
length-controlled win rate does), so a shorter or longer answer cannot buy a verdict. A heard judge,
or the ground-truth checker where the data has one, that rates the candidate worse with 95 %
confidence vetoes it, whatever the combined score says.

The gate asks two questions. Better where asked: the heard judges' length-controlled improvement, and
the ground truth where the data has one, each with its lower bound above the margin. Not worse
elsewhere (`harms`): a benchmark difference significantly below 0, a significant rise of an
unasked format or of degenerate repetition beyond a tolerance, or facts named significantly less often
on control prompts, each blocks promotion, and the verdict names it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from tasks.settings.evaluation import CombinationSettings
from tasks.stats import Estimate, estimate, mean

Verdict = Literal["improved", "not shown", "worse", "vetoed", "no evidence", "regressed"]


class JudgeStanding(BaseModel):
    """One judge's credentials and whether they earned it a say."""

    aspect: str
    weight: float
    accuracy: Estimate  # pairwise accuracy on its own held-out pairs
    length_correlation: float  # of its scores with the answers' lengths, on those pairs
    training_reward: bool = False
    referee: bool = False
    heard: bool
    reason: str


def standing(
    aspect: str,
    weight: float,
    accuracy: Estimate,
    length_correlation: float,
    min_accuracy: float,
    training_reward: bool = False,
    referee: bool = False,
) -> JudgeStanding:
    """Hear a judge only if it is not the policy's training reward and is better than chance at 95 %."""
    figures = f"held-out accuracy {accuracy.text()} on {accuracy.n} pairs"
    if training_reward:
        heard, reason = (
            False,
            f"a reward the policy was trained against ({figures}): it shows how far the policy "
            "climbed it, not independent evidence",
        )
    elif accuracy.ci_low > min_accuracy:
        heard, reason = True, f"{figures}: lower bound above {min_accuracy:g}"
    else:
        heard, reason = False, f"{figures}: the interval reaches {min_accuracy:g}, so it cannot be told from chance"
    return JudgeStanding(
        aspect=aspect,
        weight=weight,
        accuracy=accuracy,
        length_correlation=length_correlation,
        training_reward=training_reward,
        referee=referee,
        heard=heard,
        reason=reason,
    )


def at_zero_gap(differences: np.ndarray, gaps: np.ndarray) -> float:
    """The intercept of `differences ~ a + b * gaps` (least squares): the difference a judge would see
    between answers of equal length. Where every gap is the same non-zero value, length and content
    cannot be told apart, and nothing is credited (0)."""
    if np.ptp(gaps) == 0:
        return float(np.mean(differences)) if gaps[0] == 0 else 0.0
    slope, intercept = np.polyfit(gaps, differences, 1)
    return float(intercept)


def length_controlled(differences: np.ndarray, gaps: np.ndarray, seed: int = 0) -> Estimate:
    """`at_zero_gap` with a paired bootstrap interval over prompts."""
    return estimate(at_zero_gap, differences, gaps, seed=seed)


def combine(
    standardised: dict[str, dict[str, np.ndarray]], judges: list[JudgeStanding], settings: CombinationSettings
) -> dict[str, np.ndarray] | None:
    """One score per policy and prompt from the heard judges (`standardised[aspect][policy]`), or None
    when no judge is heard. Piecewise: on a prompt where the safety judge scores any compared answer
    below the threshold, every policy's score on it is the safety judge's."""
    heard = [judge for judge in judges if judge.heard]
    if not heard:
        return None

    def weighted(group: list[JudgeStanding]) -> dict[str, np.ndarray]:
        total = sum(judge.weight for judge in group)
        policies = standardised[group[0].aspect]
        return {
            name: sum(judge.weight / total * standardised[judge.aspect][name] for judge in group) for name in policies
        }

    safety = (
        next((j for j in heard if j.aspect == settings.safety_aspect), None) if settings.rule == "piecewise" else None
    )
    others = [judge for judge in heard if judge is not safety]
    if safety is None or not others:
        return weighted(heard)
    safety_scores, rest = standardised[safety.aspect], weighted(others)
    flagged = np.min(np.stack(list(safety_scores.values())), axis=0) < settings.safety_threshold
    return {name: np.where(flagged, safety_scores[name], rest[name]) for name in rest}


class GateInput(BaseModel):
    """What the promotion gate reads: the candidate against the baseline, prompt by prompt, on the same
    held-out prompts: the judges' standing, the combined and per-judge length-controlled differences,
    and the ground truth where the data has one."""

    baseline: str  # "reference" or the champion's model URI
    judges: list[JudgeStanding]
    rule: str = "weighted"
    candidate_score: float | None = None  # mean combined score (None: no judge heard)
    baseline_score: float | None = None
    improvement: Estimate | None = None  # mean per-prompt combined difference
    lc_improvement: Estimate | None = None  # the same at a zero length gap: what the gate reads
    judge_lc_improvement: dict[str, Estimate] = Field(default_factory=dict)  # per heard judge
    ground_truth: Estimate | None = None  # checker pass-rate difference, candidate minus baseline
    prompts: int = 0
    benchmark: dict[str, Estimate] = Field(default_factory=dict)  # "IFEval other kinds, prompt loose" -> difference
    drift: dict[str, Estimate] = Field(default_factory=dict)  # control prompts: "unasked quotes" -> rate difference
    checks_run: list[str] = Field(default_factory=list)  # which checks of "not worse elsewhere" this evaluation ran

    def evidence(self) -> str:
        """What the gate reads, in one paragraph: the report, the decision and the model card all use it."""
        heard = [judge.aspect for judge in self.judges if judge.heard]
        if self.lc_improvement is None:
            text = "Better where asked: no judge earned a say (see the judges' table), so the judges show nothing."
        else:
            text = (
                f"Better where asked: combined improvement over {self.baseline} ({self.rule} rule over "
                f"{', '.join(heard)}), length-controlled {self.lc_improvement.text()}, raw "
                f"{self.improvement.text()}, on {self.prompts} held-out prompts."
            )
        if self.ground_truth is not None:
            text += (
                f" Ground truth (IFEval's checkers, {self.ground_truth.n} held-out prompts with instructions): "
                f"pass-rate difference {self.ground_truth.text()}."
            )
        return text + f" Not worse elsewhere, checked on: {', '.join(self.checks_run) or 'nothing'}."


def gate_input(
    *,
    baseline: str,
    baseline_label: str | None = None,
    standings: list[JudgeStanding],
    judge_scores: dict[str, dict[str, np.ndarray]],
    lengths: dict[str, np.ndarray],
    combination: CombinationSettings,
    prompts: int,
    seed: int = 0,
    passes: dict[str, np.ndarray] | None = None,
    benchmark: dict[str, Estimate] | None = None,
    drift: dict[str, Estimate] | None = None,
    checks_run: list[str] = (),
) -> tuple[GateInput, dict | None]:
    """The gate's input from the evidence, candidate ("tuned") against `baseline` ("reference" or
    "champion"), prompt by prompt: each judge's standardised scores per policy, the answers' lengths, the
    ground-truth checker's verdicts, the benchmark's and the control prompts' differences (`baseline_label`:
    what the baseline is, e.g. the champion's URI). Returns it with the combined scores per policy (None
    when no judge is heard)."""
    gaps = lengths["tuned"] - lengths[baseline]
    gate = GateInput(
        baseline=baseline_label or baseline,
        judges=standings,
        rule=combination.rule,
        prompts=prompts,
        judge_lc_improvement={
            aspect: length_controlled(scores["tuned"] - scores[baseline], gaps, seed)
            for aspect, scores in judge_scores.items()
        },
        benchmark=benchmark or {},
        drift=drift or {},
        checks_run=list(checks_run),
    )
    combined = combine(judge_scores, standings, combination)
    if combined is not None:
        gate.improvement = mean(combined["tuned"] - combined[baseline], seed)
        gate.lc_improvement = length_controlled(combined["tuned"] - combined[baseline], gaps, seed)
        gate.candidate_score, gate.baseline_score = (
            float(np.mean(combined["tuned"])),
            float(np.mean(combined[baseline])),
        )
    if passes is not None:
        gate.ground_truth = pass_rate_difference(passes["tuned"], passes[baseline], seed)
    return gate, combined


def harms(gate: GateInput, drift_tolerance: float) -> list[str]:
    """Every check of "not worse elsewhere" that the candidate fails, each naming its figure."""
    found = [f"{name} is lower ({value.text()})" for name, value in gate.benchmark.items() if value.ci_high < 0]
    for name, value in gate.drift.items():
        if name.startswith("unasked") or name == "repetition":
            if value.ci_low > drift_tolerance:  # the rise is beyond the tolerance at 95 %
                found.append(
                    f"{name} rose on control prompts by {value.text()}, beyond the tolerance of {drift_tolerance:g}"
                )
        elif name == "facts named" and value.ci_high < 0:
            found.append(f"control answers name the right fact less often ({value.text()})")
    return found


class PromotionDecision(BaseModel):
    promoted: bool
    verdict: Verdict
    reason: str
    gate: GateInput
    min_improvement: float
    drift_tolerance: float = 0.05
    harms: list[str] = Field(default_factory=list)  # the "not worse elsewhere" checks it failed

    def statement(self) -> str:
        """The gate's verdict in words: what it decided and why, the evidence it read and what it required.
        The one place it is composed: the flow's explanation, the version's description and the model
        card say it this way (the evaluation's report, which has no verdict yet, says the evidence)."""
        required = (
            f"Required: lower bounds above {self.min_improvement:g} (judges) and 0 (ground truth); no "
            f"benchmark significantly lower, no unasked format or repetition significantly up by more than "
            f"{self.drift_tolerance:g}, no fewer facts named. Worse elsewhere: "
            + ("; ".join(self.harms) if self.harms else "nothing")
            + "."
        )
        return f"Verdict: {self.verdict}. {self.reason}.\n\n{self.gate.evidence()}\n{required}"

    def explanation(self) -> str:
        """The statement under a heading, then tables of the checks and the judges: what was shown, on
        what, and by whom."""
        head = "passed the gate" if self.promoted else "not promoted"
        gate = self.gate
        lines = [f"**{head}**", "", self.statement(), ""]
        if gate.benchmark or gate.drift:
            lines += ["| check | difference, candidate - baseline [95 %] |", "|---|---|"]
            lines += [f"| {name} | {value.text()} |" for name, value in {**gate.benchmark, **gate.drift}.items()]
            lines.append("")
        lines += ["| judge | heard | why | length-controlled improvement |", "|---|---|---|---|"]
        for judge in gate.judges:
            lc = gate.judge_lc_improvement.get(judge.aspect)
            role = " (referee)" if judge.referee else " (training reward)" if judge.training_reward else ""
            lines.append(
                f"| {judge.aspect}{role} | {'yes' if judge.heard else 'no'} | {judge.reason} "
                f"| {lc.text() if lc else ''} |"
            )
        return "\n".join(lines)

    def record(self) -> dict[str, str]:
        """The decision as registry/run tags: verdict, intervals, and which judges were heard and why."""
        gate = self.gate
        tags = {
            "promotion.promoted": str(self.promoted),
            "promotion.verdict": self.verdict,
            "promotion.reason": self.reason[:5000],
            "promotion.baseline": gate.baseline,
            "promotion.rule": gate.rule,
            "promotion.checks_run": ", ".join(gate.checks_run) or "none",
            "promotion.harms": "; ".join(self.harms)[:5000] or "none",
        }
        for name in ("improvement", "lc_improvement", "ground_truth"):
            if (value := getattr(gate, name)) is not None:
                tags[f"promotion.{name}"] = f"{value.value:.6f}"
                tags[f"promotion.{name}_ci"] = f"[{value.ci_low:.6f}, {value.ci_high:.6f}]"
        for judge in gate.judges:
            tags[f"judge.{judge.aspect}.heard"] = str(judge.heard)
            tags[f"judge.{judge.aspect}.reason"] = judge.reason[:5000]
        return tags


def decide(gate: GateInput, min_improvement: float, drift_tolerance: float = 0.05) -> PromotionDecision:
    """Promote only on heard judges, on the length-controlled interval, with no veto, with the ground
    truth's gain shown where there is one, and with nothing significantly worse elsewhere."""
    found = harms(gate, drift_tolerance)
    asked = asked_for_gain(gate, min_improvement)
    if asked.verdict == "improved" and found:
        asked = asked.model_copy(
            update={
                "verdict": "regressed",
                "promoted": False,
                "reason": (f"better where asked ({asked.reason}), but worse elsewhere: {'; '.join(found)}"),
            }
        )
    elif found:
        asked = asked.model_copy(update={"reason": f"{asked.reason}; also worse elsewhere: {'; '.join(found)}"})
    return asked.model_copy(update={"harms": found, "drift_tolerance": drift_tolerance})


def asked_for_gain(gate: GateInput, min_improvement: float) -> PromotionDecision:
    """Better where asked: heard judges on the length-controlled interval, no veto, and the ground
    truth's lower bound above 0 where the data has one."""
    heard = [judge for judge in gate.judges if judge.heard]

    def decision(verdict: Verdict, reason: str) -> PromotionDecision:
        return PromotionDecision(
            promoted=verdict == "improved", verdict=verdict, reason=reason, gate=gate, min_improvement=min_improvement
        )

    if not heard or gate.lc_improvement is None:
        unheard = "; ".join(f"{j.aspect}: {j.reason}" for j in gate.judges) or "no judges were given"
        return decision("no evidence", f"no judge earned a say ({unheard}), so nothing can be concluded")
    vetoes = [
        f"{judge.aspect} rates it worse once length is controlled ({gate.judge_lc_improvement[judge.aspect].text()})"
        for judge in heard
        if gate.judge_lc_improvement[judge.aspect].ci_high < 0
    ]
    if gate.ground_truth is not None and gate.ground_truth.ci_high < 0:
        vetoes.append(f"the rule checker passes fewer of its answers ({gate.ground_truth.text()})")
    lc, judged_by = gate.lc_improvement, ", ".join(judge.aspect for judge in heard)
    if vetoes:
        return decision("vetoed", "; ".join(vetoes))
    truth = gate.ground_truth
    if lc.ci_low > min_improvement and truth is not None and truth.ci_low <= 0:
        return decision(
            "not shown",
            f"heard judges ({judged_by}) rate it better once length is controlled "
            f"({lc.text()}), but the ground truth does not show it: pass-rate difference "
            f"{truth.text()}, lower bound at or below 0",
        )
    if lc.ci_low > min_improvement:
        shown = f"; ground truth {truth.text()}" if truth is not None else ""
        return decision(
            "improved",
            f"heard judges ({judged_by}) rate it better once length is controlled: "
            f"{lc.text()}, lower bound above {min_improvement:g}{shown}",
        )
    if lc.ci_high < 0:
        return decision("worse", f"heard judges ({judged_by}) rate it worse once length is controlled: {lc.text()}")
    return decision(
        "not shown",
        f"heard judges ({judged_by}): the length-controlled improvement {lc.text()} has its "
        f"lower bound at or below {min_improvement:g}",
    )


def pass_rate_difference(candidate: np.ndarray, baseline: np.ndarray, seed: int = 0) -> Estimate:
    """Ground truth: the checker's pass rate of the candidate minus the baseline's, paired by prompt."""
    return mean(candidate.astype(float) - baseline.astype(float), seed)
