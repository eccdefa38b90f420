"""Held-out evaluation: is the tuned policy better than where it started, by the reward model's judgement?

Reports the reward model's pairwise accuracy, DPO's implicit-reward accuracy and margin, and, for a few
held-out prompts, the reward-judged win rate of the tuned policy over the reference (same greedy
decoding) with mean response lengths, since DPO is known to lengthen answers.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel, Field

from tasks.base import StrictModel, Workspace, retry_unless_user_error
from tasks.data import read_jsonl
from tasks.tracking import stage_run


class EvalSettings(StrictModel):
    generation_prompts: int = Field(8, ge=0)
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, gt=8)
    tie_tolerance: float = Field(1e-4, ge=0)  # reward differences this small count as ties


class EvalResult(BaseModel):
    metrics: dict[str, float]
    report_path: str
    examples_path: str
    mlflow_run_id: str


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class RewardScorer:
    """Scores (prompt, response) with the merged reward model, rendered as RewardTrainer saw them."""

    def __init__(self, model_dir: str, max_length: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def score(self, prompts: list[list[dict]], responses: list[str], batch_size: int = 8) -> list[float]:
        texts = [
            self.tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": response}], tokenize=False)
            for prompt, response in zip(prompts, responses)
        ]
        scores: list[float] = []
        for batch in _batches(texts, batch_size):
            encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     add_special_tokens=False, return_tensors="pt")
            scores.extend(self.model(**encoded).logits[:, 0].tolist())
        return scores


@torch.inference_mode()
def generate(model_dir: str, prompts: list[list[dict]], settings: EvalSettings) -> tuple[list[str], list[int]]:
    """Greedy responses and their lengths in tokens (up to the first end-of-turn)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    responses, lengths = [], []
    for batch in _batches(prompts, settings.batch_size):
        texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in batch]
        encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        output = model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        ended = (new_tokens == tokenizer.eos_token_id).int()
        lengths.extend(torch.where(ended.any(1), ended.argmax(1), new_tokens.shape[1]).tolist())
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [r.strip() for r in responses], lengths


def win_tie_loss(tuned: list[float], reference: list[float], tolerance: float) -> dict[str, float]:
    diffs = [a - b for a, b in zip(tuned, reference)]
    count = max(len(diffs), 1)
    return {
        "win_rate": sum(d > tolerance for d in diffs) / count,
        "tie_rate": sum(abs(d) <= tolerance for d in diffs) / count,
        "loss_rate": sum(d < -tolerance for d in diffs) / count,
    }


def markdown_report(metrics: dict[str, float], examples: pd.DataFrame) -> str:
    lines = ["# preftune evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    if not examples.empty:
        lines += ["", "## Examples (held-out prompts)", "", "| prompt | reference | reward | tuned | reward |", "|---|---|---|---|---|"]
        def cell(text):
            return str(text).replace("|", "\\|").replace("\n", " ")[:160]
        for row in examples.itertuples():
            lines.append(f"| {cell(row.prompt)} | {cell(row.reference)} | {row.reference_reward:.3f} "
                         f"| {cell(row.tuned)} | {row.tuned_reward:.3f} |")
    return "\n".join(lines) + "\n"


def evaluate_policy(settings: EvalSettings, eval_path: str, reference_dir: str, tuned_dir: str, reward_dir: str,
                    dpo_metrics: dict[str, float], stage_dir: Path, parent_run_id: str | None = None) -> EvalResult:
    pairs = read_jsonl(eval_path)
    prompts = [list(p) for p in pairs.prompt]
    scorer = RewardScorer(reward_dir, settings.max_length)
    chosen = scorer.score(prompts, [c[0]["content"] for c in pairs.chosen], settings.batch_size)
    rejected = scorer.score(prompts, [r[0]["content"] for r in pairs.rejected], settings.batch_size)
    metrics = {
        "reward_pairwise_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(chosen),
        "reward_mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(chosen),
        "dpo_implicit_reward_accuracy": dpo_metrics.get("eval_rewards_accuracies", float("nan")),
        "dpo_implicit_reward_margin": dpo_metrics.get("eval_rewards_margins", float("nan")),
        "eval_pairs": float(len(pairs)),
    }
    examples = pd.DataFrame()
    if settings.generation_prompts:
        sample = prompts[: settings.generation_prompts]
        reference, reference_lengths = generate(reference_dir, sample, settings)
        tuned, tuned_lengths = generate(tuned_dir, sample, settings)
        reference_rewards = scorer.score(sample, reference, settings.batch_size)
        tuned_rewards = scorer.score(sample, tuned, settings.batch_size)
        metrics |= win_tie_loss(tuned_rewards, reference_rewards, settings.tie_tolerance)
        metrics |= {
            "mean_reward_tuned": sum(tuned_rewards) / len(sample),
            "mean_reward_reference": sum(reference_rewards) / len(sample),
            "mean_length_tuned": sum(tuned_lengths) / len(sample),
            "mean_length_reference": sum(reference_lengths) / len(sample),
        }
        examples = pd.DataFrame({
            "prompt": [p[-1]["content"] for p in sample],
            "reference": reference, "reference_reward": reference_rewards,
            "tuned": tuned, "tuned_reward": tuned_rewards,
        })
    stage_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_report(metrics, examples)
    report_path, examples_path = stage_dir / "report.md", stage_dir / "examples.jsonl"
    report_path.write_text(report)
    examples.to_json(examples_path, orient="records", lines=True, force_ascii=False)
    with stage_run("evaluate", parent_run_id) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_text(report, "evaluation/report.md")
        if not examples.empty:
            mlflow.log_table(examples, "evaluation/examples.json")
    return EvalResult(metrics=metrics, report_path=str(report_path), examples_path=str(examples_path),
                      mlflow_run_id=run.info.run_id)


@task(name="evaluate", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error,
      tags=["evaluation"], cache_policy=(INPUTS - "parent_run_id") + TASK_SOURCE, persist_result=True)
def evaluate(settings: EvalSettings, eval_path: str, reference_dir: str, tuned_dir: str, reward_dir: str,
             dpo_metrics: dict[str, float], workspace: Workspace, parent_run_id: str | None = None) -> EvalResult:
    return evaluate_policy(settings, eval_path, reference_dir, tuned_dir, reward_dir, dpo_metrics,
                           workspace.stage("evaluate"), parent_run_id)
