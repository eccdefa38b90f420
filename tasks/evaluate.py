"""Held-out evaluation: is the tuned policy better than where it started, and how sure are we?

Every accuracy and win rate comes with a 95 % bootstrap interval (tasks/stats.py):
- DPO's implicit reward, computed here from the policy's and the reference's log-probabilities on the
  held-out pairs: accuracy (overall and on length-matched pairs, so a length preference cannot pass
  for quality) and margin;
- per judge (a reward model per aspect, trained on questions the policy never saw, or given): pairwise
  accuracy on its held-out pairs, overall and by prompt length;
- generations on a seeded random sample of held-out prompts, policy against reference (and the current
  champion): win/tie/loss per aspect, raw and length-controlled, and the combined score of the judges
  that earned a say (tasks/verdict.py), standardised per judge;
- where the data's prompts carry verifiable instructions, the rule checker's pass rates: ground truth
  that no judge decides.
The promotion gate reads the length-controlled combined improvement (tasks/verdict.py). The flow's
evaluate stage and `preftune evaluate` run this same code.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from prefect import task
from pydantic import BaseModel, Field

from tasks.base import MayHoldCredentials, PreftuneError, StrictModel, Workspace, redact, retry_unless_user_error
from tasks.caching import EVALUATION_CACHE
from tasks.data import DataSettings, read_jsonl
from tasks.instructions import verify
from tasks.methods import ImplicitReward
from tasks.plan import inference_placement
from tasks.plots import margin_histograms, plt, training_curves
from tasks.stats import Estimate, estimate, mean
from tasks.tracking import stage_run
from tasks.verdict import CombinationSettings, GateInput, combine, length_controlled, pass_rate_difference, standing


class RefereeSettings(StrictModel):
    """A judge that is not a training reward: it scores the policy's answers and earns its say on the
    policy's held-out pairs like any judge."""

    model: MayHoldCredentials = Field(description="A sequence-classification reward model: a folder, a Hub id or a models:/ URI.")
    weight: float = Field(1.0, gt=0, description="Its share of the combined score, relative to the other heard judges.")


class EvalSettings(StrictModel):
    """The held-out evaluation: what is scored and generated, how, and who is heard (tasks/verdict.py)."""

    generation_prompts: int = Field(32, ge=1, description="Held-out prompts both policies answer, a seeded random "
                                                          "sample (all of them when there are fewer).")
    max_new_tokens: int = Field(64, gt=0, description="Tokens each greedy answer may run to.")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass when scoring and generating; halved "
                                                 "after an out-of-memory error.")
    max_length: int = Field(512, gt=8, description="Tokens per scored sequence, prompt and answer together; an "
                                                   "overlong prompt loses its start, the answer is kept.")
    tie_tolerance: float = Field(1e-4, ge=0, description="Score differences at most this large count as ties (in "
                                                         "the judge's units; in spreads for the combined score).")
    length_match_ratio: float = Field(1.25, ge=1, description="Pairs whose answers' token lengths are within this "
                                                              "ratio count as length-matched.")
    example_rows: int = Field(8, ge=0, description="Example answers shown in the report (examples.jsonl has all).")
    seed: int = Field(0, description="Seed of the prompt sample and of the bootstrap intervals.")
    min_judge_accuracy: float = Field(
        0.5, ge=0.5, lt=1, description="A judge is heard only if the 95 % lower bound of its held-out pairwise "
                                       "accuracy is above this (0.5: better than chance).")
    combination: CombinationSettings = Field(default_factory=CombinationSettings,
                                             description="How the heard judges' scores combine into one.")
    referees: dict[str, RefereeSettings] = Field(
        default_factory=dict, description="Judges that are no training reward, by name (e.g. a public reward model).")


class Judge(BaseModel):
    """A reward model that scores one aspect, and where its verdict comes from."""

    aspect: str
    weight: float
    model: str  # a folder, a hub id or a models:/ URI of a sequence-classification model
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


def shrinking(run, batch_size: int):
    """`run(batch_size)`, halving the batch after an out-of-memory error until it fits (as the training
    retry halves the micro-batch); the failed attempt's tensors are freed before the next one. accelerate
    tells the out-of-memory errors of every backend (CUDA, XPU, MPS, the CPU allocator) and clears the
    device's cache. Its `find_executable_batch_size` is not used: it runs a full `gc.collect()` before
    every call, even when the batch fits (0.7-0.9 s with this stack imported; an evaluation makes a dozen)."""
    while True:
        try:
            return run(batch_size)
        except Exception as error:
            if not should_reduce_batch_size(error):
                raise
            if batch_size == 1:
                raise PreftuneError("out of memory while evaluating at batch size 1: lower evaluation.max_length "
                                    "or evaluation.max_new_tokens") from None
        batch_size //= 2
        clear_device_cache(garbage_collection=True)  # here, once the failed attempt's frames are gone


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _answer(message) -> str:
    return message[0]["content"] if isinstance(message, (list, np.ndarray)) else message


def load_policy(source: str):
    """A causal LM and its tokenizer from a folder, hub id or MLflow model URI, on the inference device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = inference_placement()
    try:
        if source.startswith("models:/"):
            components = mlflow.transformers.load_model(source, return_type="components")
            model, tokenizer = components["model"], components["tokenizer"]
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, mlflow.exceptions.MlflowException) as error:
        raise PreftuneError(f"cannot load the model {source!r}: {str(error).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device, dtype).eval(), tokenizer


class RewardScorer:
    """Scores (prompt, response) with a reward model, rendered as RewardTrainer saw them."""

    def __init__(self, source: str, max_length: int):
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        self.device, dtype = inference_placement()
        try:
            with suppress_seqcls_warning():  # a judge that is an adapter over a causal LM: its head comes with it
                self.model, self.tokenizer = self._load(source, dtype)
        except (OSError, ValueError, mlflow.exceptions.MlflowException) as error:
            raise PreftuneError(f"cannot load the reward model {source!r}: {str(error).splitlines()[0]}") from None
        self.model = self.model.to(self.device, dtype).eval()
        self.tokenizer.truncation_side = "left"  # an overlong prompt loses its start, never the response judged
        self.max_length = max_length

    @staticmethod
    def _load(source: str, dtype):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if source.startswith("models:/"):
            components = mlflow.transformers.load_model(source, return_type="components")
            return components["model"], components["tokenizer"]
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype, use_safetensors=True)
        return model, AutoTokenizer.from_pretrained(source)

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


@torch.inference_mode()
def answer_logps(model, tokenizer, prompts: list[list[dict]], answers: list[str], max_length: int,
                 batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the log-probabilities of each answer's tokens after its prompt (as DPO scores them), and
    the answers' lengths in tokens. An overlong prompt loses its start; the answer is kept."""
    from trl.trainer.utils import selective_log_softmax

    sequences, starts = [], []
    for prompt, answer in zip(prompts, answers):
        head = tokenizer.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": answer}],
                                             tokenize=True, return_dict=False)
        shared = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        head, answer_ids = head[:shared], full[shared:]
        keep = max(max_length - len(answer_ids), 1)
        sequence = (head[-keep:] + answer_ids)[:max_length]
        sequences.append(sequence)
        starts.append(min(len(head), keep))
    logps = []
    for batch, batch_starts in zip(_batches(sequences, batch_size), _batches(starts, batch_size)):
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids[row, :len(sequence)], mask[row, :len(sequence)] = torch.tensor(sequence), 1
        # Logits from the position before the earliest answer token on: the prompts' others are never scored
        # (transformers' `logits_to_keep`; the vocabulary projection is a quarter of SmolLM2's forward pass).
        first = min(batch_starts) - 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       logits_to_keep=width - first).logits.float()
        positions = torch.arange(first + 1, width)[None, :]
        scored = (positions >= torch.tensor(batch_starts)[:, None]) & (mask[:, first + 1:] == 1)
        # TRL's log-softmax-and-gather, as its trainers score: row by row on a CPU, fused where Triton runs.
        token_logps = selective_log_softmax(logits[:, :-1], ids[:, first + 1:].to(model.device),
                                            row_mask=scored.to(model.device))
        logps.extend(token_logps.sum(-1).tolist())
    return np.array(logps), np.array([len(s) - start for s, start in zip(sequences, starts)])


def implicit_reward_metrics(policy, reference, pairs: pd.DataFrame, settings: EvalSettings,
                            kind: ImplicitReward = "log_ratio") -> dict[str, float]:
    """The method's implicit reward on held-out pairs, chosen minus rejected: log pi/pi_ref (DPO, KTO) or
    the policy's mean token log-probability (reference-free ORPO, SimPO). Its accuracy is also given on
    length-matched pairs, where a preference for longer answers cannot help."""
    prompts = [list(p) for p in pairs.prompt]
    answers = {side: [_answer(a) for a in pairs[side]] for side in ("chosen", "rejected")}
    logps, lengths = {}, {}
    scored = (("policy", policy),) if kind == "mean_logp" else (("policy", policy), ("reference", reference))
    for name, (model, tokenizer) in scored:
        for side in ("chosen", "rejected"):
            logps[name, side], lengths[side] = shrinking(lambda size: answer_logps(
                model, tokenizer, prompts, answers[side], settings.max_length, size), settings.batch_size)
    if kind == "mean_logp":
        margins = logps["policy", "chosen"] / np.maximum(lengths["chosen"], 1) - logps["policy", "rejected"] / np.maximum(
            lengths["rejected"], 1)
    else:
        margins = (logps["policy", "chosen"] - logps["reference", "chosen"]) - (
            logps["policy", "rejected"] - logps["reference", "rejected"])
    matched = np.maximum(lengths["chosen"], lengths["rejected"]) <= settings.length_match_ratio * np.minimum(
        lengths["chosen"], lengths["rejected"])
    metrics = mean(margins > 0, settings.seed).metrics("implicit_reward.accuracy")
    metrics |= mean(margins, settings.seed).metrics("implicit_reward.margin")
    metrics["implicit_reward.pairs"] = float(len(margins))
    metrics["implicit_reward.length_matched_pairs"] = float(matched.sum())
    if matched.sum():
        metrics |= mean(margins[matched] > 0, settings.seed).metrics("implicit_reward.accuracy_length_matched")
    metrics["implicit_reward.chosen_longer_share"] = float(np.mean(lengths["chosen"] > lengths["rejected"]))
    return metrics


def pairwise_metrics(aspect: str, scorer: RewardScorer, pairs: pd.DataFrame, batch_size: int, seed: int = 0):
    """A judge's held-out accuracy (with its interval), mean margin, accuracy by prompt length, and how
    much its scores follow the answers' lengths (Pearson, over both answers of every pair)."""
    prompts = [list(p) for p in pairs.prompt]
    answers = {side: [_answer(a) for a in pairs[side]] for side in ("chosen", "rejected")}
    chosen, rejected = (shrinking(lambda size: scorer.score(prompts, answers[side], size), batch_size)
                        for side in ("chosen", "rejected"))
    margins = chosen - rejected
    metrics = mean(margins > 0, seed).metrics(f"{aspect}.pairwise_accuracy")
    metrics |= {f"{aspect}.mean_margin": float(np.mean(margins)), f"{aspect}.eval_pairs": float(len(pairs))}
    lengths = np.array([len(scorer.tokenizer(text, add_special_tokens=False).input_ids)
                        for text in answers["chosen"] + answers["rejected"]])
    scores = np.r_[chosen, rejected]
    correlation = np.corrcoef(scores, lengths)[0, 1] if np.ptp(lengths) and np.ptp(scores) else 0.0
    metrics[f"{aspect}.length_correlation"] = float(correlation)
    prompt_chars = pd.Series([sum(len(m["content"]) for m in p) for p in prompts])
    buckets = pd.qcut(prompt_chars.rank(method="first"), min(3, len(pairs)), labels=False).to_numpy()
    for bucket, name in enumerate(["short", "medium", "long"][: buckets.max() + 1]):
        metrics |= mean(margins[buckets == bucket] > 0, seed).metrics(f"{aspect}.accuracy_{name}_prompts")
    scale = (float(np.mean(np.r_[chosen, rejected])), float(np.std(np.r_[chosen, rejected])) or 1.0)
    return metrics, margins.tolist(), scale


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], settings: EvalSettings,
             batch_size: int | None = None) -> tuple[list[str], np.ndarray]:
    """Greedy responses, batched, and their lengths in tokens (up to the first end-of-turn)."""
    responses, lengths = [], []
    for batch in _batches(prompts, batch_size or settings.batch_size):
        texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in batch]
        encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)
        output = model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        ended = (new_tokens == tokenizer.eos_token_id).int()
        lengths.extend(torch.where(ended.any(1), ended.argmax(1), new_tokens.shape[1]).cpu().tolist())
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [r.strip() for r in responses], np.array(lengths)


def length_controlled_wins(differences: np.ndarray, length_gap: np.ndarray, rewards: np.ndarray,
                           lengths: np.ndarray, tolerance: float) -> float:
    """Win rate once the part of each reward difference that length explains is removed (the slope of
    reward on length over both policies' answers)."""
    slope = np.polyfit(lengths, rewards, 1)[0] if np.ptp(lengths) > 0 else 0.0
    return float(np.mean(differences - slope * length_gap > tolerance))


def win_rates(tuned: np.ndarray, baseline: np.ndarray, tuned_lengths: np.ndarray, baseline_lengths: np.ndarray,
              prefix: str, settings: EvalSettings) -> dict[str, float]:
    """Win/tie/loss of tuned over baseline per prompt, raw and length-controlled, with intervals."""
    difference, tolerance = tuned - baseline, settings.tie_tolerance
    metrics = mean(difference > tolerance, settings.seed).metrics(f"{prefix}win_rate")
    metrics |= mean(np.abs(difference) <= tolerance, settings.seed).metrics(f"{prefix}tie_rate")
    metrics |= mean(difference < -tolerance, settings.seed).metrics(f"{prefix}loss_rate")

    def controlled(tuned, baseline, tuned_lengths, baseline_lengths):
        return length_controlled_wins(tuned - baseline, tuned_lengths - baseline_lengths, np.r_[tuned, baseline],
                                      np.r_[tuned_lengths, baseline_lengths], tolerance)

    metrics |= estimate(controlled, tuned, baseline, tuned_lengths, baseline_lengths,
                        seed=settings.seed).metrics(f"{prefix}lc_win_rate")
    return metrics


def sample_prompts(pairs: pd.DataFrame, settings: EvalSettings) -> list[list[dict]]:
    """A seeded random sample of distinct held-out prompts (all of them when there are fewer)."""
    unique = list({repr(list(p)): list(p) for p in pairs.prompt}.values())
    rng = np.random.default_rng(settings.seed)
    chosen = rng.choice(len(unique), size=min(settings.generation_prompts, len(unique)), replace=False)
    return [unique[index] for index in sorted(chosen)]


def checked_answers(prompts: list[list[dict]], answers: dict[str, tuple[list[str], np.ndarray]]
                    ) -> dict[str, np.ndarray] | None:
    """Ground truth where it can be computed: per policy, whether each answer follows the verifiable
    instruction its prompt carries (tasks/instructions.py), on the prompts that carry one; None if none do."""
    users = [next((m["content"] for m in reversed(p) if m["role"] == "user"), "") for p in prompts]
    verdicts = {name: [verify(user, text) for user, text in zip(users, texts)] for name, (texts, _) in answers.items()}
    checkable = [i for i, verdict in enumerate(verdicts["tuned"]) if verdict is not None]  # None: no instruction
    if not checkable:
        return None
    return {name: np.array([bool(results[i]) for i in checkable]) for name, results in verdicts.items()}


def markdown_report(metrics: dict[str, float], judges: list[Judge], gate: GateInput, examples: pd.DataFrame,
                    method: str, implicit: ImplicitReward = "log_ratio") -> str:
    def figure(name: str) -> str:
        if name not in metrics:
            return ""
        low, high = metrics.get(f"{name}.ci_low"), metrics.get(f"{name}.ci_high")
        return f"{metrics[name]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")

    lines = ["# preftune evaluation", "", f"Method: **{method}**. Figures are means with 95 % bootstrap intervals.", ""]
    heard = [j.aspect for j in gate.judges if j.heard]
    if gate.lc_improvement is None:
        lines += ["Promotion gate: **no evidence**: no judge earned a say (see *Judges*).", ""]
    else:
        lines += [f"Promotion gate: combined improvement over {gate.baseline} ({gate.rule} rule over "
                  f"{', '.join(heard)}), length-controlled {gate.lc_improvement.text()}, raw "
                  f"{gate.improvement.text()}, on {gate.prompts} held-out prompts.", ""]
    if gate.ground_truth is not None:
        lines += ["## Ground truth (rule checker, independent of every judge)", "", "| policy | pass rate |", "|---|---|"]
        lines += [f"| {name.removeprefix('ground_truth.pass_rate_')} | {figure(name)} |" for name in sorted(metrics)
                  if name.startswith("ground_truth.pass_rate_") and not name.endswith((".ci_low", ".ci_high"))]
        lines += [f"| difference, tuned - {gate.baseline} ({gate.ground_truth.n} verifiable prompts) "
                  f"| {gate.ground_truth.text()} |", ""]
    if implicit is None:
        lines += ["## Implicit reward", "", f"{method} defines none. The reward models it was trained against "
                  "score it below, but have no say in the gate: their win rates show how far it climbed them, not "
                  "independent evidence (a referee or the ground truth is).", ""]
    else:
        what = "policy vs reference log-probabilities" if implicit == "log_ratio" else "the policy's mean token log-probability"
        lines += [f"## Implicit reward ({what})", "", "| metric | value |", "|---|---|",
                  f"| accuracy ({metrics.get('implicit_reward.pairs', 0):.0f} held-out pairs) | {figure('implicit_reward.accuracy')} |",
                  f"| accuracy on length-matched pairs ({metrics.get('implicit_reward.length_matched_pairs', 0):.0f}) "
                  f"| {figure('implicit_reward.accuracy_length_matched')} |",
                  f"| mean margin | {figure('implicit_reward.margin')} |",
                  f"| share of pairs whose chosen answer is longer | {metrics.get('implicit_reward.chosen_longer_share', float('nan')):.3f} |",
                  ""]
    lines += ["## Judges", "", "A judge is heard only if its held-out accuracy is better than chance at 95 % and it is not "
              "a reward the policy was trained against. Length-controlled figures are read at a zero length gap.", "",
              "| aspect | weight | judge | held-out accuracy | length correlation | heard | win | tie | loss "
              "| length-controlled win | length-controlled improvement |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    standing_of = {j.aspect: j for j in gate.judges}
    for judge in judges:
        a, role = judge.aspect, " (referee)" if judge.referee else " (training reward)" if judge.training_reward else ""
        heard_text = "yes" if standing_of[a].heard else f"no: {standing_of[a].reason}"
        lines.append(f"| {a}{role} | {judge.weight:g} | {judge.provenance} | {figure(f'{a}.pairwise_accuracy')} "
                     f"| {metrics[f'{a}.length_correlation']:.2f} | {heard_text} "
                     f"| {figure(f'{a}.win_rate')} | {figure(f'{a}.tie_rate')} | {figure(f'{a}.loss_rate')} "
                     f"| {figure(f'{a}.lc_win_rate')} | {figure(f'{a}.lc_improvement')} |")
    if heard:
        lines.append(f"| combined (heard) | | | | | | {figure('combined.win_rate')} | {figure('combined.tie_rate')} "
                     f"| {figure('combined.loss_rate')} | {figure('combined.lc_win_rate')} "
                     f"| {figure('combined.lc_improvement')} |")
    lines += ["", "| other metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())
              if not name.startswith(("implicit_reward.", "combined.", "ground_truth.")) and not any(
                  name.startswith(f"{j.aspect}.") for j in judges) and not name.endswith((".ci_low", ".ci_high"))]
    if not examples.empty:
        def cell(text):
            return str(text).replace("|", "\\|").replace("\n", " ")[:160]
        scored = "reference_combined" in examples

        def score(row, name):
            return f" {getattr(row, f'{name}_combined'):.3f} |" if scored else ""

        lines += ["", "## Examples (random held-out prompts)", "",
                  "| prompt | reference |" + (" reward |" if scored else "") + " tuned |" + (" reward |" if scored else ""),
                  "|---|---|---|" + ("---|---|" if scored else "")]
        for row in examples.itertuples():
            lines.append(f"| {cell(row.prompt)} | {cell(row.reference)} |{score(row, 'reference')} "
                         f"{cell(row.tuned)} |{score(row, 'tuned')}")
    return "\n".join(lines) + "\n"


def evaluate_policy(settings: EvalSettings, pairs_path: str, reference: str, policy: str, judges: list[Judge],
                    champion_uri: str | None, out_dir: Path, parent_run_id: str | None = None,
                    stage_runs: dict[str, str] | None = None, method: str = "dpo",
                    implicit: ImplicitReward = "log_ratio") -> EvalResult:
    """Evaluate `policy` against `reference` on held-out pairs, judged by `judges`; log an MLflow run
    (nested under `parent_run_id` when given) and write the report under `out_dir`. `implicit` is the
    method's implicit reward (tasks/methods.py), or None where it defines none."""
    pairs = read_jsonl(pairs_path)
    metrics: dict[str, float] = {}
    models = {"reference": load_policy(reference), "tuned": load_policy(policy)}
    if implicit is not None:
        metrics |= implicit_reward_metrics(models["tuned"], models["reference"], pairs, settings, implicit)

    scorers, margins, scales, standings = {}, {}, {}, []
    for judge in judges:
        scorers[judge.aspect] = RewardScorer(judge.model, settings.max_length)
        judge_metrics, margins[judge.aspect], scales[judge.aspect] = pairwise_metrics(
            judge.aspect, scorers[judge.aspect], read_jsonl(judge.eval_path), settings.batch_size, settings.seed)
        standings.append(standing(
            judge.aspect, judge.weight, Estimate.from_metrics(judge_metrics, f"{judge.aspect}.pairwise_accuracy",
                                                              len(margins[judge.aspect])),
            judge_metrics[f"{judge.aspect}.length_correlation"], settings.min_judge_accuracy, judge.training_reward,
            judge.referee))
        metrics |= judge_metrics | {f"{judge.aspect}.heard": float(standings[-1].heard)}

    prompts = sample_prompts(pairs, settings)
    if champion_uri:
        models["champion"] = load_policy(champion_uri)
    answers = {name: shrinking(lambda size: generate(model, tokenizer, prompts, settings, size), settings.batch_size)
               for name, (model, tokenizer) in models.items()}
    del models
    baseline = "champion" if champion_uri else "reference"
    gaps = answers["tuned"][1] - answers[baseline][1]
    examples = pd.DataFrame({"prompt": [p[-1]["content"] for p in prompts],
                             "reference": answers["reference"][0], "tuned": answers["tuned"][0]})
    standardised, judge_lc = {}, {}
    for judge in judges:
        aspect, (centre, spread) = judge.aspect, scales[judge.aspect]
        scored = {name: shrinking(lambda size: scorers[aspect].score(prompts, texts, size), settings.batch_size)
                  for name, (texts, _) in answers.items()}
        standardised[aspect] = {name: (scores - centre) / spread for name, scores in scored.items()}
        metrics |= win_rates(scored["tuned"], scored["reference"], answers["tuned"][1], answers["reference"][1],
                             f"{aspect}.", settings)
        judge_lc[aspect] = length_controlled(standardised[aspect]["tuned"] - standardised[aspect][baseline], gaps,
                                             settings.seed)
        metrics |= judge_lc[aspect].metrics(f"{aspect}.lc_improvement")
        examples[f"reference_{aspect}"], examples[f"tuned_{aspect}"] = scored["reference"], scored["tuned"]
    metrics |= {"mean_length_tuned": float(np.mean(answers["tuned"][1])),
                "mean_length_reference": float(np.mean(answers["reference"][1])),
                "generation_prompts": float(len(prompts)), "judges_heard": float(sum(j.heard for j in standings))}
    gate = GateInput(baseline=champion_uri or "reference", judges=standings, rule=settings.combination.rule,
                     judge_lc_improvement=judge_lc, prompts=len(prompts))

    combined = combine(standardised, standings, settings.combination)
    if combined is not None:
        examples["reference_combined"], examples["tuned_combined"] = combined["reference"], combined["tuned"]
        metrics |= win_rates(combined["tuned"], combined["reference"], answers["tuned"][1], answers["reference"][1],
                             "combined.", settings)
        gate.improvement = mean(combined["tuned"] - combined[baseline], settings.seed)
        gate.lc_improvement = length_controlled(combined["tuned"] - combined[baseline], gaps, settings.seed)
        gate.candidate_score, gate.baseline_score = float(np.mean(combined["tuned"])), float(np.mean(combined[baseline]))
        metrics |= {"combined_reward_tuned": gate.candidate_score,
                    "combined_reward_reference": float(np.mean(combined["reference"]))}
        metrics |= gate.improvement.metrics("combined.improvement") | gate.lc_improvement.metrics("combined.lc_improvement")

    passes = checked_answers(prompts, answers)
    if passes is not None:
        for name, passed in passes.items():
            metrics |= mean(passed, settings.seed).metrics(f"ground_truth.pass_rate_{name}")
        gate.ground_truth = pass_rate_difference(passes["tuned"], passes[baseline], settings.seed)
        metrics |= gate.ground_truth.metrics("ground_truth.improvement")
        metrics["ground_truth.prompts"] = float(gate.ground_truth.n)

    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_report(metrics, judges, gate, examples.head(settings.example_rows), method, implicit)
    report_path, examples_path = out_dir / "report.md", out_dir / "examples.jsonl"
    report_path.write_text(report)
    examples.to_json(examples_path, orient="records", lines=True, force_ascii=False)
    with stage_run("evaluate", parent_run_id) as run:
        mlflow.log_params({"evaluate.policy": redact(policy), "evaluate.reference": redact(reference),
                           "evaluate.method": method, "evaluate.baseline": redact(gate.baseline),
                           "evaluate.device": str(inference_placement()[0])}
                          | {f"evaluate.judge.{j.aspect}": redact(j.provenance)[:500] for j in judges})
        mlflow.set_tags({f"judge.{j.aspect}.heard": str(j.heard) for j in standings}
                        | {f"judge.{j.aspect}.reason": j.reason for j in standings})
        mlflow.log_metrics(metrics)
        mlflow.log_text(report, "evaluation/report.md")
        mlflow.log_table(examples, "evaluation/examples.json")
        figures = {"reward_margins.png": margin_histograms(margins)} if margins else {}
        if stage_runs:
            figures["training_curves.png"] = training_curves(stage_runs)
        for name, figure in figures.items():
            figure.savefig(out_dir / name, dpi=100)
            mlflow.log_figure(figure, f"evaluation/{name}")
            plt.close(figure)  # pyplot keeps every figure alive until closed
    return EvalResult(metrics=metrics, report_path=str(report_path), examples_path=str(examples_path), gate=gate,
                      mlflow_run_id=run.info.run_id)


@task(name="evaluate", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error,
      cache_policy=EVALUATION_CACHE, persist_result=True)
def evaluate(settings: EvalSettings, pairs_path: str, reference: str, policy: str, judges: list[Judge],
             champion_uri: str | None, workspace: Workspace, parent_run_id: str | None = None,
             stage_runs: dict[str, str] | None = None, method: str = "dpo",
             implicit: ImplicitReward = "log_ratio") -> EvalResult:
    out_dir = workspace.stage("evaluate", settings, pairs_path, reference, policy, judges, champion_uri, method, implicit)
    return evaluate_policy(settings, pairs_path, reference, policy, judges, champion_uri, out_dir, parent_run_id,
                           stage_runs, method, implicit)


def tokenizer_of(source: str):
    from transformers import AutoTokenizer

    if source.startswith("models:/"):
        return mlflow.transformers.load_model(source, return_type="components")["tokenizer"]
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise PreftuneError(f"cannot load the tokenizer of {source!r}: {str(error).splitlines()[0]}") from None


def evaluate_file(policy: str, reference: str, data: DataSettings, judges: dict[str, tuple[str, float]],
                  settings: EvalSettings, out_root: Path) -> EvalResult:
    """`preftune evaluate`: every pair of a preference file (any schema the loader reads, after the
    recipe's filter) is held out; `judges` maps an aspect to (reward model, weight)."""
    from tasks.base import fingerprint
    from tasks.data import SplitData, apply_filter, format_split, load

    folder = out_root / fingerprint([policy, reference, data, judges, settings])
    loaded = load(data, folder / "data")
    filtered = apply_filter(loaded, data, folder / "data")
    everything = SplitData(train=filtered, eval=filtered)
    formatted = format_split(everything, tokenizer_of(reference), folder / "formatted", settings.max_length, data.overlong)
    judged = [Judge(aspect=aspect, weight=weight, model=model, eval_path=formatted.eval.path, provenance=f"given: {model}")
              for aspect, (model, weight) in judges.items()]
    return evaluate_policy(settings, formatted.eval.path, reference, policy, judged, None, folder, method="given")
