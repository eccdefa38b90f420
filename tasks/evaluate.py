"""Held-out evaluation: is the tuned policy better where it was asked to be, and not worse elsewhere?

Three sets of prompts, answered greedily by the tuned policy, its reference (and the champion, the
baseline when there is one), on the same prompts:
- held-out prompts of the training data (a seeded sample, split by question): the judges that earned
  their say score the answers (tasks/scoring.py, tasks/verdict.py), and where the prompts carry IFEval
  instructions, lm_eval's checkers give ground truth;
- a public benchmark, IFEval through lm-evaluation-harness (tasks/benchmark.py), split by whether the
  run trained the prompt's kinds of instruction;
- control prompts that ask for nothing special (held-out plain questions, the held-out prompts without
  instructions, and the benchmark's prompts of kinds not trained), read for habits nobody asked for
  (tasks/drift.py).
`gate_input` (tasks/verdict.py) gathers the evidence the promotion gate reads. The flow's evaluate stage
and `preftune evaluate` run this same code.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from tasks import benchmark as bench
from tasks.answers import generate, load_policy, load_tokenizer, shrinking
from tasks.base import PreftuneError, redact, retry_unless_user_error
from tasks.caching import EVALUATION_CACHE, stage_folder
from tasks.data import DataFile, read_jsonl, read_table
from tasks.drift import Habits, drift
from tasks.instructions import asked_formats, follows
from tasks.methods import ImplicitReward
from tasks.plan import inference_placement
from tasks.plots import margin_histograms, plt, training_curves
from tasks.report import markdown_report
from tasks.run_context import RunContext
from tasks.schemas import INSTRUCTION_COLUMNS
from tasks.scoring import RewardScorer, implicit_reward_metrics, pairwise_metrics, win_rates
from tasks.settings.data import DataSettings
from tasks.settings.evaluation import PLAIN_QUESTIONS, ControlSettings, EvalSettings
from tasks.stats import Estimate, mean
from tasks.tracking import stage_run
from tasks.trainer import RewardFunction
from tasks.verdict import GateInput, gate_input, standing


class Judge(RewardFunction):
    """A reward model that scores one aspect with its weight (what an online method trains against), and
    where its verdict comes from; its model may also be a models:/ URI here."""

    eval_path: str  # its held-out pairs (conversational)
    provenance: str  # e.g. "trained on 56 pairs of questions the policy never saw"
    training_reward: bool = False  # the policy was trained against it (online methods): it cannot certify it
    referee: bool = False


class EvalResult(BaseModel):
    metrics: dict[str, float]
    report_path: str
    examples_path: str
    gate: GateInput
    mlflow_run_id: str


def sample_prompts(pairs: pd.DataFrame, settings: EvalSettings) -> pd.DataFrame:
    """A seeded random sample of distinct held-out prompts (all of them when there are fewer), with the
    instructions each carries where the data has them."""
    distinct = pairs.assign(_key=pairs.prompt.map(lambda p: repr(list(p)))).drop_duplicates("_key")
    rng = np.random.default_rng(settings.seed)
    chosen = rng.choice(len(distinct), size=min(settings.generation_prompts, len(distinct)), replace=False)
    columns = ["prompt", *(name for name in INSTRUCTION_COLUMNS if name in pairs)]
    sample = distinct.iloc[sorted(chosen)][columns].reset_index(drop=True)
    sample["prompt"] = sample.prompt.map(list)
    return sample


def checked_answers(
    sample: pd.DataFrame, answers: dict[str, tuple[list[str], np.ndarray]]
) -> dict[str, np.ndarray] | None:
    """Ground truth where it can be computed: per policy, whether each answer follows every instruction its
    prompt carries (lm_eval's IFEval checkers, strict), on the prompts that carry any; None if none do."""
    if "instruction_id_list" not in sample:
        return None
    checkable = [i for i, ids in enumerate(sample.instruction_id_list) if len(ids)]
    if not checkable:
        return None
    users = [next((m["content"] for m in reversed(p) if m["role"] == "user"), "") for p in sample.prompt]
    return {
        name: np.array(
            [
                follows(users[i], list(sample.instruction_id_list[i]), list(sample.kwargs[i]), texts[i])
                for i in checkable
            ]
        )
        for name, (texts, _) in answers.items()
    }


def taught(train_path: str | None) -> tuple[set[str], Habits]:
    """The instruction kinds the policy's training pairs carry, and the habits to look for: the fixed ones
    and the opening words and end phrases those pairs asked for."""
    pairs = read_jsonl(train_path) if train_path else pd.DataFrame()
    if "instruction_id_list" not in pairs:
        return set(), Habits()
    values = [value for kwargs in pairs.kwargs for value in kwargs]
    return (
        {kind for ids in pairs.instruction_id_list for kind in ids},
        Habits(
            first_words=sorted({v["first_word"] for v in values if v.get("first_word")}),
            end_phrases=sorted({v["end_phrase"] for v in values if v.get("end_phrase")}),
        ),
    )


def control_questions(settings: ControlSettings, seed: int) -> pd.DataFrame:
    """The plain questions: `prompt` (chat messages) and `reference` (words a right answer names, or none)."""
    if settings.questions is None:
        return pd.DataFrame({"prompt": [], "reference": []})
    if settings.questions == PLAIN_QUESTIONS:
        from tasks.synthetic import control_questions as generated

        table = pd.DataFrame(generated())
    else:
        table = read_table(settings.questions)
        if "prompt" not in table:
            raise PreftuneError(
                f"{settings.questions}: control questions need a `prompt` column; found {sorted(table.columns)}"
            )
    references = table["reference"] if "reference" in table else pd.Series([[]] * len(table))
    frame = pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": str(text)}] for text in table.prompt],
            "reference": [
                [value] if isinstance(value, str) else list(value if value is not None else []) for value in references
            ],
        }
    )
    if settings.prompts and settings.prompts < len(frame):
        frame = frame.sample(n=settings.prompts, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def answer_all(models: dict, prompt_sets: dict[str, tuple[list, int]], batch_size: int) -> dict[str, dict]:
    """Every model's greedy answers and their lengths, per set of prompts (each with its own token cap)."""
    return {
        name: {
            model_name: shrinking(lambda size: generate(model, tokenizer, prompts, limit, size), batch_size)
            for model_name, (model, tokenizer) in models.items()
        }
        for name, (prompts, limit) in prompt_sets.items()
        if prompts
    }


def evaluate_policy(
    settings: EvalSettings,
    pairs_path: str,
    reference: str,
    policy: str,
    judges: list[Judge],
    champion_uri: str | None,
    out_dir: Path,
    parent_run_id: str | None = None,
    stage_runs: dict[str, str] | None = None,
    method: str = "dpo",
    implicit: ImplicitReward = "log_ratio",
    train_path: str | None = None,
    benchmark_path: str | None = None,
) -> EvalResult:
    """Evaluate `policy` against `reference` on held-out pairs, judged by `judges`, on the benchmark and on
    control prompts; log an MLflow run (nested under `parent_run_id` when given) and write the report under
    `out_dir`. `implicit` is the method's implicit reward (tasks/methods.py), or None where it defines none;
    `train_path`, the policy's training pairs, says which instruction kinds it was taught; `benchmark_path`,
    the benchmark's prompts as `prepare_benchmark` wrote them (with `settings.benchmark`)."""
    pairs = read_jsonl(pairs_path)
    metrics: dict[str, float] = {}
    models = {"reference": load_policy(reference), "tuned": load_policy(policy)}
    if implicit is not None:
        metrics |= implicit_reward_metrics(
            models["tuned"],
            models["reference"],
            pairs,
            max_length=settings.max_length,
            batch_size=settings.batch_size,
            length_match_ratio=settings.length_match_ratio,
            seed=settings.seed,
            kind=implicit,
        )

    scorers, margins, scales, standings = {}, {}, {}, []
    for judge in judges:
        scorers[judge.aspect] = RewardScorer(judge.model, settings.max_length)
        judge_metrics, margins[judge.aspect], scales[judge.aspect] = pairwise_metrics(
            judge.aspect, scorers[judge.aspect], read_jsonl(judge.eval_path), settings.batch_size, settings.seed
        )
        standings.append(
            standing(
                judge.aspect,
                judge.weight,
                Estimate.from_metrics(judge_metrics, f"{judge.aspect}.pairwise_accuracy", len(margins[judge.aspect])),
                judge_metrics[f"{judge.aspect}.length_correlation"],
                settings.min_judge_accuracy,
                judge.training_reward,
                judge.referee,
            )
        )
        metrics |= judge_metrics | {f"{judge.aspect}.heard": float(standings[-1].heard)}

    sample = sample_prompts(pairs, settings)
    kinds, habits = taught(train_path)
    questions = control_questions(settings.controls, settings.seed)
    suite = (
        bench.sample(read_jsonl(benchmark_path), kinds, settings.benchmark)
        if settings.benchmark and benchmark_path
        else None
    )
    if champion_uri:
        models["champion"] = load_policy(champion_uri)
    answers = answer_all(
        models,
        {
            "held-out": (list(sample.prompt), settings.max_new_tokens),
            "controls": (list(questions.prompt), settings.controls.max_new_tokens),
            "benchmark": (
                [[{"role": "user", "content": text}] for text in suite.prompt] if suite is not None else [],
                settings.benchmark.max_new_tokens if settings.benchmark else 0,
            ),
        },
        settings.batch_size,
    )
    del models
    baseline = "champion" if champion_uri else "reference"
    held_out, prompts = answers["held-out"], list(sample.prompt)
    lengths = {name: length for name, (_, length) in held_out.items()}
    examples = pd.DataFrame(
        {
            "prompt": [p[-1]["content"] for p in prompts],
            "messages": prompts,
            "reference": held_out["reference"][0],
            "tuned": held_out["tuned"][0],
        }
    )
    standardised = {}
    for judge in judges:
        aspect, (centre, spread) = judge.aspect, scales[judge.aspect]
        scored = {
            name: shrinking(lambda size: scorers[aspect].score(prompts, texts, size), settings.batch_size)
            for name, (texts, _) in held_out.items()
        }
        standardised[aspect] = {name: (scores - centre) / spread for name, scores in scored.items()}
        metrics |= win_rates(
            scored["tuned"],
            scored["reference"],
            lengths["tuned"],
            lengths["reference"],
            f"{aspect}.",
            tie_tolerance=settings.tie_tolerance,
            seed=settings.seed,
        )
        examples[f"reference_{aspect}"], examples[f"tuned_{aspect}"] = scored["reference"], scored["tuned"]
    metrics |= {
        "mean_length_tuned": float(np.mean(lengths["tuned"])),
        "mean_length_reference": float(np.mean(lengths["reference"])),
        "generation_prompts": float(len(prompts)),
        "judges_heard": float(sum(j.heard for j in standings)),
    }

    passes = checked_answers(sample, held_out)
    verdicts = {name: bench.score(suite, texts) for name, (texts, _) in answers.get("benchmark", {}).items()}
    result = bench.compare(suite, verdicts, baseline, settings.seed) if suite is not None else None
    controls, control_texts, control_lengths = control_prompts(answers, sample, questions, suite)
    changed = (
        drift(controls, control_texts, control_lengths, baseline, habits, settings.seed) if len(controls) else None
    )
    checks = (["IFEval"] if result else []) + ([f"{len(controls)} control prompts"] if changed else [])
    gate, combined = gate_input(
        baseline=baseline,
        baseline_label=champion_uri or "reference",
        standings=standings,
        judge_scores=standardised,
        lengths=lengths,
        combination=settings.combination,
        prompts=len(prompts),
        seed=settings.seed,
        passes=passes,
        benchmark=result.differences if result else None,
        drift=changed.differences if changed else None,
        checks_run=checks,
    )
    metrics |= (result.metrics if result else {}) | (changed.metrics if changed else {})
    for aspect, value in gate.judge_lc_improvement.items():
        metrics |= value.metrics(f"{aspect}.lc_improvement")
    if combined is not None:
        examples["reference_combined"], examples["tuned_combined"] = combined["reference"], combined["tuned"]
        metrics |= win_rates(
            combined["tuned"],
            combined["reference"],
            lengths["tuned"],
            lengths["reference"],
            "combined.",
            tie_tolerance=settings.tie_tolerance,
            seed=settings.seed,
        )
        metrics |= {
            "combined_reward_tuned": gate.candidate_score,
            "combined_reward_reference": float(np.mean(combined["reference"])),
        }
        metrics |= gate.improvement.metrics("combined.improvement") | gate.lc_improvement.metrics(
            "combined.lc_improvement"
        )
    if passes is not None:
        for name, passed in passes.items():
            metrics |= mean(passed.astype(float), settings.seed).metrics(f"ground_truth.pass_rate_{name}")
        metrics |= gate.ground_truth.metrics("ground_truth.improvement")
        metrics["ground_truth.prompts"] = float(gate.ground_truth.n)

    out_dir.mkdir(parents=True, exist_ok=True)
    by_kind = result.by_kind if result else []
    report = markdown_report(metrics, judges, gate, examples.head(settings.example_rows), method, implicit, by_kind)
    report_path, examples_path = out_dir / "report.md", out_dir / "examples.jsonl"
    report_path.write_text(report)
    examples.to_json(examples_path, orient="records", lines=True, force_ascii=False)
    with stage_run("evaluate", parent_run_id) as run:
        mlflow.log_params(
            {
                "evaluate.policy": redact(policy),
                "evaluate.reference": redact(reference),
                "evaluate.method": method,
                "evaluate.baseline": redact(gate.baseline),
                "evaluate.device": str(inference_placement()[0]),
            }
            | {f"evaluate.judge.{j.aspect}": redact(j.provenance)[:500] for j in judges}
        )
        mlflow.set_tags(
            {f"judge.{j.aspect}.heard": str(j.heard) for j in standings}
            | {f"judge.{j.aspect}.reason": j.reason for j in standings}
        )
        mlflow.log_metrics(metrics)
        mlflow.log_text(report, "evaluation/report.md")
        mlflow.log_table(examples, "evaluation/examples.json")
        if suite is not None:
            mlflow.log_table(benchmark_table(suite, answers["benchmark"], verdicts), "evaluation/benchmark_ifeval.json")
            mlflow.log_table(pd.DataFrame(by_kind), "evaluation/benchmark_ifeval_by_kind.json")
        figures = {"reward_margins.png": margin_histograms(margins)} if margins else {}
        if stage_runs:
            figures["training_curves.png"] = training_curves(stage_runs)
        for name, figure in figures.items():
            figure.savefig(out_dir / name, dpi=100)
            mlflow.log_figure(figure, f"evaluation/{name}")
            plt.close(figure)  # pyplot keeps every figure alive until closed
    return EvalResult(
        metrics=metrics,
        report_path=str(report_path),
        examples_path=str(examples_path),
        gate=gate,
        mlflow_run_id=run.info.run_id,
    )


def control_prompts(
    answers: dict, sample: pd.DataFrame, questions: pd.DataFrame, suite: pd.DataFrame | None
) -> tuple[pd.DataFrame, dict[str, list[str]], dict[str, np.ndarray]]:
    """The control prompts (held-out prompts that carry no instruction, the plain questions, and the
    benchmark's prompts of kinds not trained), each with the formats it asks for and the words a right
    answer names; and per model, the answers to them and their lengths, in the same order."""
    ids = sample["instruction_id_list"] if "instruction_id_list" in sample else pd.Series([[]] * len(sample))
    plain = [i for i, kinds in enumerate(ids) if not len(kinds)]
    other = suite[suite.subset == "other kinds"] if suite is not None else None
    controls = pd.concat(
        [
            pd.DataFrame({"asked": [set()] * len(plain), "reference": [[]] * len(plain)}),
            pd.DataFrame({"asked": [set()] * len(questions), "reference": list(questions.reference)}),
        ]
        + (
            [
                pd.DataFrame(
                    {
                        "asked": [asked_formats(kinds) for kinds in other.instruction_id_list],
                        "reference": [[]] * len(other),
                    }
                )
            ]
            if other is not None
            else []
        ),
        ignore_index=True,
    )
    texts, lengths = {}, {}
    for model, (held_texts, held_lengths) in answers["held-out"].items():
        parts = [([held_texts[i] for i in plain], held_lengths[plain])]
        if "controls" in answers:
            parts.append(answers["controls"][model])
        if other is not None and len(other):
            bench_texts, bench_lengths = answers["benchmark"][model]
            positions = other.index.to_numpy()  # the suite's rows are numbered from 0, as its answers are
            parts.append(([bench_texts[i] for i in positions], bench_lengths[positions]))
        texts[model] = [text for part_texts, _ in parts for text in part_texts]
        lengths[model] = np.concatenate([np.asarray(part_lengths) for _, part_lengths in parts])
    return controls, texts, lengths


def benchmark_table(suite: pd.DataFrame, answers: dict, verdicts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The benchmark per prompt: its key, subset, kinds, and each model's answer and verdicts."""
    table = suite[["key", "subset", "instruction_id_list"]].copy()
    for model, (texts, _) in answers.items():
        scored = verdicts[model]
        table[f"{model}_answer"] = texts
        table[f"{model}_prompt_loose"] = scored.prompt_level_loose_acc.astype(bool).to_numpy()
        table[f"{model}_prompt_strict"] = scored.prompt_level_strict_acc.astype(bool).to_numpy()
    return table


@task(
    name="evaluate",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_user_error,
    cache_policy=EVALUATION_CACHE,
    persist_result=True,
)
def evaluate(
    *,
    settings: EvalSettings,
    pairs_path: str,
    reference: str,
    policy: str,
    judges: list[Judge],
    champion_uri: str | None,
    run: RunContext,
    stage_runs: dict[str, str] | None = None,
    method: str = "dpo",
    implicit: ImplicitReward = "log_ratio",
    train_path: str | None = None,
    benchmark: DataFile | None = None,
) -> EvalResult:
    out_dir = stage_folder(run.workspace, "evaluate", links=("stage_runs",))
    return evaluate_policy(
        settings,
        pairs_path,
        reference,
        policy,
        judges,
        champion_uri,
        out_dir,
        run.parent_run_id,
        stage_runs,
        method,
        implicit,
        train_path,
        benchmark.path if benchmark else None,
    )


def evaluate_file(
    policy: str,
    reference: str,
    data: DataSettings,
    judges: dict[str, tuple[str, float]],
    settings: EvalSettings,
    out_root: Path,
) -> EvalResult:
    """`preftune evaluate`: every pair of a preference file (any schema the loader reads, after the
    recipe's filter) is held out; `judges` maps an aspect to (reward model, weight)."""
    from tasks.base import fingerprint
    from tasks.data import SplitData, apply_filter, format_split, load

    folder = out_root / fingerprint([policy, reference, data, judges, settings])
    loaded = load(data, folder / "data")
    filtered = apply_filter(loaded, data, folder / "data")
    everything = SplitData(train=filtered, eval=filtered)
    formatted = format_split(
        everything, load_tokenizer(reference), folder / "formatted", settings.max_length, data.overlong
    )
    judged = [
        Judge(aspect=aspect, weight=weight, model=model, eval_path=formatted.eval.path, provenance=f"given: {model}")
        for aspect, (model, weight) in judges.items()
    ]
    prompts = bench.write_prompts(settings.benchmark, folder / "benchmark").path if settings.benchmark else None
    return evaluate_policy(
        settings, formatted.eval.path, reference, policy, judged, None, folder, method="given", benchmark_path=prompts
    )
