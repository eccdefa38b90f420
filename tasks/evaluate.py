"""Held-out evaluation: is the tuned policy better than where it started, by the reward models' judgement?

Per reward aspect: pairwise accuracy on that aspect's held-out pairs (overall and by prompt length),
and the win/tie/loss of the tuned policy against the reference on held-out prompts (same greedy
decoding), raw and length-controlled, since DPO is known to lengthen answers. Aspects are combined
by their weights after standardising each reward model's scores. DPO's implicit-reward accuracy and
margin come from the DPO trainer's held-out evaluation. The current champion, when there is one, is
answered and scored on the same prompts: the promotion gate compares against it.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel, Field

from tasks.base import StrictModel, Workspace, retry_unless_user_error
from tasks.data import read_jsonl
from tasks.plan import inference_placement
from tasks.plots import margin_histograms, training_curves
from tasks.reward import RewardResult
from tasks.tracking import stage_run


class EvalSettings(StrictModel):
    generation_prompts: int = Field(8, ge=1)
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, gt=8)
    tie_tolerance: float = Field(1e-4, ge=0)  # reward differences this small count as ties
    example_rows: int = Field(8, ge=0)


class GateInput(BaseModel):
    """What the promotion gate compares: mean combined reward of the candidate and of the baseline."""

    candidate_score: float
    baseline_score: float
    baseline: str  # "reference" or the champion's model URI


class EvalResult(BaseModel):
    metrics: dict[str, float]
    report_path: str
    examples_path: str
    gate: GateInput
    mlflow_run_id: str


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class RewardScorer:
    """Scores (prompt, response) with a merged reward model, rendered as RewardTrainer saw them."""

    def __init__(self, model_dir: str, max_length: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.truncation_side = "left"  # an overlong prompt loses its start, never the response judged
        self.device, dtype = inference_placement()
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype,
                                                                        use_safetensors=True).to(self.device).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def score(self, prompts: list[list[dict]], responses: list[str], batch_size: int = 8) -> np.ndarray:
        texts = [
            self.tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": response}], tokenize=False)
            for prompt, response in zip(prompts, responses)
        ]
        scores: list[float] = []
        for batch in _batches(texts, batch_size):
            encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     add_special_tokens=False, return_tensors="pt").to(self.device)
            scores.extend(self.model(**encoded).logits[:, 0].float().tolist())
        return np.array(scores)


def load_policy(source: str):
    """A causal LM and its tokenizer from a folder or an MLflow model URI (the champion)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = inference_placement()
    if source.startswith("models:/"):
        components = mlflow.transformers.load_model(source, return_type="components")
        model, tokenizer = components["model"], components["tokenizer"]
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    return model.to(device, dtype).eval(), tokenizer


@torch.inference_mode()
def generate(source: str, prompts: list[list[dict]], settings: EvalSettings) -> tuple[list[str], np.ndarray]:
    """Greedy responses and their lengths in tokens (up to the first end-of-turn)."""
    model, tokenizer = load_policy(source)
    responses, lengths = [], []
    for batch in _batches(prompts, settings.batch_size):
        texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in batch]
        encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)
        output = model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        ended = (new_tokens == tokenizer.eos_token_id).int()
        lengths.extend(torch.where(ended.any(1), ended.argmax(1), new_tokens.shape[1]).cpu().tolist())
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [r.strip() for r in responses], np.array(lengths)


def win_tie_loss(differences: np.ndarray, tolerance: float, prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}win_rate": float(np.mean(differences > tolerance)),
        f"{prefix}tie_rate": float(np.mean(np.abs(differences) <= tolerance)),
        f"{prefix}loss_rate": float(np.mean(differences < -tolerance)),
    }


def length_controlled(differences: np.ndarray, length_gap: np.ndarray, rewards: np.ndarray,
                      lengths: np.ndarray) -> np.ndarray:
    """Reward differences with the part explained by length removed (slope of reward on length)."""
    slope = np.polyfit(lengths, rewards, 1)[0] if np.ptp(lengths) > 0 else 0.0
    return differences - slope * length_gap


def pairwise_metrics(aspect: str, scorer: RewardScorer, pairs: pd.DataFrame, batch_size: int):
    """Held-out accuracy, mean margin and accuracy by prompt length (tertiles) of one reward model."""
    prompts = [list(p) for p in pairs.prompt]
    chosen = scorer.score(prompts, [c[0]["content"] for c in pairs.chosen], batch_size)
    rejected = scorer.score(prompts, [r[0]["content"] for r in pairs.rejected], batch_size)
    margins = chosen - rejected
    metrics = {f"{aspect}.pairwise_accuracy": float(np.mean(margins > 0)),
               f"{aspect}.mean_margin": float(np.mean(margins)), f"{aspect}.eval_pairs": float(len(pairs))}
    prompt_chars = pd.Series([sum(len(m["content"]) for m in p) for p in prompts])
    buckets = pd.qcut(prompt_chars.rank(method="first"), min(3, len(pairs)), labels=False)
    for bucket, name in enumerate(["short", "medium", "long"][: buckets.max() + 1]):
        metrics[f"{aspect}.accuracy_{name}_prompts"] = float(np.mean(margins[buckets.to_numpy() == bucket] > 0))
    scale = (float(np.mean(np.r_[chosen, rejected])), float(np.std(np.r_[chosen, rejected])) or 1.0)
    return metrics, margins.tolist(), scale


def markdown_report(metrics: dict[str, float], aspects: list[str], gate: GateInput, examples: pd.DataFrame) -> str:
    lines = ["# preftune evaluation", "",
             f"Promotion gate input: candidate {gate.candidate_score:.3f} vs {gate.baseline} {gate.baseline_score:.3f} "
             "(mean combined reward on held-out prompts).", "",
             "| aspect | pairwise acc. | win | tie | loss | length-controlled win |", "|---|---|---|---|---|---|"]
    for aspect in aspects + ["combined"]:
        def value(name):
            number = metrics.get(f"{aspect}.{name}")
            return "" if number is None else f"{number:.3f}"
        lines.append(f"| {aspect} | {value('pairwise_accuracy')} | {value('win_rate')} | {value('tie_rate')} "
                     f"| {value('loss_rate')} | {value('lc_win_rate')} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items()) if "." not in name]
    if not examples.empty:
        def cell(text):
            return str(text).replace("|", "\\|").replace("\n", " ")[:160]
        lines += ["", "## Examples (held-out prompts)", "",
                  "| prompt | reference | reward | tuned | reward |", "|---|---|---|---|---|"]
        for row in examples.itertuples():
            lines.append(f"| {cell(row.prompt)} | {cell(row.reference)} | {row.reference_combined:.3f} "
                         f"| {cell(row.tuned)} | {row.tuned_combined:.3f} |")
    return "\n".join(lines) + "\n"


def evaluate_policy(settings: EvalSettings, policy_eval_path: str, reference_dir: str, tuned_dir: str,
                    rewards: list[RewardResult], dpo_metrics: dict[str, float], champion_uri: str | None,
                    stage_runs: dict[str, str], stage_dir: Path, parent_run_id: str | None = None) -> EvalResult:
    metrics: dict[str, float] = {
        "dpo_implicit_reward_accuracy": dpo_metrics.get("eval_rewards_accuracies", float("nan")),
        "dpo_implicit_reward_margin": dpo_metrics.get("eval_rewards_margins", float("nan")),
    }
    scorers, margins, scales = {}, {}, {}
    for reward in rewards:
        scorers[reward.aspect] = RewardScorer(reward.model_dir, settings.max_length)
        aspect_metrics, margins[reward.aspect], scales[reward.aspect] = pairwise_metrics(
            reward.aspect, scorers[reward.aspect], read_jsonl(reward.eval_path), settings.batch_size)
        metrics |= aspect_metrics

    prompts = [list(p) for p in read_jsonl(policy_eval_path).prompt[: settings.generation_prompts]]
    sources = {"reference": reference_dir, "tuned": tuned_dir} | ({"champion": champion_uri} if champion_uri else {})
    answers = {name: generate(source, prompts, settings) for name, source in sources.items()}
    total_weight = sum(r.weight for r in rewards)
    combined = {name: np.zeros(len(prompts)) for name in sources}
    examples = pd.DataFrame({"prompt": [p[-1]["content"] for p in prompts],
                             "reference": answers["reference"][0], "tuned": answers["tuned"][0]})
    gap = answers["tuned"][1] - answers["reference"][1]
    for reward in rewards:
        aspect, (mean, std) = reward.aspect, scales[reward.aspect]
        scored = {name: scorers[aspect].score(prompts, texts, settings.batch_size) for name, (texts, _) in answers.items()}
        for name in sources:
            combined[name] += reward.weight / total_weight * (scored[name] - mean) / std
        difference = scored["tuned"] - scored["reference"]
        lengths = np.r_[answers["tuned"][1], answers["reference"][1]]
        controlled = length_controlled(difference, gap, np.r_[scored["tuned"], scored["reference"]], lengths)
        metrics |= win_tie_loss(difference, settings.tie_tolerance, f"{aspect}.")
        metrics[f"{aspect}.lc_win_rate"] = float(np.mean(controlled > settings.tie_tolerance))
        examples[f"reference_{aspect}"], examples[f"tuned_{aspect}"] = scored["reference"], scored["tuned"]
    examples["reference_combined"], examples["tuned_combined"] = combined["reference"], combined["tuned"]
    metrics |= win_tie_loss(combined["tuned"] - combined["reference"], settings.tie_tolerance, "combined.")
    metrics |= {
        "combined_reward_tuned": float(np.mean(combined["tuned"])),
        "combined_reward_reference": float(np.mean(combined["reference"])),
        "mean_length_tuned": float(np.mean(answers["tuned"][1])),
        "mean_length_reference": float(np.mean(answers["reference"][1])),
    }
    baseline = "champion" if champion_uri else "reference"
    gate = GateInput(candidate_score=metrics["combined_reward_tuned"], baseline_score=float(np.mean(combined[baseline])),
                     baseline=champion_uri or "reference")

    stage_dir.mkdir(parents=True, exist_ok=True)
    shown = examples.head(settings.example_rows)
    report = markdown_report(metrics, [r.aspect for r in rewards], gate, shown)
    report_path, examples_path = stage_dir / "report.md", stage_dir / "examples.jsonl"
    report_path.write_text(report)
    examples.to_json(examples_path, orient="records", lines=True, force_ascii=False)
    with stage_run("evaluate", parent_run_id) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_text(report, "evaluation/report.md")
        mlflow.log_table(examples, "evaluation/examples.json")
        for name, figure in (("reward_margins.png", margin_histograms(margins)),
                             ("training_curves.png", training_curves(stage_runs))):
            figure.savefig(stage_dir / name, dpi=100)
            mlflow.log_figure(figure, f"evaluation/{name}")
    return EvalResult(metrics=metrics, report_path=str(report_path), examples_path=str(examples_path), gate=gate,
                      mlflow_run_id=run.info.run_id)


@task(name="evaluate", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error,
      tags=["evaluation"], cache_policy=(INPUTS - "parent_run_id" - "stage_runs") + TASK_SOURCE, persist_result=True)
def evaluate(settings: EvalSettings, policy_eval_path: str, reference_dir: str, tuned_dir: str,
             rewards: list[RewardResult], dpo_metrics: dict[str, float], champion_uri: str | None,
             stage_runs: dict[str, str], workspace: Workspace, parent_run_id: str | None = None) -> EvalResult:
    stage_dir = workspace.stage("evaluate", settings, policy_eval_path, reference_dir, tuned_dir, rewards, champion_uri)
    return evaluate_policy(settings, policy_eval_path, reference_dir, tuned_dir, rewards, dpo_metrics, champion_uri,
                           stage_runs, stage_dir, parent_run_id)
