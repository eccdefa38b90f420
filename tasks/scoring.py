"""Scoring answers: a judge's reward for a (prompt, answer), the policy's implicit reward on held-out
pairs, a judge's accuracy on its own held-out pairs, and win rates of one policy's answers over another's.
Every accuracy and win rate comes with a 95 % bootstrap interval (tasks/stats.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tasks.answers import batches, load_model, shrinking
from tasks.methods import ImplicitReward
from tasks.stats import estimate, mean


def _answer(message) -> str:
    return message[0]["content"] if isinstance(message, (list, np.ndarray)) else message


class RewardScorer:
    """Scores (prompt, response) with a reward model, rendered as RewardTrainer saw them."""

    def __init__(self, source: str, max_length: int):
        self.model, self.tokenizer = load_model(source, "sequence-classification")
        self.device = self.model.device
        self.tokenizer.truncation_side = "left"  # an overlong prompt loses its start, never the response judged
        self.max_length = max_length

    @torch.inference_mode()
    def score(self, prompts: list[list[dict]], responses: list[str], batch_size: int = 8) -> np.ndarray:
        texts = [
            self.tokenizer.apply_chat_template(
                list(prompt) + [{"role": "assistant", "content": response}], tokenize=False
            )
            for prompt, response in zip(prompts, responses)
        ]
        scores: list[float] = []
        for batch in batches(texts, batch_size):
            encoded = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
                return_tensors="pt",
            ).to(self.device)
            scores.extend(self.model(**encoded).logits[:, 0].float().tolist())
        return np.array(scores)


@torch.inference_mode()
def answer_logps(
    model, tokenizer, prompts: list[list[dict]], answers: list[str], max_length: int, batch_size: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the log-probabilities of each answer's tokens after its prompt (as DPO scores them), and
    the answers' lengths in tokens. An overlong prompt loses its start; the answer is kept."""
    from trl.trainer.utils import selective_log_softmax

    sequences, starts = [], []
    for prompt, answer in zip(prompts, answers):
        head = tokenizer.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(
            list(prompt) + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False
        )
        shared = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        head, answer_ids = head[:shared], full[shared:]
        keep = max(max_length - len(answer_ids), 1)
        sequence = (head[-keep:] + answer_ids)[:max_length]
        sequences.append(sequence)
        starts.append(min(len(head), keep))
    logps = []
    for batch, batch_starts in zip(batches(sequences, batch_size), batches(starts, batch_size)):
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)], mask[row, : len(sequence)] = torch.tensor(sequence), 1
        # Logits from the position before the earliest answer token on: the prompts' others are never scored
        # (transformers' `logits_to_keep`; the vocabulary projection is a quarter of SmolLM2's forward pass).
        first = min(batch_starts) - 1
        logits = model(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=width - first
        ).logits.float()
        positions = torch.arange(first + 1, width)[None, :]
        scored = (positions >= torch.tensor(batch_starts)[:, None]) & (mask[:, first + 1 :] == 1)
        # TRL's log-softmax-and-gather, as its trainers score: row by row on a CPU, fused where Triton runs.
        token_logps = selective_log_softmax(
            logits[:, :-1], ids[:, first + 1 :].to(model.device), row_mask=scored.to(model.device)
        )
        logps.extend(token_logps.sum(-1).tolist())
    return np.array(logps), np.array([len(s) - start for s, start in zip(sequences, starts)])


def implicit_reward_metrics(
    policy,
    reference,
    pairs: pd.DataFrame,
    *,
    max_length: int,
    batch_size: int,
    length_match_ratio: float,
    seed: int = 0,
    kind: ImplicitReward = "log_ratio",
) -> dict[str, float]:
    """The method's implicit reward on held-out pairs, chosen minus rejected: log pi/pi_ref (DPO, KTO) or
    the policy's mean token log-probability (reference-free ORPO, SimPO). Its accuracy is also given on
    length-matched pairs, where a preference for longer answers cannot help."""
    prompts = [list(p) for p in pairs.prompt]
    answers = {side: [_answer(a) for a in pairs[side]] for side in ("chosen", "rejected")}
    logps, lengths = {}, {}
    scored = (("policy", policy),) if kind == "mean_logp" else (("policy", policy), ("reference", reference))
    for name, (model, tokenizer) in scored:
        for side in ("chosen", "rejected"):
            logps[name, side], lengths[side] = shrinking(
                lambda size: answer_logps(model, tokenizer, prompts, answers[side], max_length, size), batch_size
            )
    if kind == "mean_logp":
        margins = logps["policy", "chosen"] / np.maximum(lengths["chosen"], 1) - logps[
            "policy", "rejected"
        ] / np.maximum(lengths["rejected"], 1)
    else:
        margins = (logps["policy", "chosen"] - logps["reference", "chosen"]) - (
            logps["policy", "rejected"] - logps["reference", "rejected"]
        )
    matched = np.maximum(lengths["chosen"], lengths["rejected"]) <= length_match_ratio * np.minimum(
        lengths["chosen"], lengths["rejected"]
    )
    metrics = mean(margins > 0, seed).metrics("implicit_reward.accuracy")
    metrics |= mean(margins, seed).metrics("implicit_reward.margin")
    metrics["implicit_reward.pairs"] = float(len(margins))
    metrics["implicit_reward.length_matched_pairs"] = float(matched.sum())
    if matched.sum():
        metrics |= mean(margins[matched] > 0, seed).metrics("implicit_reward.accuracy_length_matched")
    metrics["implicit_reward.chosen_longer_share"] = float(np.mean(lengths["chosen"] > lengths["rejected"]))
    return metrics


def pairwise_metrics(aspect: str, scorer: RewardScorer, pairs: pd.DataFrame, batch_size: int, seed: int = 0):
    """A judge's held-out accuracy (with its interval), mean margin, accuracy by prompt length, and how
    much its scores follow the answers' lengths (Pearson, over both answers of every pair)."""
    prompts = [list(p) for p in pairs.prompt]
    answers = {side: [_answer(a) for a in pairs[side]] for side in ("chosen", "rejected")}
    chosen, rejected = (
        shrinking(lambda size: scorer.score(prompts, answers[side], size), batch_size)
        for side in ("chosen", "rejected")
    )
    margins = chosen - rejected
    metrics = mean(margins > 0, seed).metrics(f"{aspect}.pairwise_accuracy")
    metrics |= {f"{aspect}.mean_margin": float(np.mean(margins)), f"{aspect}.eval_pairs": float(len(pairs))}
    lengths = np.array(
        [
            len(scorer.tokenizer(text, add_special_tokens=False).input_ids)
            for text in answers["chosen"] + answers["rejected"]
        ]
    )
    scores = np.r_[chosen, rejected]
    correlation = np.corrcoef(scores, lengths)[0, 1] if np.ptp(lengths) and np.ptp(scores) else 0.0
    metrics[f"{aspect}.length_correlation"] = float(correlation)
    prompt_chars = pd.Series([sum(len(m["content"]) for m in p) for p in prompts])
    buckets = pd.qcut(prompt_chars.rank(method="first"), min(3, len(pairs)), labels=False).to_numpy()
    for bucket, name in enumerate(["short", "medium", "long"][: buckets.max() + 1]):
        metrics |= mean(margins[buckets == bucket] > 0, seed).metrics(f"{aspect}.accuracy_{name}_prompts")
    scale = (float(np.mean(np.r_[chosen, rejected])), float(np.std(np.r_[chosen, rejected])) or 1.0)
    return metrics, margins.tolist(), scale


def length_controlled_wins(
    differences: np.ndarray, length_gap: np.ndarray, rewards: np.ndarray, lengths: np.ndarray, tolerance: float
) -> float:
    """Win rate once the part of each reward difference that length explains is removed (the slope of
    reward on length over both policies' answers)."""
    slope = np.polyfit(lengths, rewards, 1)[0] if np.ptp(lengths) > 0 else 0.0
    return float(np.mean(differences - slope * length_gap > tolerance))


def win_rates(
    tuned: np.ndarray,
    baseline: np.ndarray,
    tuned_lengths: np.ndarray,
    baseline_lengths: np.ndarray,
    prefix: str,
    *,
    tie_tolerance: float,
    seed: int = 0,
) -> dict[str, float]:
    """Win/tie/loss of tuned over baseline per prompt, raw and length-controlled, with intervals."""
    difference, tolerance = tuned - baseline, tie_tolerance
    metrics = mean(difference > tolerance, seed).metrics(f"{prefix}win_rate")
    metrics |= mean(np.abs(difference) <= tolerance, seed).metrics(f"{prefix}tie_rate")
    metrics |= mean(difference < -tolerance, seed).metrics(f"{prefix}loss_rate")

    def controlled(tuned, baseline, tuned_lengths, baseline_lengths):
        return length_controlled_wins(
            tuned - baseline,
            tuned_lengths - baseline_lengths,
            np.r_[tuned, baseline],
            np.r_[tuned_lengths, baseline_lengths],
            tolerance,
        )

    metrics |= estimate(controlled, tuned, baseline, tuned_lengths, baseline_lengths, seed=seed).metrics(
        f"{prefix}lc_win_rate"
    )
    return metrics
