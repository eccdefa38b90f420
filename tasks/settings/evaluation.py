"""What the evaluation measures, who judges, and the merge's check: settings only, no torch or MLflow."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.base import MayHoldCredentials, StrictModel

PLAIN_QUESTIONS = "synthetic:plain-questions"


class CombinationSettings(StrictModel):
    """How the heard judges' standardised scores become one score per answer."""

    rule: Literal["weighted", "piecewise"] = Field(
        "weighted",
        description="weighted: the heard judges' weighted mean; piecewise (Llama 2): the safety "
        "judge decides on the prompts it flags, the other judges everywhere else.",
    )
    safety_aspect: str | None = Field(None, description="Piecewise rule: the aspect whose judge is the safety judge.")
    safety_threshold: float = Field(
        -1.0,
        description="Piecewise rule: a prompt is the safety judge's when any compared answer's standardised "
        "safety score is below this (in spreads of its held-out scores).",
    )

    @model_validator(mode="after")
    def _piecewise_names_its_safety_judge(self):
        if self.rule == "piecewise" and not self.safety_aspect:
            raise ValueError("combination.rule piecewise needs combination.safety_aspect (the safety judge's aspect)")
        return self


class BenchmarkSettings(StrictModel):
    """IFEval on a seeded sample of its prompts: the kinds the run trained on, and the others."""

    data: MayHoldCredentials = Field(
        "google/IFEval",
        description="IFEval's prompts: a Hub dataset id, or a local "
        "jsonl/json/parquet file with its columns (key, "
        "prompt, instruction_id_list, kwargs).",
    )
    split: str = Field("train", description="The split to read (Hub datasets).")
    trained_prompts: int | None = Field(
        None,
        ge=0,
        description="Prompts whose instructions are all of kinds the policy trained on, a seeded sample; empty: all.",
    )
    other_prompts: int | None = Field(
        None,
        ge=0,
        description="Prompts carrying any other kind, a seeded sample; "
        "empty: all. They are also control prompts for drift.",
    )
    max_new_tokens: int = Field(
        128,
        gt=0,
        description="Tokens each greedy answer may run to (IFEval's own harness "
        "allows 1280; a cap cuts long answers for both models alike).",
    )
    seed: int = Field(0, description="Seed of the prompt sample.")


class ControlSettings(StrictModel):
    """Control prompts that ask for nothing special, answered by both policies and read for drift."""

    questions: MayHoldCredentials | None = Field(
        PLAIN_QUESTIONS,
        description="Plain questions no training pair asks: synthetic:plain-questions (generated "
        "general-knowledge questions, each with the words a right answer names), a local "
        "jsonl/json/parquet/csv file with a `prompt` column (and optionally `reference`: "
        "those words), or empty: none.",
    )
    prompts: int | None = Field(None, ge=1, description="A seeded sample of the questions; empty: all.")
    max_new_tokens: int = Field(48, gt=0, description="Tokens each greedy answer may run to.")


class RefereeSettings(StrictModel):
    """A judge that is not a training reward: it scores the policy's answers and earns its say on the
    policy's held-out pairs like any judge."""

    model: MayHoldCredentials = Field(
        description="A sequence-classification reward model: a folder, a Hub id or a models:/ URI."
    )
    weight: float = Field(1.0, gt=0, description="Its share of the combined score, relative to the other heard judges.")


class EvalSettings(StrictModel):
    """The held-out evaluation: what is scored and generated, how, and who is heard (tasks/verdict.py)."""

    generation_prompts: int = Field(
        32,
        ge=1,
        description="Held-out prompts both policies answer, a seeded random sample (all of them when there are fewer).",
    )
    max_new_tokens: int = Field(64, gt=0, description="Tokens each greedy answer may run to.")
    batch_size: int = Field(
        32,
        gt=0,
        description="Sequences per forward pass when scoring and generating; halved after an out-of-memory error.",
    )
    max_length: int = Field(
        512,
        gt=8,
        description="Tokens per scored sequence, prompt and answer together; an "
        "overlong prompt loses its start, the answer is kept.",
    )
    tie_tolerance: float = Field(
        1e-4,
        ge=0,
        description="Score differences at most this large count as ties (in "
        "the judge's units; in spreads for the combined score).",
    )
    length_match_ratio: float = Field(
        1.25, ge=1, description="Pairs whose answers' token lengths are within this ratio count as length-matched."
    )
    example_rows: int = Field(8, ge=0, description="Example answers shown in the report (examples.jsonl has all).")
    seed: int = Field(0, description="Seed of the prompt sample and of the bootstrap intervals.")
    min_judge_accuracy: float = Field(
        0.5,
        ge=0.5,
        lt=1,
        description="A judge is heard only if the 95 % lower bound of its held-out pairwise "
        "accuracy is above this (0.5: better than chance).",
    )
    combination: CombinationSettings = Field(
        default_factory=CombinationSettings, description="How the heard judges' scores combine into one."
    )
    referees: dict[str, RefereeSettings] = Field(
        default_factory=dict, description="Judges that are no training reward, by name (e.g. a public reward model)."
    )
    benchmark: BenchmarkSettings | None = Field(
        None, description="IFEval through lm-evaluation-harness on both policies; empty: no benchmark."
    )
    controls: ControlSettings = Field(
        default_factory=ControlSettings, description="Control prompts that ask for nothing special (drift)."
    )


class MergeSettings(StrictModel):
    """The merged model must give the logits of base + adapters, or the merge stage fails."""

    check_prompts: int = Field(4, ge=1, description="Held-out prompts the merged model's logits are checked on.")
    tolerance: float = Field(
        1e-3, gt=0, description="Largest |logit difference| allowed between the merged model and base + adapters."
    )
