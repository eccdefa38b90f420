"""A public benchmark in every evaluation: IFEval, scored by lm-evaluation-harness's own IFEval code.

The tuned policy and its baseline answer the same prompts (greedy, the model's chat template); lm_eval's
`process_results` scores each answer at prompt and instruction level, strict and loose. Prompts are
split by whether every instruction they carry is of a kind the run trained on (`trained kinds`) or not
(`other kinds`): the first asks whether the taught skill transfers to a benchmark nobody tuned on, the
second whether anything else got worse. IFEval's prompts are only ever answered, never trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from tasks.base import PreftuneError, Workspace, redact, retry_unless_user_error
from tasks.data import DataFile, read_table, write_jsonl
from tasks.settings.evaluation import BenchmarkSettings
from tasks.stats import Estimate, estimate, mean

COLUMNS = ["key", "prompt", "instruction_id_list", "kwargs"]
SUBSETS = ("trained kinds", "other kinds", "all")
# lm_eval's metric -> (level, strictness)
METRICS = {
    "prompt_level_strict_acc": "prompt strict",
    "prompt_level_loose_acc": "prompt loose",
    "inst_level_strict_acc": "instruction strict",
    "inst_level_loose_acc": "instruction loose",
}


class BenchmarkResult(BaseModel):
    """Per prompt: which subset, each model's answer and verdicts; and the paired differences."""

    differences: dict[str, Estimate]  # "<subset>, <metric>" -> candidate minus baseline
    metrics: dict[str, float]
    by_kind: list[dict]  # per instruction kind: n and each model's instruction-level loose accuracy


def load_prompts(settings: BenchmarkSettings) -> pd.DataFrame:
    """IFEval's rows, checked: a missing column or an unknown instruction id is named with its row; an
    unreachable Hub is one line saying how to give a local copy."""
    from tasks.instructions import registry
    from tasks.schemas import instructions_of

    known = registry()  # first: without NLTK's tables the checkers cannot run, wherever the prompts come from
    try:
        table = read_table(settings.data, settings.split)
    except ConnectionError as error:  # `datasets` has retried already
        raise PreftuneError(
            f"evaluation.benchmark.data: cannot reach {redact(settings.data)!r} on the Hugging Face "
            f"Hub ({str(error).splitlines()[0][:200]}); offline, give a local copy of IFEval's prompts "
            "(--set evaluation.benchmark.data=FILE, or make run IFEVAL=FILE), or run without the "
            "benchmark (--set evaluation.benchmark=null)"
        ) from None
    if missing := [column for column in COLUMNS if column not in table]:
        raise PreftuneError(
            f"{settings.data}: missing columns {missing} for the IFEval benchmark; found {sorted(table.columns)}"
        )
    return pd.DataFrame(
        [
            {"key": row["key"], "prompt": row["prompt"]} | instructions_of(row, f"{settings.data}, row {index}", known)
            for index, row in enumerate(table[COLUMNS].to_dict("records"))
        ]
    )


def sample(prompts: pd.DataFrame, trained: set[str], settings: BenchmarkSettings) -> pd.DataFrame:
    """A seeded sample of each subset, with its `subset` column; in the table's order."""
    is_trained = prompts.instruction_id_list.map(lambda ids: bool(trained) and set(ids) <= trained)
    rng = np.random.default_rng(settings.seed)
    parts = []
    for subset, mask, wanted in (
        ("trained kinds", is_trained, settings.trained_prompts),
        ("other kinds", ~is_trained, settings.other_prompts),
    ):
        part = prompts[mask]
        if wanted is not None and wanted < len(part):
            part = part.iloc[sorted(rng.choice(len(part), size=wanted, replace=False))]
        parts.append(part.assign(subset=subset))
    return pd.concat(parts).reset_index(drop=True)


def score(prompts: pd.DataFrame, answers: list[str]) -> pd.DataFrame:
    """lm_eval's verdicts on each answer: one row per prompt, one column per IFEval metric."""
    from tasks.instructions import check

    return pd.DataFrame(
        [
            check(row.prompt, row.instruction_id_list, row.kwargs, answer)
            for row, answer in zip(prompts.itertuples(), answers)
        ]
    )


def difference(candidate: pd.Series, baseline: pd.Series, seed: int) -> Estimate:
    """Candidate minus baseline, paired by prompt: a mean over prompts (prompt level) or over all their
    instructions (instruction level, as lm_eval aggregates it), with a bootstrap interval over prompts."""
    if isinstance(candidate.iloc[0], (list, np.ndarray)):
        passed = np.array([np.sum(c) - np.sum(b) for c, b in zip(candidate, baseline)], float)
        counts = np.array([len(c) for c in candidate], float)
        return estimate(lambda p, n: p.sum() / n.sum(), passed, counts, seed=seed)
    return mean(candidate.astype(float).to_numpy() - baseline.astype(float).to_numpy(), seed)


def accuracy(values: pd.Series) -> float:
    if isinstance(values.iloc[0], (list, np.ndarray)):
        return float(sum(np.sum(v) for v in values) / max(sum(len(v) for v in values), 1))
    return float(values.astype(float).mean())


def compare(prompts: pd.DataFrame, scores: dict[str, pd.DataFrame], baseline: str, seed: int = 0) -> BenchmarkResult:
    """Each model's accuracies per subset and metric, and the candidate's paired differences with the
    baseline ("tuned" against `baseline`); per instruction kind, the loose instruction-level accuracy."""
    metrics, differences = {}, {}
    for subset in SUBSETS:
        rows = prompts.index if subset == "all" else prompts.index[prompts.subset == subset]
        if not len(rows):
            continue
        slug = subset.replace(" ", "_")
        metrics[f"benchmark.ifeval.{slug}.prompts"] = float(len(rows))
        for metric, label in METRICS.items():
            name = f"benchmark.ifeval.{slug}.{metric}"
            for model, table in scores.items():
                metrics[f"{name}_{model}"] = accuracy(table.loc[rows, metric])
            found = difference(scores["tuned"].loc[rows, metric], scores[baseline].loc[rows, metric], seed)
            differences[f"IFEval {subset}, {label}"] = found
            metrics |= found.metrics(f"{name}.difference")
    by_kind = []
    for kind in sorted({kind for ids in prompts.instruction_id_list for kind in ids}):
        passed = {
            model: [
                follows[ids.index(kind)]
                for ids, follows in zip(prompts.instruction_id_list, table.inst_level_loose_acc)
                if kind in ids
            ]
            for model, table in scores.items()
        }
        by_kind.append(
            {
                "kind": kind,
                "trained": bool(
                    (prompts.subset == "trained kinds")[prompts.instruction_id_list.map(lambda ids: kind in ids)].any()
                ),
                "instructions": len(passed["tuned"]),
            }
            | {model: float(np.mean(values)) for model, values in passed.items()}
        )
    return BenchmarkResult(differences=differences, metrics=metrics, by_kind=by_kind)


def write_prompts(settings: BenchmarkSettings, folder: Path) -> DataFile:
    return write_jsonl(load_prompts(settings), folder / "ifeval.jsonl")


@task(
    name="load-benchmark",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_user_error,
    persist_result=False,
)
def prepare_benchmark(settings: BenchmarkSettings, workspace: Workspace) -> DataFile:
    """The benchmark's prompts, read and checked before anything trains (not cached: a Hub dataset may
    change under its name; the file's digest keys the evaluation; nor persisted: a failure's record would
    keep the reading library's error, which may name the source with its credential)."""
    return write_prompts(settings, workspace.stage("benchmark", settings))
