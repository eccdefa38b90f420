"""The evaluation's report for people: the gate's evidence, the ground truth, the implicit reward, the
judges, the benchmark with its per-kind table, the drift on control prompts, and example answers."""

from __future__ import annotations

import pandas as pd

from tasks.drift import stem
from tasks.methods import ImplicitReward
from tasks.verdict import GateInput


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:160]


def markdown_report(
    metrics: dict[str, float],
    judges: list,
    gate: GateInput,
    examples: pd.DataFrame,
    method: str,
    implicit: ImplicitReward = "log_ratio",
    by_kind: list[dict] = (),
) -> str:
    def figure(name: str) -> str:
        if name not in metrics:
            return ""
        low, high = metrics.get(f"{name}.ci_low"), metrics.get(f"{name}.ci_high")
        return f"{metrics[name]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")

    lines = [
        "# preftune evaluation",
        "",
        f"Method: **{method}**. Figures are means with 95 % bootstrap intervals.",
        "",
        gate.evidence(),
        "",
    ]
    if gate.ground_truth is not None:
        lines += [
            "## Ground truth (IFEval's checkers on the held-out prompts' instructions, no judge involved)",
            "",
            "| policy | pass rate |",
            "|---|---|",
        ]
        lines += [
            f"| {name.removeprefix('ground_truth.pass_rate_')} | {figure(name)} |"
            for name in sorted(metrics)
            if name.startswith("ground_truth.pass_rate_") and not name.endswith((".ci_low", ".ci_high"))
        ]
        lines += [
            f"| difference, tuned - {gate.baseline} ({gate.ground_truth.n} prompts with instructions) "
            f"| {gate.ground_truth.text()} |",
            "",
        ]
    lines += _benchmark(metrics, gate, by_kind) + _drift(metrics, gate)
    if implicit is None:
        lines += [
            "## Implicit reward",
            "",
            f"{method} defines none. The reward models it was trained against "
            "score it below, but have no say in the gate: their win rates show how far it climbed them, not "
            "independent evidence (a referee or the ground truth is).",
            "",
        ]
    else:
        what = (
            "policy vs reference log-probabilities"
            if implicit == "log_ratio"
            else "the policy's mean token log-probability"
        )
        lines += [
            f"## Implicit reward ({what})",
            "",
            "| metric | value |",
            "|---|---|",
            f"| accuracy ({metrics.get('implicit_reward.pairs', 0):.0f} held-out pairs) "
            f"| {figure('implicit_reward.accuracy')} |",
            f"| accuracy on length-matched pairs ({metrics.get('implicit_reward.length_matched_pairs', 0):.0f}) "
            f"| {figure('implicit_reward.accuracy_length_matched')} |",
            f"| mean margin | {figure('implicit_reward.margin')} |",
            "| share of pairs whose chosen answer is longer "
            f"| {metrics.get('implicit_reward.chosen_longer_share', float('nan')):.3f} |",
            "",
        ]
    lines += [
        "## Judges",
        "",
        "A judge is heard only if its held-out accuracy is better than chance at 95 % and it is not "
        "a reward the policy was trained against. Length-controlled figures are read at a zero length gap.",
        "",
        "| aspect | weight | judge | held-out accuracy | length correlation | heard | win | tie | loss "
        "| length-controlled win | length-controlled improvement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    standing_of = {j.aspect: j for j in gate.judges}
    for judge in judges:
        a, role = judge.aspect, " (referee)" if judge.referee else " (training reward)" if judge.training_reward else ""
        heard_text = "yes" if standing_of[a].heard else f"no: {standing_of[a].reason}"
        lines.append(
            f"| {a}{role} | {judge.weight:g} | {judge.provenance} | {figure(f'{a}.pairwise_accuracy')} "
            f"| {metrics[f'{a}.length_correlation']:.2f} | {heard_text} "
            f"| {figure(f'{a}.win_rate')} | {figure(f'{a}.tie_rate')} | {figure(f'{a}.loss_rate')} "
            f"| {figure(f'{a}.lc_win_rate')} | {figure(f'{a}.lc_improvement')} |"
        )
    if any(j.heard for j in gate.judges):
        lines.append(
            f"| combined (heard) | | | | | | {figure('combined.win_rate')} | {figure('combined.tie_rate')} "
            f"| {figure('combined.loss_rate')} | {figure('combined.lc_win_rate')} "
            f"| {figure('combined.lc_improvement')} |"
        )
    shown = ("implicit_reward.", "combined.", "ground_truth.", "benchmark.", "drift.")
    lines += ["", "| other metric | value |", "|---|---|"]
    lines += [
        f"| {name} | {value:.4f} |"
        for name, value in sorted(metrics.items())
        if not name.startswith(shown)
        and not any(name.startswith(f"{j.aspect}.") for j in judges)
        and not name.endswith((".ci_low", ".ci_high"))
    ]
    return "\n".join(lines + _examples(examples)) + "\n"


def _benchmark(metrics: dict[str, float], gate: GateInput, by_kind: list[dict]) -> list[str]:
    if not gate.benchmark:
        return []
    lines = [
        "## Benchmark: IFEval (lm-evaluation-harness's checkers)",
        "",
        "Prompts whose every instruction is of a kind the policy trained on, the others, and all; candidate minus "
        f"{gate.baseline}, paired by prompt.",
        "",
        "| subset and metric | difference [95 %] | prompts |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name.removeprefix('IFEval ')} | {value.text()} | {value.n} |" for name, value in gate.benchmark.items()
    ]
    if by_kind:
        models = [key for key in by_kind[0] if key not in ("kind", "trained", "instructions")]
        lines += [
            "",
            "Per instruction kind (instruction-level loose accuracy):",
            "",
            "| kind | trained | instructions | " + " | ".join(models) + " |",
            "|---|---|---|" + "---|" * len(models),
        ]
        lines += [
            f"| {row['kind']} | {'yes' if row['trained'] else 'no'} | {row['instructions']} | "
            + " | ".join(f"{row[model]:.2f}" for model in models)
            + " |"
            for row in by_kind
        ]
    return lines + [""]


def _drift(metrics: dict[str, float], gate: GateInput) -> list[str]:
    if not gate.drift:
        return []
    models = sorted({name.rsplit("_", 1)[1] for name in metrics if name.startswith("drift.unasked_quotes_")})
    lines = [
        "## What else changed: control prompts that ask for nothing special",
        "",
        f"{metrics.get('drift.prompts', 0):.0f} control prompts (held-out plain questions, and benchmark prompts of "
        "kinds the policy did not train); a format counts only where the prompt does not ask for it.",
        "",
        "| check | " + " | ".join(models) + " | difference [95 %] |",
        "|---|" + "---|" * (len(models) + 1),
    ]
    for name, value in gate.drift.items():
        rates = " | ".join(f"{metrics.get(f'drift.{stem(name)}_{model}', float('nan')):.3f}" for model in models)
        lines.append(f"| {name} | {rates} | {value.text()} |")
    return lines + [""]


def _examples(examples: pd.DataFrame) -> list[str]:
    if examples.empty:
        return []
    scored = "reference_combined" in examples

    def score(row, name):
        return f" {getattr(row, f'{name}_combined'):.3f} |" if scored else ""

    lines = [
        "",
        "## Examples (random held-out prompts)",
        "",
        "| prompt | reference |" + (" reward |" if scored else "") + " tuned |" + (" reward |" if scored else ""),
        "|---|---|---|" + ("---|---|" if scored else ""),
    ]
    for row in examples.itertuples():
        lines.append(
            f"| {_cell(row.prompt)} | {_cell(row.reference)} |{score(row, 'reference')} "
            f"{_cell(row.tuned)} |{score(row, 'tuned')}"
        )
    return lines
